"""JAX backend: `jax.grad` and optax, every eager step jitted, graph mode one XLA loop.

JAX is functional: x and the optimizer state are immutable arrays passed into a
jitted step and returned updated, so the "snapshot of x before the update" that
the engine records is simply the old array (no copy). Each run's coefficients,
learning rate, x* and optimizer are closed over by the jitted functions built in
prepare(): they are constants of the compiled program, which keeps a step's
dispatch at one argument (x) plus the optimizer state.

Optimizers: `apply`, `minimize` and graph with update=apply|minimize run optax's own
`sgd`, `adam`, `adagrad`, `rmsprop` with the hyperparameters `runner.optimizers.resolve`
gives for CONVENTIONS["jax"] (eps and the first accumulator always passed
explicitly). `manual` and graph with update=manual write the same rules by hand in
jax.numpy from that Convention, so manual against apply checks optax itself.

Numerics: XLA on CPU contracts `x - lr*g` into a fused multiply-add, so float32
runs stall at 0.99999851 (one ulp below the notebook's 0.99999857, which rounds
`lr*g` first) in every mode, because every mode is jitted; float64 runs agree with
the closed form to ~1e-16 and with the NumPy reference rules to <1e-11 over 100
steps (optax and the hand-written rules differ only in rounding: rsqrt against 1/sqrt,
and optax.rmsprop traces the lr-scaled direction where the reference scales the trace).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from jax import lax

from runner.errors import ConfigError
from runner.optimizers import CONVENTIONS, Convention, Resolved, resolve
from runner.protocol import (
    DTYPES,
    GRAPH_UPDATES,
    MODES,
    Derivatives,
    DerivativesSpec,
    MinimizeSpec,
    Trajectory,
)

# (x, opt_state) -> (x_next, opt_state_next, loss(x), grad(x)): one update, traceable.
StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any, jax.Array, jax.Array]]
# x -> (loss(x), grad(x))
ValueAndGrad = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
# (x, grad) -> what a recorded row holds: (x, grad) for scalars, (‖x − x*‖, ‖grad‖) for vectors
Summary = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

CONVENTION: Convention = CONVENTIONS["jax"]
OPTIMIZERS = ("sgd", "adam", "adagrad", "rmsprop")
# The problems' reductions in jax.numpy. HIGHEST keeps float32 matvecs in float32 on
# GPUs (the default precision there may round the operands to TF32 / bf16).
OPS = SimpleNamespace(
    sum=jnp.sum, matvec=functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)
)


def native_optimizer(opt: Resolved, lr: Any) -> optax.GradientTransformation:
    """The optax optimizer for a resolved spec: our names -> optax's, every value explicit."""
    if opt.name == "sgd":
        return optax.sgd(lr, momentum=opt["momentum"] or None, nesterov=opt["nesterov"])
    if opt.name == "adam":
        return optax.adam(lr, b1=opt["beta1"], b2=opt["beta2"], eps=opt["eps"], eps_root=0.0)
    if opt.name == "adagrad":
        return optax.adagrad(
            lr, initial_accumulator_value=opt["initial_accumulator"], eps=opt["eps"]
        )
    if opt.name == "rmsprop":
        return optax.rmsprop(
            lr,
            decay=opt["rho"],
            eps=opt["eps"],
            eps_in_sqrt=CONVENTION.rmsprop_eps_form == "inside",
            momentum=opt["momentum"] or None,
        )
    raise ConfigError(f"optimizer={opt.name!r}: backend=jax runs {', '.join(OPTIMIZERS)}")


def _convention_gap(name: str) -> str | None:
    """Why optax cannot run CONVENTIONS['jax'] for `name` (only if that table is edited)."""
    if name == "adam" and CONVENTION.adam_eps_form != "corrected":
        return "optax.adam adds eps to sqrt(v_hat) only; CONVENTIONS['jax'] asks for the raw form"
    if name == "adagrad" and CONVENTION.adagrad_eps_form != "inside":
        return "optax.adagrad adds eps inside the square root only; CONVENTIONS['jax'] says outside"
    return None


# -- the update rules by hand (manual mode), from CONVENTIONS["jax"] -----------------------


def _root(accumulated: jax.Array, eps: float, form: str) -> jax.Array:
    return jnp.sqrt(accumulated + eps) if form == "inside" else jnp.sqrt(accumulated) + eps


