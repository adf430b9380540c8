"""PyTorch plugin: autograd derivatives, torch.optim.SGD updates, torch.compile for graph mode.

Each mode is written in PyTorch's own idiom (the design notes' mode table):

- manual:   ``torch.autograd.grad``, then ``x -= lr * g`` under ``torch.no_grad()``;
- apply:    ``opt.zero_grad(); loss.backward(); opt.step()``;
- minimize: ``opt.step(closure)``, the closure zero-grads, computes the loss and backpropagates;
- graph:    ``torch.compile`` over the whole update, with the trajectory and the divergence
  check kept on the device (see `_ScanLoop` and `_OptimizerLoop` for the two forms and why).

Vector problems (problem.dim set) record ||x_i - x*|| and ||grad_i|| in place of x_i and
grad_i; final() and the trajectory's final_x / final_grad are the full vectors.
Nothing here changes process-wide torch settings (threads, default dtype); Dynamo's
``trace_autograd_ops`` switch is patched only around the compiled optimizer loop's calls.
"""

from __future__ import annotations

import inspect
import itertools
import math
import types
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch._higher_order_ops.scan import scan

from runner.errors import ConfigError, UnsupportedError
from runner.protocol import (
    DTYPES,
    GRAPH_UPDATES,
    MODES,
    Derivatives,
    DerivativesSpec,
    MinimizeSpec,
    RecordPlan,
    Trajectory,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# The problems' reductions, from torch (problem.loss(x, p, ops)).
_OPS = SimpleNamespace(sum=torch.sum, matvec=torch.matmul)

# spec.options this backend reads (graph mode only), with their defaults.
#   scan_chunk:  steps per call of the compiled scan (update=manual); one host check per call.
#   unroll:      most optimizer steps traced into one compiled call (update=apply|minimize); the
#                largest power of two <= unroll that divides `steps` is used, so no call overruns.
#   cpp_wrapper: Inductor's C++ wrapper, which runs the scan's loop in C++ instead of Python.
_OPTIONS: dict[str, Any] = {"scan_chunk": 1000, "unroll": 4, "cpp_wrapper": True}

# How often (in steps) the compiled optimizer loop reads its divergence flag on the host.
_CHECK_EVERY = 1000

_HYPER = ("momentum", "nesterov")

# Every tensor handed to compiled code is at least 1-D, never 0-d. In torch 2.13 Dynamo
# gives a 0-d CPU float64/int64 input a symbolic .item() value; when a later pass cannot
# keep that symbol it restarts with the input specialized to a constant, so an in-place
# update of it (x.add_, opt.step()) silently vanishes from the graph, and a new value
# re-compiles. Compiled code takes views of the original shape for its arithmetic.
_ONE = (1,)

_program_ids = itertools.count()


def _lift(t: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor as shape (1,) (see `_ONE`); other tensors unchanged."""
    return t.reshape(_ONE) if t.dim() == 0 else t


def _own_code(fn: Callable) -> Callable:
    """A copy of `fn` with a code object of its own, for torch.compile.

    Dynamo caches graphs per code object and stops compiling one after `recompile_limit`
    (8) guard failures (with fullgraph=True it raises). A program's step closes over its
    own optimizer, which Dynamo guards by identity, so nested functions shared by every
    program would hit that limit after 8 prepare() calls in one process (a test session,
    a joblib sweep). With a code object per program each program has its own cache, while
    Inductor's on-disk cache still serves a repeated graph's kernels.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_program_ids)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class _Run:
    """One run's constants on its device, in its dtype: x0, coefficients, x*, lr."""

    def __init__(self, spec: MinimizeSpec, device: torch.device, dtype: torch.dtype) -> None:
        problem = spec.problem
        self.problem = problem
        self.vector = problem.dim is not None

        def const(value: Any) -> torch.Tensor:
            return torch.as_tensor(np.asarray(value, np.float64), dtype=dtype, device=device)

        self.x0 = const(problem.x0_array())
        self.p = {k: const(v) for k, v in problem.coefficients.items()}
        self.x_star = const(problem.optimum()[0]) if self.vector else None
        self.lr = const(spec.optimizer.lr)

    def loss(self, x: torch.Tensor, p: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.problem.loss(x, self.p if p is None else p, _OPS)

    def row(self, x: torch.Tensor, grad: torch.Tensor, x_star: torch.Tensor | None = None):
        """What a recorded row holds: (x, grad), or (||x - x*||, ||grad||) for vectors."""
        if not self.vector:
            return x, grad
        x_star = self.x_star if x_star is None else x_star
        return torch.linalg.vector_norm(x - x_star), torch.linalg.vector_norm(grad)

    def final(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, x, grad) at x, once after a compiled loop: plain autograd."""
        leaf = x.detach().reshape(self.x0.shape).clone().requires_grad_(True)
        loss = self.loss(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss, leaf, grad


def _value_and_grad(problem: Any, x: torch.Tensor, p: Mapping[str, torch.Tensor]):
    """(dy/dx, y) at x: the notebook's get_gradient, written with torch.func."""
    scalars = {k: v.view(()) for k, v in p.items()}
    grad, value = torch.func.grad_and_value(lambda v: problem.loss(v, scalars, _OPS))(x.view(()))
    return grad, value


# One torch.compile wrapper for the module: Dynamo keeps one graph per dtype (and device)
# under it, so each dtype is compiled once per process whatever the problem instance.
_compiled_value_and_grad = torch.compile(_value_and_grad, fullgraph=True)


class TorchBackend:
    """The PyTorch plugin (entry point `torch`)."""

    name = "torch"
    framework = "PyTorch"

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def resolved_device(self, requested: str) -> str:
        has_gpu = torch.cuda.is_available()
        if requested == "cpu":
            return "cpu"
        if requested == "gpu":
            if not has_gpu:
                raise ConfigError(
                    "device=gpu: PyTorch sees no GPU on this machine; use device=cpu or device=auto"
                )
            return "cuda:0"
        if requested == "auto":
            return "cuda:0" if has_gpu else "cpu"
        raise ConfigError(f"device={requested!r} is unknown; choose one of cpu, gpu, auto")

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        if spec.mode not in MODES:
            return f"mode={spec.mode} is unknown; choose one of {', '.join(MODES)}"
        if spec.mode == "graph" and spec.update not in GRAPH_UPDATES:
            return f"update={spec.update} is unknown; choose one of {', '.join(GRAPH_UPDATES)}"
        if spec.dtype not in DTYPES:
            return f"dtype={spec.dtype} is not supported; choose one of {', '.join(DTYPES)}"
        if spec.optimizer.name != "sgd":
            return f"optimizer={spec.optimizer.name}: the torch backend supports sgd only"
        hyper = dict(spec.optimizer.hyper)
        unknown = sorted(set(hyper) - set(_HYPER))
        if unknown:
            return f"optimizer.{unknown[0]}: torch sgd here takes momentum, nesterov"
        momentum = hyper.get("momentum", 0.0)
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or momentum < 0:
            return f"optimizer.momentum={momentum!r} must be a number >= 0"
        nesterov = hyper.get("nesterov", False)
        if not isinstance(nesterov, bool):
            return f"optimizer.nesterov={nesterov!r} must be true or false"
        if nesterov and momentum <= 0:
            return "optimizer.nesterov=true needs optimizer.momentum > 0 (torch.optim.SGD rule)"
        manual = spec.mode == "manual" or (spec.mode == "graph" and spec.update == "manual")
        if manual and (momentum or nesterov):
            return (
                "momentum/nesterov need the optimizer object; manual updates are plain x - lr*g "
                "(use mode=apply|minimize, or graph with update=apply|minimize)"
            )
        unknown = sorted(set(spec.options) - set(_OPTIONS))
        if unknown:
            return f"options.{unknown[0]} is not a torch option; allowed: {', '.join(_OPTIONS)}"
        for key in ("scan_chunk", "unroll"):
            value = spec.options.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"options.{key}={value!r} must be an integer >= 1"
        return None

    def prepare(self, spec: MinimizeSpec) -> Any:
        reason = self.unsupported(spec)
        if reason:
            raise UnsupportedError(reason)
        run = _Run(spec, torch.device(self.resolved_device(spec.device)), _DTYPES[spec.dtype])
        if spec.mode == "graph":
            options = {**_OPTIONS, **spec.options}
            loop_cls = _ScanLoop if spec.update == "manual" else _OptimizerLoop
            loop = loop_cls(spec, run, options)
            loop.warm_up()
            return loop
        program_cls = {"manual": _Manual, "apply": _Apply, "minimize": _Minimize}[spec.mode]
        return program_cls(spec, run)

    def derivatives(self, spec: DerivativesSpec) -> Derivatives:
        problem = spec.problem
        if problem.dim is not None:
            raise UnsupportedError(
                "task=derivatives reports scalars (dy/dx, d2y/dx2); give a scalar problem "
                "(problem.dim=null)"
            )
        device = torch.device(self.resolved_device(spec.device))
        dtype = _DTYPES[spec.dtype]

        def const(value: Any) -> torch.Tensor:
            return torch.as_tensor(np.asarray(value, np.float64), dtype=dtype, device=device)

        x = const(problem.x0_array()).requires_grad_(True)
        p = {k: const(v).requires_grad_(True) for k, v in problem.coefficients.items()}
        y = problem.loss(x, p, _OPS)
        names = list(p)
        # create_graph=True keeps dy/dx differentiable, so d2y/dx2 is autograd of autograd.
        dy_dx, *dy_dcoef = torch.autograd.grad(y, [x, *(p[k] for k in names)], create_graph=True)
        (d2y_dx2,) = torch.autograd.grad(dy_dx, x)
        constants = {k: _lift(v.detach()) for k, v in p.items()}
        compiled_dy_dx, compiled_y = _compiled_value_and_grad(problem, _lift(x.detach()), constants)
        return Derivatives(
            y=float(y.detach()),
            dy_dx=float(dy_dx.detach()),
            dy_dcoef={k: float(g.detach()) for k, g in zip(names, dy_dcoef, strict=True)},
            d2y_dx2=float(d2y_dx2),
            compiled_dy_dx=float(compiled_dy_dx),
            compiled_y=float(compiled_y),
        )


def _sgd(x: torch.Tensor, spec: MinimizeSpec) -> torch.optim.SGD:
    hyper = dict(spec.optimizer.hyper)
    return torch.optim.SGD(
        [x],
        lr=spec.optimizer.lr,
        momentum=float(hyper.get("momentum", 0.0)),
        nesterov=bool(hyper.get("nesterov", False)),
    )


# --------------------------------------------------------------------------- eager modes


class _Eager:
    """Shared state of the eager programs: x as a leaf tensor and the loss at it."""

    def __init__(self, spec: MinimizeSpec, run: _Run) -> None:
        self._run = run
        self._x = run.x0.clone().requires_grad_(True)

    def _row(self, record: bool, x: torch.Tensor, grad: torch.Tensor) -> tuple[Any, Any]:
        """The recorded (x_i, grad_i) or their norms; copies only on recorded steps."""
        if not record:
            return None, None
        if self._run.vector:
            return self._run.row(x.detach(), grad)
        return x.detach().clone(), grad.clone()

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        return torch.stack([v.detach() for v in values]).cpu().numpy()

    def final(self) -> tuple[Any, Any, Any]:
        loss = self._run.loss(self._x)
        (grad,) = torch.autograd.grad(loss, self._x)
        return loss.detach(), self._x.detach().clone(), grad


class _Manual(_Eager):
    """torch.autograd.grad for g, then the update by hand under no_grad."""

    def step(self, record: bool) -> tuple[Any, Any, Any]:
        x = self._x
        loss = self._run.loss(x)
        (grad,) = torch.autograd.grad(loss, x)
        x_i, grad_i = self._row(record, x, grad)
        with torch.no_grad():
            x -= self._run.lr * grad
        return loss.detach(), x_i, grad_i


class _Apply(_Eager):
    """The optimizer is given the gradients: zero_grad, backward, step."""

    def __init__(self, spec: MinimizeSpec, run: _Run) -> None:
        super().__init__(spec, run)
        self._opt = _sgd(self._x, spec)

    def step(self, record: bool) -> tuple[Any, Any, Any]:
        self._opt.zero_grad()
        loss = self._run.loss(self._x)
        loss.backward()
        # Copied before step(): foreach SGD (the CUDA default) may update grads in place.
        x_i, grad_i = self._row(record, self._x, self._x.grad)
        self._opt.step()
        return loss.detach(), x_i, grad_i


class _Minimize(_Eager):
    """The optimizer is handed the loss function: opt.step(closure).

    step(closure) returns the closure's loss, computed before the update; the closure
    also takes the row (x_i, grad_i) on recorded steps, so it is the pre-update state.
    """

    def __init__(self, spec: MinimizeSpec, run: _Run) -> None:
        super().__init__(spec, run)
        self._opt = _sgd(self._x, spec)
        self._record = False
        self._seen: tuple[Any, Any] = (None, None)

    def _closure(self) -> torch.Tensor:
        self._opt.zero_grad()
        loss = self._run.loss(self._x)
        loss.backward()
        self._seen = self._row(self._record, self._x, self._x.grad)
        return loss

    def step(self, record: bool) -> tuple[Any, Any, Any]:
        self._record = record
        loss = self._opt.step(self._closure)
        x_i, grad_i = self._seen
        return loss.detach(), x_i, grad_i


# --------------------------------------------------------------------------- graph mode


class _Rows:
    """Preallocated trajectory buffers: `rows` slots plus one scratch slot for unrecorded steps.

    Compiled code writes every step to slot i // every when i % every == 0 and to the
    scratch slot otherwise, which keeps the write branch-free. A row is a scalar: x_i
    (scalar problems) or ||x_i - x*|| (vectors), likewise for the gradient.
    """

    def __init__(self, record: RecordPlan, dtype: torch.dtype, device: torch.device) -> None:
        self.record = record
        self.x, self.loss, self.grad = (
            torch.zeros(record.rows + 1, dtype=dtype, device=device) for _ in range(3)
        )

    def trajectory(self, stopped_at: int, final: tuple[Any, Any, Any], shape) -> Trajectory:
        """Rows at steps < stopped_at, and the final state, copied to the host once."""
        keep = -(-stopped_at // self.record.every)
        final_loss, final_x, final_grad = (
            v.detach().reshape(s).cpu().numpy().copy()
            for v, s in zip(final, ((), shape, shape), strict=True)
        )
        return Trajectory(
            steps=self.record.recorded_steps()[:keep],
            x=self.x[:keep].cpu().numpy().copy(),
            loss=self.loss[:keep].cpu().numpy().copy(),
            grad=self.grad[:keep].cpu().numpy().copy(),
            final_x=final_x,
            final_loss=float(final_loss),
            final_grad=final_grad,
            stopped_at=stopped_at,
        )


class _ScanLoop:
    """update=manual: the loop is a torch.compile'd `scan` over a chunk of steps, x - lr*g inside.

    The scan carries (x, stop); each iteration takes g with torch.func.grad_and_value and
    emits the row (x_i, loss_i, g_i). `stop` becomes the first step whose loss is
    non-finite and x freezes there, so the carry ends at (x_stop, stop) exactly; the
    emitted rows are scattered into the preallocated buffers inside the same compiled call.
    The host reads `stop` once per chunk and ends the loop there, so a diverging run stops
    within one chunk. Chunks have one static length (the last one masks the steps past
    `steps`), so one compile serves the run. Inductor's C++ wrapper runs the scan's loop in
    C++ (about 1.2 us/step here, against 7.5 with the Python wrapper).
    """

    def __init__(self, spec: MinimizeSpec, run: _Run, options: Mapping[str, Any]) -> None:
        steps, every, n_rows = spec.steps, spec.record.every, spec.record.rows
        self._spec, self._run = spec, run
        device, dtype = run.x0.device, run.x0.dtype
        shape = run.x0.shape
        p1 = {k: _lift(v) for k, v in run.p.items()}
        shapes = {k: v.shape for k, v in run.p.items()}
        lr1 = _lift(run.lr)
        x_star1 = None if run.x_star is None else _lift(run.x_star)
        self._rows = rows = _Rows(spec.record, dtype, device)
        chunk = min(steps, int(options["scan_chunk"]))
        offsets = torch.arange(chunk, device=device)
        # Chunk starts, made once, so the host loop allocates nothing per call.
        self._starts = [torch.full(_ONE, s, device=device) for s in range(0, steps, chunk)]

        def run_chunk(x1: torch.Tensor, stop1: torch.Tensor, start: torch.Tensor):
            p = {k: v.view(shapes[k]) for k, v in p1.items()}
            lr = lr1.view(())
            x_star = None if x_star1 is None else x_star1.view(shape)
            index = start + offsets

            def body(carry: tuple[torch.Tensor, torch.Tensor], i: torch.Tensor):
                x, stop = carry
                grad, loss = torch.func.grad_and_value(run.loss)(x, p)
                stop = torch.where((i < stop) & ~torch.isfinite(loss), i, stop)
                x_next = torch.where(i < stop, x - lr * grad, x)
                x_row, grad_row = run.row(x, grad, x_star)
                return (x_next, stop), (x_row.clone(), loss, grad_row.clone())

            (x, stop), (xs, losses, grads) = scan(body, (x1.view(shape), stop1.view(())), index)
            recorded = (index % every == 0) & (index < stop)
            slot = torch.where(recorded, index // every, n_rows)
            rows.x.index_put_((slot,), xs)
            rows.loss.index_put_((slot,), losses)
            rows.grad.index_put_((slot,), grads)
            return _lift(x), _lift(stop)

        self._compiled = torch.compile(
            _own_code(run_chunk),
            fullgraph=True,
            options={"cpp_wrapper": bool(options["cpp_wrapper"])},
        )

    def _start_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        stop = torch.full(_ONE, self._spec.steps, device=self._run.x0.device)
        return _lift(self._run.x0.clone()), stop

    def warm_up(self) -> None:
        """Compile with one chunk; x is an argument, so the next run starts fresh at x0."""
        self._compiled(*self._start_state(), self._starts[0])

    def run(self) -> Trajectory:
        steps = self._spec.steps
        x, stop = self._start_state()
        for start in self._starts:
            x, stop = self._compiled(x, stop, start)
            if int(stop) < steps:  # the one host sync per chunk
                break
        stopped_at = int(stop)
        return self._rows.trajectory(stopped_at, self._run.final(x), self._run.x0.shape)


class _OptimizerLoop:
    """update=apply|minimize: torch.optim.SGD's own step, torch.compile'd with the gradient.

    A compiled call runs `unroll` whole steps (loss, autograd, optimizer step, the row write
    and the divergence bookkeeping), all on device; the host loop only calls it and reads
    the divergence flag every _CHECK_EVERY steps. Three things make the optimizer traceable
    in one graph, each the closest honest form of the eager idiom:

    - ``opt.step`` is wrapped by Optimizer hooks that call ``torch._dynamo.graph_break()`` on
      purpose; we call the unwrapped ``SGD.step`` (its body, same object, same state) under
      ``torch.no_grad()``, which is what the wrapper sets for non-differentiable optimizers.
    - ``loss.backward()`` accumulates into ``.grad`` (an attribute mutation) and Dynamo then
      refuses the optimizer's ``_init_group``; ``torch.autograd.grad`` plus
      ``x.grad.copy_(g)`` gives ``.grad`` the same values (what zero_grad(set_to_none=False)
      + backward() compute) and traces (Dynamo's ``trace_autograd_ops``).
    - update=minimize hands ``SGD.step`` a closure that computes the loss and that gradient,
      and records the row, before the optimizer updates x.

    With momentum the buffer is created as zeros before compiling: with dampening 0 the
    first step then gives buf = grad, exactly the fresh optimizer's first step, and the
    graph is compiled once, in its steady state.
    A step past a non-finite loss cannot be skipped inside the optimizer, so the state at
    the first such step (x_i, loss_i, g_i) is latched on device, and rows at later steps are
    dropped; `unroll` is reduced to a power of two dividing `steps`, so no call overruns.
    """

    def __init__(self, spec: MinimizeSpec, run: _Run, options: Mapping[str, Any]) -> None:
        steps, every, n_rows = spec.steps, spec.record.every, spec.record.rows
        self._spec, self._run = spec, run
        device, dtype = run.x0.device, run.x0.dtype
        shape = run.x0.shape
        p1 = {k: _lift(v) for k, v in run.p.items()}
        shapes = {k: v.shape for k, v in run.p.items()}
        x_star1 = None if run.x_star is None else _lift(run.x_star)
        self._x = x = _lift(run.x0.clone()).requires_grad_(True)
        x.grad = torch.zeros_like(x)
        self._opt = opt = _sgd(x, spec)
        if opt.defaults["momentum"]:
            opt.state[x]["momentum_buffer"] = torch.zeros_like(x)
        sgd_step = inspect.unwrap(type(opt).step)
        self._rows = rows = _Rows(spec.record, dtype, device)
        self._unroll = unroll = math.gcd(steps, 1 << (int(options["unroll"]).bit_length() - 1))
        self._i = i = torch.zeros(_ONE, dtype=torch.int64, device=device)
        self._stop = stop = torch.full(_ONE, steps, device=device)
        # The state at the first non-finite loss, latched on device: x, loss, grad.
        self._latched = (
            torch.zeros_like(x),
            torch.zeros(_ONE, dtype=dtype, device=device),
            torch.zeros_like(x),
        )
        latched_x, latched_loss, latched_grad = self._latched
        minimize = spec.update == "minimize"

        def loss_and_grad(p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            loss = run.loss(x.view(shape), p)
            (grad,) = torch.autograd.grad(loss, x)
            x.grad.copy_(grad)
            return loss, grad

        def record(loss: torch.Tensor, grad: torch.Tensor, x_star: Any) -> None:
            """Row i and the divergence latch, read while x is still x_i."""
            loss = _lift(loss.detach())
            x_row, grad_row = run.row(x.detach().view(shape), grad.view(shape), x_star)
            slot = torch.where(i % every == 0, i // every, n_rows)
            rows.x.index_put_((slot,), _lift(x_row).clone())
            rows.loss.index_put_((slot,), loss)
            rows.grad.index_put_((slot,), _lift(grad_row).clone())
            first_bad = (i < stop) & ~torch.isfinite(loss)
            latched_x.copy_(torch.where(first_bad, x.detach(), latched_x))
            latched_loss.copy_(torch.where(first_bad, loss, latched_loss))
            latched_grad.copy_(torch.where(first_bad, grad, latched_grad))
            stop.copy_(torch.where(first_bad, i, stop))

        def one_step(p: Mapping[str, torch.Tensor], x_star: Any) -> None:
            if minimize:

                def closure() -> torch.Tensor:
                    loss, grad = loss_and_grad(p)
                    with torch.no_grad():
                        record(loss, grad, x_star)
                    return loss

                with torch.no_grad():
                    sgd_step(opt, closure)
            else:
                loss, grad = loss_and_grad(p)
                with torch.no_grad():
                    record(loss, grad, x_star)
                    sgd_step(opt)
            with torch.no_grad():
                i.add_(1)

        def run_steps() -> None:
            p = {k: v.view(shapes[k]) for k, v in p1.items()}
            x_star = None if x_star1 is None else x_star1.view(shape)
            for _ in range(unroll):
                one_step(p, x_star)

        self._compiled = torch.compile(
            _own_code(run_steps),
            fullgraph=True,
            options={"cpp_wrapper": bool(options["cpp_wrapper"])},
        )

    def _reset(self) -> None:
        """Back to x0 with the optimizer state of a fresh SGD (see the class docstring)."""
        with torch.no_grad():
            self._x.copy_(_lift(self._run.x0))
            self._x.grad.zero_()
            for state in self._opt.state.values():
                if "momentum_buffer" in state:
                    state["momentum_buffer"].zero_()
            self._i.zero_()
            self._stop.fill_(self._spec.steps)
            for kept in self._latched:
                kept.zero_()

    def warm_up(self) -> None:
        """Compile with one call on the real objects (Dynamo guards them), then reset."""
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            self._compiled()
        self._reset()

    def run(self) -> Trajectory:
        steps = self._spec.steps
        self._reset()
        calls = steps // self._unroll
        check = max(1, _CHECK_EVERY // self._unroll)
        # The patch only matters if a guard ever failed and Dynamo traced again.
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for n in range(1, calls + 1):
                self._compiled()
                if n % check == 0 and int(self._stop) < steps:
                    break
        stopped_at = int(self._stop)
        if stopped_at < steps:
            x, loss, grad = self._latched
            final = (loss, x, grad)
        else:
            final = self._run.final(self._x)
        return self._rows.trajectory(stopped_at, final, self._run.x0.shape)
