"""PyTorch plugin: autograd derivatives, torch.optim updates, torch.compile for graph mode.

Each mode is written in PyTorch's own idiom (the design notes' mode table):

- manual:   ``torch.autograd.grad``, then the update rule by hand (`_HandRule`, torch tensor
  ops in torch's formula convention) on ``x.detach()``, so no ``torch.no_grad()`` is
  needed: plain SGD is ``x - lr * g``;
- apply:    ``opt.zero_grad(); loss.backward(); opt.step()``;
- minimize: ``opt.step(closure)``, the closure zero-grads, computes the loss and backpropagates;
- graph:    ``torch.compile`` over the whole update, with the trajectory and the divergence
  check kept on the device (see `_ScanLoop` and `_OptimizerLoop` for the two forms and why).

Optimizers: sgd (momentum, nesterov), adam, adagrad, rmsprop (momentum), each the native
torch.optim class in apply/minimize/graph(apply|minimize) with the hyperparameters that
``resolve(..., CONVENTIONS["torch"])`` gives (eps and Adagrad's initial accumulator passed
explicitly, rmsprop's rho as torch's ``alpha``), and ``foreach=False``: with one parameter
tensor the multi-tensor kernels have nothing to batch (the CUDA default would pick them).

Vector problems (problem.dim set) record ||x_i - x*|| and ||grad_i|| in place of x_i and
grad_i; final() and the trajectory's final_x / final_grad are the full vectors.
Nothing here changes process-wide torch settings (threads, default dtype); Dynamo's
``trace_autograd_ops`` switch is patched only around the compiled optimizer loop's calls.
The one process-wide setting is Inductor's ``cpp.vec_isa_ok``, set before compiling on
the CPU once this machine's vector-ISA probe is known to pass (`backends.torch_isa`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import types
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from backends.torch_isa import trust_probed_vec_isa
from runner.errors import BadSetting, ConfigError, UnsupportedError, not_allowed, whole_number
from runner.optimizers import CONVENTIONS, Convention, Resolved, resolve
from runner.problems import compact
from runner.protocol import (
    Derivatives,
    DerivativesSpec,
    MinimizeSpec,
    RecordPlan,
    Span,
    option_misfit,
    outside_vocabulary,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# The problems' reductions, from torch (problem.loss(x, p, ops)).
_OPS = SimpleNamespace(sum=torch.sum, matvec=torch.matmul)

# spec.options this backend reads (graph mode only), with their defaults.
#   scan_chunk:  most steps per call of the compiled scan (update=manual); one host check
#                per call. Fewer for a large x: see _SCAN_ENTRIES.
#   unroll:      most optimizer steps traced into one compiled call (update=apply|minimize); the
#                largest power of two <= unroll that divides `steps` is used, so no call overruns.
#   cpp_wrapper: Inductor's C++ wrapper, which runs the scan's loop in C++ instead of Python:
#                true, false or auto (on for the CPU only: on CUDA, torch 2.11 on an H100, it
#                cannot generate the scan's while_loop, an AssertionError in
#                codegen_subgraph_prefix, and the optimizer loop took 78 s to compile with it).
_OPTIONS: dict[str, Any] = {"scan_chunk": 1000, "unroll": 4, "cpp_wrapper": "auto"}


def _inductor_options(options: Mapping[str, Any], device: torch.device) -> dict[str, bool]:
    return {"cpp_wrapper": _cpp_wrapper(options["cpp_wrapper"], device.type)}


def _cpp_wrapper(wrapper: Any, device_type: str) -> bool:
    """backend.cpp_wrapper as a run uses it: auto is on for the CPU only."""
    return device_type == "cpu" if wrapper == "auto" else bool(wrapper)


def _unroll(steps: int, unroll: int) -> int:
    """The optimizer steps a compiled call runs: the largest power of two <= unroll that
    divides steps."""
    return math.gcd(steps, 1 << (int(unroll).bit_length() - 1))


def _scan_chunk(spec: MinimizeSpec, scan_chunk: int) -> int:
    """The steps a compiled scan call runs: scan_chunk, fewer for a short run or a large x."""
    entries = max(1, _SCAN_ENTRIES // int(np.size(spec.problem.x0_array())))
    return min(spec.steps, int(scan_chunk), entries)


def _before_compiling(device: torch.device) -> None:
    if device.type == "cpu":  # Inductor's C++ kernels: probe the CPU's ISAs once per machine
        trust_probed_vec_isa()


# Most x entries one compiled scan call updates (steps x entries). A scan has one static
# length, and the engine sizes chunks by time (Ctrl-C waits at most ~0.25 s), so the length
# is the program's step_multiple: were it longer than a chunk, the rest would be computed and
# masked. With 1000 steps at n = 1e7 one call took 14 s; the engine then asked for ~13 steps
# at a time and each call still ran 130 (steps=130: 262 ms a step against 14).
_SCAN_ENTRIES = 1 << 20


def _autograd_ops_traced() -> Any:
    """Around every call of the compiled optimizer loop (see _OptimizerLoop): Dynamo
    traces torch.autograd.grad into the graph. A function, not a module-level partial:
    naming torch._dynamo imports it (~1 s), which a run that compiles nothing never pays."""
    return torch._dynamo.config.patch(trace_autograd_ops=True)


# How often (in steps) the compiled optimizer loop reads its divergence flag on the host.
_CHECK_EVERY = 1000

# Whose formulas the hand-written rules follow (eps placement, defaults): torch.optim's.
_CONVENTION = CONVENTIONS["torch"]

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


def _lifted(p: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """The coefficients lifted for compiled code (see `_ONE`), and their own shapes."""
    return {k: _lift(v) for k, v in p.items()}, {k: v.shape for k, v in p.items()}


def _viewed(p1: Mapping[str, torch.Tensor], shapes: Mapping[str, Any]) -> dict:
    """Inside compiled code: lifted coefficients viewed back to their own shapes."""
    return {k: v.view(shapes[k]) for k, v in p1.items()}


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

        np_dtype = np.dtype(str(dtype).removeprefix("torch."))

        def const(value: Any) -> torch.Tensor:
            # Cast by NumPy into a fresh array that torch then shares: no float64 copy of
            # size n, and x0_array's read-only broadcast view becomes a writable vector.
            return torch.as_tensor(np.array(value, np_dtype), device=device)

        # x0 and x* stored once when they are one number broadcast (a scalar x0, scalar
        # coefficients), seen through expand() with x's shape: no memory of size n. What
        # the loops update are dense copies (x0_copy).
        x0 = problem.x0_array()
        self.x0 = const(compact(x0)).expand(np.shape(x0))
        self.p = {k: const(v) for k, v in problem.coefficients.items()}
        x_star = const(compact(problem.optimum()[0])) if self.vector else None
        self.x_star = None if x_star is None else x_star.expand(self.x0.shape)
        self.lr = const(spec.optimizer.lr)
        self._final: Callable[[torch.Tensor], tuple] | None = None  # see compile_final

    def loss(self, x: torch.Tensor, p: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.problem.loss(x, self.p if p is None else p, _OPS)

    def x0_copy(self) -> torch.Tensor:
        """A dense, writable copy of x0, for a program to update.

        Dense: x0 is a broadcast view, and a plain clone of one of a single entry keeps its
        stride 0, which the compiled scan refuses as a carry whose next value has stride 1.
        """
        return self.x0.clone(memory_format=torch.contiguous_format)

    def row(self, x: torch.Tensor, grad: torch.Tensor, x_star: torch.Tensor | None = None):
        """What a recorded row holds: (x, grad), or (||x - x*||, ||grad||) for vectors."""
        if not self.vector:
            return x, grad
        x_star = self.x_star if x_star is None else x_star
        return torch.linalg.vector_norm(x - x_star), torch.linalg.vector_norm(grad)

    def final(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, x, grad) at x, once after a compiled loop: a vector's from the function
        `compile_final` made, a scalar's by plain autograd.

        The leaf shares x's memory (no copy of n entries): nothing writes x after this.
        """
        leaf = x.detach().reshape(self.x0.shape)
        if self._final is not None:
            grad, loss = self._final(_lift(leaf))
            return loss, leaf, grad
        leaf.requires_grad_(True)
        loss = self.loss(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss, leaf, grad

    def compile_final(self, options: Mapping[str, Any]) -> None:
        """final()'s loss and gradient as one compiled function, for a vector x.

        Plain autograd holds ~4n of temporaries at once; the compiled pass holds only the
        gradient. n = 1e7, update=apply, 150 steps: peak RSS 7.3x -> 3.2x bytes(x) over
        the baseline (with the loop's x.grad dropped before it), the read-back 0.106 ->
        0.014 s; prepare() pays ~0.1-0.2 s more with Inductor's cache warm, ~1.6 s cold.
        Compiled and run once here, at a dense copy of x0 like the x final() gets (x0
        is a broadcast view, whose strides Dynamo guards), before the loop allocates x
        and its gradient: run beside them (and a latch since removed), its gradient made
        the run's peak 4n.
        """
        if not self.vector:
            return
        p1, shapes = _lifted(self.p)
        compiled = torch.compile(
            _own_code(_value_and_grad),
            fullgraph=True,
            options=_inductor_options(options, self.x0.device),
        )
        problem, shape = self.problem, self.x0.shape
        self._final = lambda x1: compiled(problem, x1, p1, shape, shapes)
        self._final(_lift(self.x0_copy()))


def _value_and_grad(
    problem: Any, x1: torch.Tensor, p1: Mapping[str, torch.Tensor], shape: Any, shapes: Any
):
    """(dy/dx, y) at x: the notebook's get_gradient, written with torch.func.

    Compiled: x and the coefficients come lifted (see `_ONE`) and are viewed back to
    `shape` and `shapes` here.
    """
    p = _viewed(p1, shapes)
    return torch.func.grad_and_value(lambda x: problem.loss(x, p, _OPS))(x1.view(shape))


@functools.cache
def _compiled_value_and_grad() -> Callable[..., Any]:
    """One torch.compile wrapper per process, made on first use.

    Dynamo keeps one graph per dtype (and device) under it, so each dtype is compiled
    once per process whatever the problem instance; building it lazily keeps
    torch._dynamo's ~1.4 s import out of every run that does not compile.
    """
    return torch.compile(_value_and_grad, fullgraph=True)


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

    def convention(self, spec: MinimizeSpec) -> Convention:
        """torch.optim's, whose Adam bias correction torch.compile moves into the run's
        dtype (CONVENTIONS["torch_compiled"]); the hand-written rules keep float64."""
        if spec.mode == "graph" and spec.update != "manual":
            return CONVENTIONS["torch_compiled"]
        return _CONVENTION

    def options_used(self, spec: MinimizeSpec) -> dict[str, Any]:
        """The graph options that made this run differ from one at the defaults, at the
        values it used: unroll (update apply|minimize) and scan_chunk (update=manual) as
        reduced for the run's steps and x, cpp_wrapper as resolved for its device. One
        that ran as its default would (unroll=8 over 300 steps: 4, as 4 does), or that
        this update never reads, is left out; the eager modes read none of them."""
        if spec.mode != "graph":
            return {}
        device = torch.device(self.resolved_device(spec.device)).type
        as_used: dict[str, Callable[[Any], Any]] = (
            {"scan_chunk": lambda value: _scan_chunk(spec, value)}
            if spec.update == "manual"
            else {"unroll": lambda value: _unroll(spec.steps, value)}
        )
        as_used["cpp_wrapper"] = lambda value: _cpp_wrapper(value, device)
        given = {**_OPTIONS, **spec.options}
        ran = {key: used(given[key]) for key, used in as_used.items()}
        return {key: value for key, value in ran.items() if value != as_used[key](_OPTIONS[key])}

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        outside = outside_vocabulary(spec)
        if outside:
            return outside
        try:
            _resolved(spec)  # the core checks the vocabulary; a bare spec is checked here
            for key in ("scan_chunk", "unroll"):
                whole_number(f"backend.{key}", spec.options.get(key, 1))
        except ConfigError as exc:
            return BadSetting(str(exc))
        wrapper = spec.options.get("cpp_wrapper", "auto")
        if not (isinstance(wrapper, bool) or wrapper == "auto"):
            return not_allowed("backend.cpp_wrapper", wrapper, ("true", "false", "auto"))
        return option_misfit(spec, _OPTIONS, tuple(_OPTIONS))  # all three: graph mode's

    def prepare(self, spec: MinimizeSpec) -> Any:
        _resolved(spec)  # a vocabulary error is a ConfigError, as from the core
        reason = self.unsupported(spec)
        if reason:
            raise UnsupportedError(reason)
        run = _Run(spec, torch.device(self.resolved_device(spec.device)), _DTYPES[spec.dtype])
        if spec.mode == "graph":
            _before_compiling(run.x0.device)
            options = {**_OPTIONS, **spec.options}
            run.compile_final(options)  # before the loop's own n-sized tensors exist
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
        constants, shapes = _lifted({k: v.detach() for k, v in p.items()})
        _before_compiling(device)
        compiled = _compiled_value_and_grad()
        compiled_dy_dx, compiled_y = compiled(problem, _lift(x.detach()), constants, (), shapes)
        return Derivatives(
            y=float(y.detach()),
            dy_dx=float(dy_dx.detach()),
            dy_dcoef={k: float(g.detach()) for k, g in zip(names, dy_dcoef, strict=True)},
            d2y_dx2=float(d2y_dx2),
            compiled_dy_dx=float(compiled_dy_dx),
            compiled_y=float(compiled_y),
        )


def _resolved(spec: MinimizeSpec) -> Resolved:
    """The optimizer's hyperparameters with torch's defaults filled in (ConfigError if bad)."""
    opt = spec.optimizer
    return resolve(opt.name, opt.lr, opt.hyper, _CONVENTION)


def _native(x: torch.Tensor, opt: Resolved) -> torch.optim.Optimizer:
    """The torch.optim optimizer for `opt`, every resolved value passed explicitly.

    foreach=False everywhere (single-tensor kernels; see the module docstring) and
    capturable=False (torch's default, stated): the same update code runs eagerly and
    compiled. Eagerly torch keeps the step counter on the host on purpose (read with .item(),
    no device sync); compiled, `_initial_state` puts it on x's device and the bias correction
    becomes tensor arithmetic in the graph (measured on CPU: capturable=True also traces,
    with the same result to 1e-16 and no faster, ~11 us/step either way).
    """
    lr, v = opt.lr, opt.values
    if opt.name == "sgd":
        return torch.optim.SGD(
            [x], lr=lr, momentum=v["momentum"], nesterov=v["nesterov"], foreach=False
        )
    if opt.name == "adam":
        return torch.optim.Adam(
            [x], lr=lr, betas=(v["beta1"], v["beta2"]), eps=v["eps"], foreach=False,
            capturable=False,
        )  # fmt: skip
    if opt.name == "adagrad":
        return torch.optim.Adagrad(
            [x], lr=lr, eps=v["eps"], initial_accumulator_value=v["initial_accumulator"],
            foreach=False,
        )  # fmt: skip
    if opt.name == "rmsprop":
        return torch.optim.RMSprop(
            [x], lr=lr, alpha=v["rho"], eps=v["eps"], momentum=v["momentum"], foreach=False,
            capturable=False,
        )  # fmt: skip
    raise UnsupportedError(f"optimizer={opt.name} has no torch.optim mapping")


def _correction(beta: float, t: int | torch.Tensor, like: torch.Tensor) -> Any:
    """1 - beta^t: a Python float for a step count t, else float64 arithmetic in x's dtype."""
    if isinstance(t, torch.Tensor):
        return (1 - beta**t).to(like.dtype)
    return 1 - beta**t


def _root(accumulated: torch.Tensor, eps: float, form: str) -> torch.Tensor:
    return torch.sqrt(accumulated + eps) if form == "inside" else torch.sqrt(accumulated) + eps


class _HandRule:
    """Each update rule by hand in torch tensor ops, in torch.optim's formula convention.

    Pure functions of tensors, so the eager manual mode and the compiled scan run the same
    code: init(x) -> state (a tuple of x-shaped tensors), update(x, g, state, t, lr) ->
    (x_next, state) with t counting from 1 (an int eagerly, a float64 tensor in the scan).
    The formulas are the papers' (= CONVENTIONS["torch"]): Adam's eps added to sqrt(v_hat),
    Adagrad's and RMSprop's outside the square root, Adagrad's accumulator starting at the
    resolved initial value, momentum buffers starting at 0 (so SGD's first buf is g).
    """

    def __init__(self, opt: Resolved, convention: Convention = _CONVENTION) -> None:
        self.name, self.v, self.c = opt.name, dict(opt.values), convention

    def init(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        name, v = self.name, self.v
        zeros = torch.zeros_like(x)
        if name == "sgd":
            return (zeros,) if v["momentum"] else ()
        if name == "adam":
            return zeros, zeros.clone()
        if name == "adagrad":
            return (torch.full_like(x, v["initial_accumulator"]),)
        return (zeros, zeros.clone()) if v["momentum"] else (zeros,)  # rmsprop

    def update(self, x: torch.Tensor, g: torch.Tensor, state: tuple, t: Any, lr: Any):
        name, v, c = self.name, self.v, self.c
        if name == "sgd":
            if not v["momentum"]:
                return x - lr * g, state  # the notebook's arithmetic
            momentum = v["momentum"]
            buf = momentum * state[0] + g
            direction = g + momentum * buf if v["nesterov"] else buf
            return x - lr * direction, (buf,)
        if name == "adam":
            b1, b2, eps = v["beta1"], v["beta2"], v["eps"]
            m = b1 * state[0] + (1 - b1) * g
            s = b2 * state[1] + (1 - b2) * (g * g)
            c1, c2 = _correction(b1, t, x), _correction(b2, t, x)
            if c.adam_eps_form == "corrected":
                step = lr * (m / c1) / (torch.sqrt(s / c2) + eps)
            else:
                step = lr * (c2**0.5 / c1) * m / (torch.sqrt(s) + eps)
            return x - step, (m, s)
        if name == "adagrad":
            acc = state[0] + g * g
            return x - lr * g / _root(acc, v["eps"], c.adagrad_eps_form), (acc,)
        rho, momentum = v["rho"], v["momentum"]  # rmsprop
        ms = rho * state[0] + (1 - rho) * (g * g)
        direction = g / _root(ms, v["eps"], c.rmsprop_form(momentum))
        if not momentum:
            return x - lr * direction, (ms,)
        buf = momentum * state[1] + direction
        return x - lr * buf, (ms, buf)


def _initial_state(opt: torch.optim.Optimizer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state a fresh optimizer reaches on its first step, created before compiling.

    Every tensor is on x's device and none is 0-d (see `_ONE`): the step counters of Adam,
    Adagrad and RMSprop are shape (1,) in the run's dtype (what torch itself makes when the
    default dtype is the run's; a float32 counter would round Adam's float64 bias correction).
    Buffers start at zero, Adagrad's sum at initial_accumulator_value: with dampening 0 a
    zero momentum buffer gives buf = g on the first step, exactly a fresh SGD's clone(g).
    """
    group = opt.param_groups[0]
    zeros = torch.zeros_like
    step = torch.zeros(_ONE, dtype=x.dtype, device=x.device)
    if isinstance(opt, torch.optim.SGD):
        return {"momentum_buffer": zeros(x)} if group["momentum"] else {}
    if isinstance(opt, torch.optim.Adam):
        return {"step": step, "exp_avg": zeros(x), "exp_avg_sq": zeros(x)}
    if isinstance(opt, torch.optim.Adagrad):
        return {"step": step, "sum": torch.full_like(x, group["initial_accumulator_value"])}
    state = {"step": step, "square_avg": zeros(x)}  # RMSprop
    if group["momentum"]:
        state["momentum_buffer"] = zeros(x)
    return state


# --------------------------------------------------------------------------- eager modes


class _Program:
    """What every program hands the engine the same way: framework values to host arrays."""

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        # Under no_grad rather than a detach() per value: stacking an eager chunk's 1000
        # scalars took 0.64 ms with them, 0.28 ms without (three stacks a chunk).
        # One value (the final x or grad, n entries) is not stacked, which would copy it.
        with torch.no_grad():
            if len(values) == 1:
                return values[0][None].cpu().numpy()
            return torch.stack(list(values)).cpu().numpy()


class _Eager(_Program):
    """Shared state of the eager programs: x as a leaf tensor and the loss at it.

    On the CPU a step hands the engine its loss and row as Python floats (`item()`, exact
    in either dtype), not as tensors kept for the chunk's end: holding three tensors a
    step until then and stacking them cost ~3 us a step, the floats ~0.8 (torch manual,
    10,000 steps: runner / hand-written loop 1.11 -> 1.04). On a GPU item() would wait for
    the device every step, so there the tensors wait and cross once a chunk.
    """

    # Whether step() updates x in place (the optimizer's parameter), so that a recorded
    # x_i must be a copy. Gradients are never copied: autograd.grad and backward() after
    # zero_grad() (set_to_none) make a fresh tensor each step, and the single-tensor
    # (foreach=False) torch.optim updates read it without writing it.
    _x_in_place = True

    def __init__(self, spec: MinimizeSpec, run: _Run) -> None:
        self._run = run
        self._x = run.x0_copy().requires_grad_(True)
        self._on_cpu = self._x.device.type == "cpu"
        self._host_dtype = np.dtype(spec.dtype)

    def _loss(self, loss: torch.Tensor) -> Any:
        return loss.item() if self._on_cpu else loss.detach()

    def _row(self, record: bool, x: torch.Tensor, grad: torch.Tensor) -> tuple[Any, Any]:
        """The recorded (x_i, grad_i) or their norms; a copy of x only if x is updated in place."""
        if not record:
            return None, None
        if self._run.vector:
            x_i, grad_i = self._run.row(x.detach(), grad)
        elif self._on_cpu:
            x_i, grad_i = x, grad  # read as numbers below: x's value now, no copy needed
        else:
            x_i, grad_i = (x.detach().clone() if self._x_in_place else x.detach()), grad
        return (x_i.item(), grad_i.item()) if self._on_cpu else (x_i, grad_i)

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        if isinstance(values[0], float):  # a CPU chunk's losses or rows
            return np.asarray(values, dtype=self._host_dtype)
        return super().to_numpy(values)

    def final(self) -> tuple[Any, Any, Any]:
        loss = self._run.loss(self._x)
        (grad,) = torch.autograd.grad(loss, self._x)
        return loss.detach(), self._x.detach().clone(), grad


class _Manual(_Eager):
    """torch.autograd.grad for g, then the update by hand (`_HandRule`) on detached tensors.

    The rule returns a new x, which becomes the next step's leaf: x_i stays as it was, so
    the row needs no copy of it, and no copy_ writes x_next back (two tensor ops a step
    fewer than an in-place update plus a recorded copy). The rule's state (moments,
    accumulators) is on x's device; the step count t is a host int, as torch.optim keeps
    its own counter on the host in eager mode.
    """

    _x_in_place = False

    def __init__(self, spec: MinimizeSpec, run: _Run) -> None:
        super().__init__(spec, run)
        self._rule = _HandRule(_resolved(spec))
        self._state = self._rule.init(self._x.detach())
        self._t = 0

    def step(self, record: bool) -> tuple[Any, Any, Any]:
        x = self._x
        loss = self._run.loss(x)
        (grad,) = torch.autograd.grad(loss, x)
        self._t += 1
        # No no_grad() (~1-2 us a step): the rule sees only tensors that require no grad.
        state, lr = self._state, self._run.lr
        x_next, self._state = self._rule.update(x.detach(), grad, state, self._t, lr)
        self._x = x_next.requires_grad_(True)
        return self._loss(loss), *self._row(record, x, grad)


class _Apply(_Eager):
    """The optimizer is given the gradients: zero_grad, backward, step."""

    def __init__(self, spec: MinimizeSpec, run: _Run) -> None:
        super().__init__(spec, run)
        self._opt = _native(self._x, _resolved(spec))

    def step(self, record: bool) -> tuple[Any, Any, Any]:
        self._opt.zero_grad()
        loss = self._run.loss(self._x)
        loss.backward()
        x_i, grad_i = self._row(record, self._x, self._x.grad)
        self._opt.step()
        return self._loss(loss), x_i, grad_i


class _Minimize(_Eager):
    """The optimizer is handed the loss function: opt.step(closure).

    step(closure) returns the closure's loss, computed before the update; the closure
    also takes the row (x_i, grad_i) on recorded steps, so it is the pre-update state.
    """

    def __init__(self, spec: MinimizeSpec, run: _Run) -> None:
        super().__init__(spec, run)
        self._opt = _native(self._x, _resolved(spec))
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
        return self._loss(loss), x_i, grad_i


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

    def span(self, start: int, stopped_at: int) -> Span:
        """Rows at steps start <= i < stopped_at, copied to the host."""
        every = self.record.every
        begin, end = -(-start // every), -(-stopped_at // every)
        return Span(
            np.arange(begin * every, stopped_at, every, dtype=np.int64),
            *(rows[begin:end].cpu().numpy().copy() for rows in (self.x, self.loss, self.grad)),
            stopped_at,
        )


class _ScanLoop(_Program):
    """update=manual: a torch.compile'd `scan` over a chunk of steps, the hand rule inside.

    The scan carries (x, stop, rule state); each iteration takes g with
    torch.func.grad_and_value, applies `_HandRule` (t = i + 1, bias corrections in float64)
    and emits the row (x_i, loss_i, g_i). `stop` starts at the step advance() runs to and
    becomes the first step whose loss is non-finite; x and the state freeze from there, so
    the carry ends at (x_stop, stop, state_stop); the emitted rows are scattered into the
    preallocated buffers inside the same compiled call. The host reads `stop` once per
    chunk and ends the loop there, so a diverging run stops within one chunk. Chunks have
    one static length (steps past `stop` are masked) and start at any step, so one compile
    serves the run and advance() can stop anywhere; that length is the step_multiple the
    engine sizes its chunks by, so only a run's last call computes steps it then masks.
    Inductor's C++ wrapper runs the scan's loop in C++ (about 1.2 us/step here, against 7.5
    with the Python wrapper).
    """

    def __init__(self, spec: MinimizeSpec, run: _Run, options: Mapping[str, Any]) -> None:
        every, n_rows = spec.record.every, spec.record.rows
        self._spec, self._run = spec, run
        device, dtype = run.x0.device, run.x0.dtype
        shape = run.x0.shape
        p1, shapes = _lifted(run.p)
        lr1 = _lift(run.lr)
        x_star1 = None if run.x_star is None else _lift(run.x_star)
        self._rule = rule = _HandRule(_resolved(spec))
        self._rows = rows = _Rows(spec.record, dtype, device)
        self._chunk = chunk = _scan_chunk(spec, options["scan_chunk"])
        offsets = torch.arange(chunk, device=device)
        self._done = 0
        self._carry = self._start_state()

        from torch._higher_order_ops.scan import scan  # ~1.6 s to import: graph mode only

        def run_chunk(x1: torch.Tensor, stop1: torch.Tensor, start: torch.Tensor, *state1):
            p = _viewed(p1, shapes)
            lr = lr1.view(())
            x_star = None if x_star1 is None else x_star1.view(shape)
            index = start + offsets

            def body(carry: tuple[torch.Tensor, torch.Tensor, tuple], i: torch.Tensor):
                x, stop, state = carry
                grad, loss = torch.func.grad_and_value(run.loss)(x, p)
                stop = torch.where((i < stop) & ~torch.isfinite(loss), i, stop)
                t = (i + 1).to(torch.float64)
                x_new, state_new = rule.update(x, grad, state, t, lr)
                x_next = torch.where(i < stop, x_new, x)
                state = tuple(torch.where(i < stop, state_new[j], s) for j, s in enumerate(state))
                x_row, grad_row = run.row(x, grad, x_star)
                return (x_next, stop, state), (x_row.clone(), loss, grad_row.clone())

            state = tuple(s.view(shape) for s in state1)
            init = (x1.view(shape), stop1.view(()), state)
            (x, stop, state), (xs, losses, grads) = scan(body, init, index)
            recorded = (index % every == 0) & (index < stop)
            slot = torch.where(recorded, index // every, n_rows)
            rows.x.index_put_((slot,), xs)
            rows.loss.index_put_((slot,), losses)
            rows.grad.index_put_((slot,), grads)
            return _lift(x), _lift(stop), *(_lift(s) for s in state)

        self._compiled = torch.compile(
            _own_code(run_chunk),
            fullgraph=True,
            options=_inductor_options(options, device),
        )

    @property
    def step_multiple(self) -> int:
        """The scan's static length: a chunk is a whole number of calls (see _SCAN_ENTRIES)."""
        return self._chunk

    def _start_state(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x0 and the rule's initial state, dense (`_Run.x0_copy`) and lifted (see `_ONE`)."""
        x = self._run.x0_copy()
        return _lift(x), tuple(_lift(s) for s in self._rule.init(x))

    def _reset(self) -> None:
        """Back to step 0 (the compiled scan keeps no state of its own)."""
        self._done, self._carry = 0, self._start_state()

    def _tensor(self, value: int) -> torch.Tensor:
        return torch.full(_ONE, value, device=self._run.x0.device)

    def warm_up(self) -> None:
        """Compile with one chunk; x and the state are arguments, so a run starts fresh."""
        x, state = self._start_state()
        self._compiled(x, self._tensor(self._spec.steps), self._tensor(0), *state)

    def advance(self, stop: int) -> Span:
        start = self._done
        x, state = self._carry
        limit = self._tensor(stop)
        stopped_at = stop
        for chunk_start in range(start, stop, self._chunk):
            x, limit, *state = self._compiled(x, limit, self._tensor(chunk_start), *state)
            stopped_at = int(limit)  # the one host sync per chunk
            if stopped_at < stop:
                break
        self._done, self._carry = stopped_at, (x, tuple(state))
        return self._rows.span(start, stopped_at)

    @property
    def x(self) -> torch.Tensor:
        return self._carry[0]

    def final(self) -> tuple[Any, Any, Any]:
        return self._run.final(self.x)


class _OptimizerLoop(_Program):
    """update=apply|minimize: the torch.optim optimizer's own step, compiled with the gradient.

    A compiled call runs `unroll` whole steps (loss, autograd, optimizer step, the row write
    and the divergence bookkeeping), all on device; the host loop only calls it and reads
    the divergence flag every _CHECK_EVERY steps. Three things make the optimizer traceable
    in one graph, each the closest honest form of the eager idiom:

    - ``opt.step`` is wrapped by Optimizer hooks that call ``torch._dynamo.graph_break()`` on
      purpose; we call the unwrapped ``step`` (its body, same object, same state) under
      ``torch.no_grad()``, which is what the wrapper sets for non-differentiable optimizers.
    - ``loss.backward()`` accumulates into ``.grad`` (an attribute mutation) and Dynamo then
      refuses the optimizer's ``_init_group``; ``torch.autograd.grad`` plus
      ``x.grad.copy_(g)`` gives ``.grad`` the same values (what zero_grad(set_to_none=False)
      + backward() compute) and traces (Dynamo's ``trace_autograd_ops``).
    - update=minimize hands ``step`` a closure that computes the loss and that gradient,
      and records the row, before the optimizer updates x.

    The optimizer state is created before compiling (`_initial_state`: step counters of shape
    (1,) in the run's dtype on x's device, zero moments and buffers, Adagrad's sum at its
    initial value), so the graph is compiled once, in its steady state, and a run resets it
    in place. Under compile torch.optim reads the counter as a tensor (``_get_value``), so
    the bias corrections and Adagrad's lr / (1 + (step - 1) * lr_decay) are computed in the
    counter's dtype: with torch's float32 counter a float64 run's Adam is 2.7e-7 (relative)
    off its eager result after 100 steps, Adagrad 9e-9 (its lr rounded to float32); with the
    counter in the run's dtype both agree with the reference to 1e-16.
    A step past a non-finite loss cannot be skipped inside the optimizer: the loop notes
    that step on device and goes on to the next check, its later rows are dropped, and
    x and the optimizer's state there are replayed from x0 by final() (`_rewind`). `unroll` is
    reduced to a power of two dividing `steps`, so no call overruns.
    """

    def __init__(self, spec: MinimizeSpec, run: _Run, options: Mapping[str, Any]) -> None:
        steps, every, n_rows = spec.steps, spec.record.every, spec.record.rows
        self._spec, self._run = spec, run
        device, dtype = run.x0.device, run.x0.dtype
        shape = run.x0.shape
        p1, shapes = _lifted(run.p)
        x_star1 = None if run.x_star is None else _lift(run.x_star)
        self._x = x = _lift(run.x0_copy()).requires_grad_(True)
        x.grad = torch.zeros_like(x)
        self._opt = opt = _native(x, _resolved(spec))
        opt.state[x].clear()  # Adagrad fills its state in __init__, with a 0-d counter
        opt.state[x].update(_initial_state(opt, x))
        opt_step = inspect.unwrap(type(opt).step)
        self._rows = rows = _Rows(spec.record, dtype, device)
        self._unroll = unroll = _unroll(steps, options["unroll"])
        self._i = i = torch.zeros(_ONE, dtype=torch.int64, device=device)
        self._stop = stop = torch.full(_ONE, steps, device=device)
        minimize = spec.update == "minimize"

        def loss_and_grad(p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            loss = run.loss(x.view(shape), p)
            (grad,) = torch.autograd.grad(loss, x)
            x.grad.copy_(grad)
            return loss, grad

        def record(loss: torch.Tensor, grad: torch.Tensor, x_star: Any) -> None:
            """Row i and the divergence check, read while x is still x_i."""
            loss = _lift(loss.detach())
            x_row, grad_row = run.row(x.detach().view(shape), grad.view(shape), x_star)
            slot = torch.where(i % every == 0, i // every, n_rows)
            rows.x.index_put_((slot,), _lift(x_row).clone())
            rows.loss.index_put_((slot,), loss)
            rows.grad.index_put_((slot,), _lift(grad_row).clone())
            first_bad = (i < stop) & ~torch.isfinite(loss)
            stop.copy_(torch.where(first_bad, i, stop))

        def one_step(p: Mapping[str, torch.Tensor], x_star: Any) -> None:
            if minimize:

                def closure() -> torch.Tensor:
                    loss, grad = loss_and_grad(p)
                    with torch.no_grad():
                        record(loss, grad, x_star)
                    return loss

                with torch.no_grad():
                    opt_step(opt, closure)
            else:
                loss, grad = loss_and_grad(p)
                with torch.no_grad():
                    record(loss, grad, x_star)
                    opt_step(opt)
            with torch.no_grad():
                i.add_(1)

        def compiled_steps(count: int) -> Callable[[], None]:
            def run_steps() -> None:
                p = _viewed(p1, shapes)
                x_star = None if x_star1 is None else x_star1.view(shape)
                for _ in range(count):
                    one_step(p, x_star)

            return torch.compile(
                _own_code(run_steps), fullgraph=True, options=_inductor_options(options, device)
            )

        # By step count, each compiled once: `unroll` now, one step a call only for a replay
        # that stops inside a call (_rewind).
        self._compiled_steps = functools.cache(compiled_steps)
        self._compiled = self._compiled_steps(unroll)

    def _reset(self) -> None:
        """Back to x0 with a fresh optimizer's state, in place (see the class docstring)."""
        with torch.no_grad():
            self._x.copy_(_lift(self._run.x0))
            if self._x.grad is None:  # final() drops it
                self._x.grad = torch.zeros_like(self._x)
            self._x.grad.zero_()
            # A fresh state made again, not a copy kept: that would hold n entries per moment.
            state = self._opt.state[self._x]
            for key, fresh in _initial_state(self._opt, self._x).items():
                state[key].copy_(fresh)
            self._i.zero_()
            self._stop.fill_(self._spec.steps)
        self._done = 0

    def warm_up(self) -> None:
        """Compile with one call on the real objects (Dynamo guards them), then reset."""
        with _autograd_ops_traced():
            self._compiled()
        self._reset()

    @property
    def step_multiple(self) -> int:
        """A compiled call runs `unroll` steps, so a chunk is a whole number of calls."""
        return self._unroll

    def advance(self, stop: int) -> Span:
        start = self._done
        calls = (stop - start) // self._unroll
        check = max(1, _CHECK_EVERY // self._unroll)
        # The patch only matters if a guard ever failed and Dynamo traced again.
        with _autograd_ops_traced():
            for n in range(1, calls + 1):
                self._compiled()
                if (n % check == 0 or n == calls) and int(self._stop) < stop:
                    break
        stopped_at = min(int(self._stop), stop)
        self._done = stopped_at
        return self._rows.span(start, stopped_at)

    def _rewind(self, stopped_at: int) -> None:
        """x and the optimizer's state at step `stopped_at` (a non-finite loss), from x0.

        The loop went on past that step, to the next check. Latching x there instead (a
        select into a third n-sized tensor every step) cost 36% of a step at n = 1e7
        (4.75 against 3.04 ms) and made the run's peak 3n. A replay costs only a run that
        stops (its steps up to there again, timed with the final state, not as steps) and
        runs the same compiled steps from the same values: whole calls, then one step a
        call up to a stop inside a call (that graph compiled on first use).
        """
        self._reset()
        calls, rest = divmod(stopped_at, self._unroll)
        with _autograd_ops_traced():
            for _ in range(calls):
                self._compiled()
            for _ in range(rest):
                self._compiled_steps(1)()
        if int(self._stop) != self._spec.steps:
            raise RuntimeError(f"replaying to step {stopped_at}, a loss before it was not finite")
        self._stop.fill_(stopped_at)

    def final(self) -> tuple[Any, Any, Any]:
        """At x, or at the first non-finite loss, where the loop went on past (`_rewind`)."""
        stopped_at = int(self._stop)
        if stopped_at < self._spec.steps:
            self._rewind(stopped_at)
        self._x.grad = None  # the loop's, n entries: final() computes its own
        return self._run.final(self._x)