def manual_rule(
    opt: Resolved, lr: jax.Array, convention: Convention | None = None
) -> tuple[Callable[[jax.Array], dict], Callable[..., tuple[jax.Array, dict]]]:
    """(init(x0) -> state, update(x, g, state) -> (x_next, state)) written in jax.numpy.

    The state is a dict of arrays shaped like x, plus the step count `t` (int32) for
    Adam's bias correction. Plain SGD keeps the notebook's `x - lr*g` and no state.
    """
    name = opt.name
    convention = convention or CONVENTION

    def zeros(x: jax.Array) -> jax.Array:
        return jnp.zeros_like(x)

    if name == "sgd":
        momentum, nesterov = opt["momentum"], opt["nesterov"]
        if not momentum:
            return lambda x: {}, lambda x, g, s: (x - lr * g, s)

        def sgd(x: jax.Array, g: jax.Array, s: dict) -> tuple[jax.Array, dict]:
            buf = momentum * s["buf"] + g
            direction = g + momentum * buf if nesterov else buf
            return x - lr * direction, {"buf": buf}

        return lambda x: {"buf": zeros(x)}, sgd

    if name == "adam":
        b1, b2, eps = opt["beta1"], opt["beta2"], opt["eps"]

        def adam(x: jax.Array, g: jax.Array, s: dict) -> tuple[jax.Array, dict]:
            t = s["t"] + 1
            tf = t.astype(x.dtype)
            m = b1 * s["m"] + (1 - b1) * g
            v = b2 * s["v"] + (1 - b2) * g * g
            c1, c2 = 1 - b1**tf, 1 - b2**tf
            if convention.adam_eps_form == "corrected":
                step = lr * (m / c1) / (jnp.sqrt(v / c2) + eps)
            else:
                step = lr * jnp.sqrt(c2) / c1 * m / (jnp.sqrt(v) + eps)
            return x - step, {"t": t, "m": m, "v": v}

        return lambda x: {"t": jnp.zeros((), jnp.int32), "m": zeros(x), "v": zeros(x)}, adam

    if name == "adagrad":
        eps, initial = opt["eps"], opt["initial_accumulator"]

        def adagrad(x: jax.Array, g: jax.Array, s: dict) -> tuple[jax.Array, dict]:
            acc = s["acc"] + g * g
            return x - lr * g / _root(acc, eps, convention.adagrad_eps_form), {"acc": acc}

        return lambda x: {"acc": jnp.full_like(x, initial)}, adagrad

    if name == "rmsprop":
        rho, momentum, eps = opt["rho"], opt["momentum"], opt["eps"]

        def rmsprop(x: jax.Array, g: jax.Array, s: dict) -> tuple[jax.Array, dict]:
            ms = rho * s["ms"] + (1 - rho) * g * g
            direction = g / _root(ms, eps, convention.rmsprop_eps_form)
            if not momentum:
                return x - lr * direction, {"ms": ms}
            buf = momentum * s["buf"] + direction
            return x - lr * buf, {"ms": ms, "buf": buf}

        if momentum:
            return lambda x: {"ms": zeros(x), "buf": zeros(x)}, rmsprop
        return lambda x: {"ms": zeros(x)}, rmsprop

    raise ConfigError(f"optimizer={name!r}: backend=jax runs {', '.join(OPTIMIZERS)}")


def make_minimize_step(optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    """Build `minimize_step(loss_fn, params, opt_state)`: JAX's closest honest `minimize`.

    JAX and optax have no `optimizer.minimize(f, vars)`: optax optimizers only
    transform gradients they are given. The idiom that plays the same role is a
    small jitted step that is *handed the loss function* and differentiates it
    itself (`jax.value_and_grad(loss_fn)`), then applies the optax update; the
    caller never sees a gradient unless it asks for it. `loss_fn(params)` closes over
    the problem's data (here the coefficients), like the notebook's argument-less
    `f()`, but takes the parameters explicitly because JAX functions are pure.
    `loss_fn` is a static argument: jit compiles once per loss function (keep the
    same function object between calls) and inlines it into the step.
    """

    @functools.partial(jax.jit, static_argnums=0)
    def minimize_step(
        loss_fn: Callable[[Any], jax.Array], params: Any, opt_state: Any
    ) -> tuple[Any, Any, jax.Array, Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return minimize_step


class _EagerProgram:
    """The engine drives the loop; each step is one call of a jitted function.

    No host sync per step: the jitted call returns device arrays as soon as the work
    is queued (async dispatch), and to_numpy() reads a whole chunk at once. Vector
    problems have a second jitted step for recorded steps, which also returns the
    row's summaries (‖x − x*‖, ‖grad‖) computed on the device.
    """

    def __init__(
        self,
        step: StepFn,
        record_step: Callable[..., tuple[Any, ...]] | None,
        value_and_grad: ValueAndGrad,
        x0: jax.Array,
        opt_state: Any,
    ) -> None:
        self._step = step
        self._record_step = record_step
        self._value_and_grad = value_and_grad
        self._x = x0
        self._opt_state = opt_state
        self._dtype = np.dtype(x0.dtype)
        self._on_cpu = all(d.platform == "cpu" for d in x0.devices())

    def step(self, record: bool) -> tuple[Any, Any, Any]:
        x = self._x
        if self._record_step is None:
            # Scalars: x and grad are returned even when record is False: x is the old
            # immutable array and grad is computed anyway, so neither costs anything.
            self._x, self._opt_state, loss, grad = self._step(x, self._opt_state)
            return loss, x, grad
        if record:
            self._x, self._opt_state, loss, dist, grad_norm = self._record_step(x, self._opt_state)
            return loss, dist, grad_norm
        self._x, self._opt_state, loss, _grad = self._step(x, self._opt_state)
        return loss, None, None

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        # On CPU, np.asarray per value is ~1 us each (a view of the buffer; the first
        # one waits for the queue). jnp.stack would cost ~5 us per value plus a fresh
        # XLA compile (~0.8 s) for every new list length. On an accelerator,
        # jax.device_get starts every device-to-host copy before waiting on any.
        if self._on_cpu:
            return np.array([np.asarray(v) for v in values], dtype=self._dtype)
        return np.array(jax.device_get(list(values)), dtype=self._dtype)

    def final(self) -> tuple[Any, Any, Any]:
        loss, grad = self._value_and_grad(self._x)
        return loss, self._x, grad


class _CompiledProgram:
    """The whole loop as one ahead-of-time compiled XLA executable; run() only executes it."""

    def __init__(self, executable: Any, x0: jax.Array, opt_state: Any, spec: MinimizeSpec) -> None:
        self._executable = executable
        self._args = (x0, opt_state)
        self._spec = spec

    def run(self) -> Trajectory:
        out = jax.device_get(self._executable(*self._args))
        rec_x, rec_loss, rec_grad, stopped_at, final_x, final_loss, final_grad = out
        stopped_at = int(stopped_at)
        every = self._spec.record.every
        kept = -(-stopped_at // every)  # rows at steps 0, every, ... < stopped_at
        return Trajectory(
            steps=self._spec.record.recorded_steps()[:kept],
            x=np.asarray(rec_x[:kept]),
            loss=np.asarray(rec_loss[:kept]),
            grad=np.asarray(rec_grad[:kept]),
            final_x=np.asarray(final_x),
            final_loss=float(final_loss),
            final_grad=np.asarray(final_grad),
            stopped_at=stopped_at,
        )


def _compiled_loop(
    step: StepFn,
    value_and_grad: ValueAndGrad,
    summary: Summary,
    steps: int,
    every: int,
    rows: int,
) -> Callable[[jax.Array, Any], tuple[Any, ...]]:
    """The whole minimization as one traceable function of (x0, opt_state0).

    An outer while_loop over record rows writes row k = (x, loss, grad) at step
    k*every (the first step of the row, peeled out of the inner loop so the buffer is
    written once per row, not once per step), then an inner while_loop runs the rest
    of the row's steps. For vector problems the row holds `summary(x, grad)` =
    (‖x − x*‖, ‖grad‖), computed only on recorded steps. Both conditions test
    isfinite(loss of the last step), so the loop stops right after the first
    non-finite loss and the exact step is known. Measured on this CPU (scalar
    problem): ~6 ns/step, against ~5 ns for a bare fori_loop that neither records
    nor checks; a flat loop that writes the buffer every step costs ~11 ns.
    """

    def run(x0: jax.Array, opt_state0: Any) -> tuple[Any, ...]:
        # carry: (i = steps done, x_i, opt_state, x_{i-1}, loss_{i-1}, grad_{i-1})
        def inner_cond(carry: tuple) -> jax.Array:
            i, end, _x, _state, _xp, loss_p, _gp = carry
            return (i < end) & jnp.isfinite(loss_p)

        def inner_body(carry: tuple) -> tuple:
            i, end, x, state, _xp, _lp, _gp = carry
            x_next, state, loss, grad = step(x, state)
            return i + 1, end, x_next, state, x, loss, grad

        def outer_cond(carry: tuple) -> jax.Array:
            k, _i, _x, _state, _xp, loss_p, _gp, _bufs = carry
            return (k < rows) & jnp.isfinite(loss_p)

        def outer_body(carry: tuple) -> tuple:
            k, i, x, state, _xp, _lp, _gp, (bx, bl, bg) = carry
            x_next, state, loss, grad = step(x, state)
            row_x, row_grad = summary(x, grad)
            bx, bl, bg = bx.at[k].set(row_x), bl.at[k].set(loss), bg.at[k].set(row_grad)
            end = jnp.minimum(i + every, steps)
            i, _, x_next, state, xp, lp, gp = lax.while_loop(
                inner_cond, inner_body, (i + 1, end, x_next, state, x, loss, grad)
            )
            return k + 1, i, x_next, state, xp, lp, gp, (bx, bl, bg)

        zero = jnp.zeros_like(x0)
        row_x, row_grad = jax.eval_shape(summary, x0, x0)
        bufs = (
            jnp.zeros((rows, *row_x.shape), row_x.dtype),
            jnp.zeros((rows,), x0.dtype),
            jnp.zeros((rows, *row_grad.shape), row_grad.dtype),
        )
        carry = (0, 0, x0, opt_state0, zero, jnp.zeros((), x0.dtype), zero, bufs)
        if rows:
            carry = lax.while_loop(outer_cond, outer_body, carry)
        _k, i, x, _state, x_prev, loss_prev, grad_prev, (bx, bl, bg) = carry
        diverged = ~jnp.isfinite(loss_prev)
        loss_end, grad_end = value_and_grad(x)
        return (
            bx,
            bl,
            bg,
            jnp.where(diverged, i - 1, i),
            jnp.where(diverged, x_prev, x),
            jnp.where(diverged, loss_prev, loss_end),
            jnp.where(diverged, grad_prev, grad_end),
        )

    return run


class JaxBackend:
    """JAX plugin: jax.grad + hand-written rules for manual, optax for apply and minimize."""

    name: ClassVar[str] = "jax"
    framework: ClassVar[str] = "JAX"

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__}

    def resolved_device(self, requested: str) -> str:
        return str(_device(requested))

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        if spec.mode not in MODES:
            return f"mode={spec.mode} is unknown; backend=jax runs {', '.join(MODES)}"
        if spec.mode == "graph" and spec.update not in GRAPH_UPDATES:
            return f"update={spec.update} is unknown; graph mode runs {', '.join(GRAPH_UPDATES)}"
        if spec.dtype not in DTYPES:
            return f"dtype={spec.dtype} is not supported; backend=jax runs {', '.join(DTYPES)}"
        name = spec.optimizer.name
        if name not in OPTIMIZERS:
            return f"optimizer={name}: backend=jax maps {', '.join(OPTIMIZERS)} to optax"
        try:
            resolve(name, spec.optimizer.lr, spec.optimizer.hyper, CONVENTION)
        except ConfigError as error:
            return str(error)
        manual = spec.mode == "manual" or (spec.mode == "graph" and spec.update == "manual")
        return None if manual else _convention_gap(name)

    def prepare(self, spec: MinimizeSpec) -> _EagerProgram | _CompiledProgram:
        reason = self.unsupported(spec)
        if reason:
            raise ConfigError(reason)
        dtype = _enable_dtype(spec.dtype)
        device = _device(spec.device)
        problem = spec.problem
        p = _coefficients(problem.coefficients, dtype, device)
        x0 = _put(problem.x0_array(), dtype, device)
        lr = _put(spec.optimizer.lr, dtype, device)
        opt = resolve(spec.optimizer.name, spec.optimizer.lr, spec.optimizer.hyper, CONVENTION)
        update = spec.update if spec.mode == "graph" else spec.mode

        def loss_fn(x: jax.Array) -> jax.Array:
            return problem.loss(x, p, OPS)

        value_and_grad = jax.value_and_grad(loss_fn)
        if update == "manual":
            init, rule = manual_rule(opt, lr)
            step = _manual_step(rule, value_and_grad)
        else:
            optimizer = native_optimizer(opt, lr)
            init = optimizer.init
            step = _optax_step(update, loss_fn, value_and_grad, optimizer)
        # Every leaf of the optimizer state (moments, accumulators, Adam's count) on the
        # run's device: init() makes some leaves (the count) on the default device.
        opt_state0 = jax.device_put(init(x0), device)
        summary = _summary(problem, dtype, device)

        if spec.mode == "graph":
            loop = _compiled_loop(
                step, value_and_grad, summary, spec.steps, spec.record.every, spec.record.rows
            )
            executable = jax.jit(loop).lower(x0, opt_state0).compile()
            return _CompiledProgram(executable, x0, opt_state0, spec)

        # minimize_step is jitted already (it is the idiom); the others are jitted here.
        eager_step = step if update == "minimize" else jax.jit(step)
        eager_value_and_grad = jax.jit(value_and_grad)
        record_step = None
        warm: list[Any] = [eager_step(x0, opt_state0), eager_value_and_grad(x0)]
        if problem.dim is not None:

            def recorded(x: jax.Array, state: Any) -> tuple[Any, ...]:
                x_next, state, loss, grad = step(x, state)
                return (x_next, state, loss, *summary(x, grad))

            record_step = jax.jit(recorded)
            warm.append(record_step(x0, opt_state0))
        # Warm-up: compile every step and final() here so run_s is steady state. JAX
        # arrays are immutable, so the program still starts from x0 and opt_state0.
        jax.block_until_ready(warm)
        return _EagerProgram(eager_step, record_step, eager_value_and_grad, x0, opt_state0)

    def derivatives(self, spec: DerivativesSpec) -> Derivatives:
        dtype = _enable_dtype(spec.dtype)
        device = _device(spec.device)
        p = _coefficients(spec.problem.coefficients, dtype, device)
        x = _put(spec.problem.x0_array(), dtype, device)
        loss = spec.problem.loss
        y = loss(x, p)
        # argnums=(0, 1): d/dx and d/dp in one reverse pass; p is a dict pytree, so
        # the coefficient gradients come back as {"a": ..., "b": ..., "c": ...}.
        dy_dx, dy_dp = jax.grad(loss, argnums=(0, 1))(x, p)
        d2y_dx2 = jax.grad(jax.grad(loss))(x, p)  # nested differentiation
        compiled_y, compiled_dy_dx = jax.jit(jax.value_and_grad(loss))(x, p)
        return Derivatives(
            y=float(y),
            dy_dx=float(dy_dx),
            dy_dcoef={k: float(v) for k, v in dy_dp.items()},
            d2y_dx2=float(d2y_dx2),
            compiled_dy_dx=float(compiled_dy_dx),
            compiled_y=float(compiled_y),
        )


def _manual_step(
    rule: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]],
    value_and_grad: ValueAndGrad,
) -> StepFn:
    """The hand-written rule as a traceable (x, state) -> (x', state', loss, g)."""

    def manual(x: jax.Array, state: Any) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
        loss, grad = value_and_grad(x)
        x_next, state = rule(x, grad, state)
        return x_next, state, loss, grad

    return manual


def _optax_step(
    update: str,
    loss_fn: Callable[[jax.Array], jax.Array],
    value_and_grad: ValueAndGrad,
    optimizer: optax.GradientTransformation,
) -> StepFn:
    """One optax update in the mode's idiom, as a traceable (x, state) -> (x', state', loss, g)."""
    if update == "apply":

        def apply(x: jax.Array, state: Any) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
            loss, grad = value_and_grad(x)
            updates, state = optimizer.update(grad, state, x)
            return optax.apply_updates(x, updates), state, loss, grad

        return apply
    minimize_step = make_minimize_step(optimizer)
    return functools.partial(minimize_step, loss_fn)


def _summary(problem: Any, dtype: Any, device: jax.Device) -> Summary:
    """What a recorded row holds: x and grad (scalar problems) or their distances (vectors)."""
    if problem.dim is None:
        return lambda x, grad: (x, grad)
    x_star = _put(problem.optimum()[0], dtype, device)

    def distances(x: jax.Array, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.linalg.norm(x - x_star), jnp.linalg.norm(grad)

    return distances


def _enable_dtype(name: str) -> Any:
    """The run's dtype; float64 switches on jax_enable_x64 (process-wide) first.

    With x64 on, float32 runs stay float32 because every array is created with an
    explicit dtype and Python scalars in the loss are weakly typed.
    """
    if name == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    return jnp.dtype(name)


def _put(value: Any, dtype: Any, device: jax.Device) -> jax.Array:
    """A float64 NumPy value (scalar or array) cast to the run's dtype, on the run's device."""
    return jax.device_put(np.asarray(value, dtype=dtype), device)


def _coefficients(
    coefficients: Mapping[str, Any], dtype: Any, device: jax.Device
) -> dict[str, jax.Array]:
    return {k: _put(v, dtype, device) for k, v in coefficients.items()}


def _gpus() -> list[jax.Device]:
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU platform in this jaxlib, or no device
        return []


def _device(requested: str) -> jax.Device:
    if requested == "cpu":
        return jax.devices("cpu")[0]
    if requested not in ("gpu", "auto"):
        raise ConfigError(f"device={requested}: choose cpu, gpu or auto")
    gpus = _gpus()
    if gpus:
        return gpus[0]
    if requested == "gpu":
        raise ConfigError(
            "device=gpu: JAX sees no GPU on this machine; use device=cpu or device=auto"
        )
    return jax.devices("cpu")[0]
