"""JAX backend: `jax.grad` and optax, every eager step jitted, graph mode one XLA loop.

JAX is functional: x and the optimizer state are immutable arrays passed into a
jitted step and returned updated, so the "snapshot of x before the update" that
the engine records is simply the old array (no copy). Each run's coefficients,
learning rate, x* and optimizer are closed over by the jitted functions built in
prepare(): they are constants of the compiled program, which keeps a step's
dispatch to what it carries (x, the optimizer state and the chunk of rows, or for a
scalar x the chunk alone: see _eager_steps). The exceptions are once per
call or per run: the vector loop's row and final() take the coefficients and x* as
arguments (see _apart).

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

from runner.errors import BadSetting, ConfigError
from runner.optimizers import CONVENTIONS, Convention, Resolved, resolve
from runner.problems import compact
from runner.protocol import (
    EAGER_CHUNK,
    Derivatives,
    DerivativesSpec,
    MinimizeSpec,
    Span,
    option_misfit,
    outside_vocabulary,
)

# (x, opt_state) -> (x_next, opt_state_next, loss(x), grad(x)): one update, traceable.
StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any, jax.Array, jax.Array]]
# x -> (loss(x), grad(x))
ValueAndGrad = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
# (chunk) -> (chunk,) or (x, opt_state, chunk) -> (x_next, opt_state_next, chunk): one
# eager step, its row written at the chunk's cursor, which moves on (see _eager_steps)
EagerStep = Callable[..., tuple]
# (x, grad) -> what a recorded row holds: (x, grad) for scalars, (‖x − x*‖, ‖grad‖) for vectors
Summary = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# (x, operands, recorded) -> (loss, ||x - x*||, ||grad||): the per-step loop's row of a
# vector x; the distances are zeros unless `recorded`.
Observe = Callable[[jax.Array, tuple, Any], tuple[jax.Array, jax.Array, jax.Array]]

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
            direction = g / _root(ms, eps, convention.rmsprop_form(momentum))
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


class _Program:
    """What eager and compiled programs share: x on the device, final() and to_numpy()."""

    def __init__(self, value_and_grad: ValueAndGrad, x0: jax.Array) -> None:
        self._value_and_grad = value_and_grad  # jitted
        self._x = x0
        self._dtype = np.dtype(x0.dtype)
        self._on_cpu = all(d.platform == "cpu" for d in x0.devices())

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        # On CPU, np.asarray per value is ~1 us each (a view of the buffer; the first
        # one waits for the queue), and one value (the final x or grad, n entries) stays
        # a view. jnp.stack would cost ~5 us per value plus a fresh XLA compile (~0.8 s)
        # for every new list length. On an accelerator, jax.device_get starts every
        # device-to-host copy before waiting on any.
        if self._on_cpu:
            if len(values) == 1:
                return np.asarray(values[0], dtype=self._dtype)[np.newaxis]
            return np.array([np.asarray(v) for v in values], dtype=self._dtype)
        return np.array(jax.device_get(list(values)), dtype=self._dtype)

    def final(self) -> tuple[Any, Any, Any]:
        loss, grad = self._value_and_grad(self._x)
        return loss, self._x, grad


class _EagerProgram(_Program):
    """The engine drives the loop; each step is one call of a jitted function.

    A RecordingEagerProgram: the jitted step also writes its row into a chunk buffer on
    the device (`_chunk`: EAGER_CHUNK + 2 rows of 3 in the run dtype), at the row its
    last row's first entry (the cursor) names, and moves the cursor on; drain() reads
    the chunk back in one transfer and rewinds it. Nothing is kept per step on the
    Python side: holding three arrays a step for the engine and reading each back with
    np.asarray cost ~33 us/step against ~10 us with a buffer (scalar float32 SGD, this
    CPU; the hand-written jitted loop: ~5 us). The buffer is donated to each step (~1 us
    a step less): the engine holds Ctrl-C until a step has returned and its outputs are
    stored, so no step is cut short with its buffer gone.

    What a step carries is `_eager_steps`'s choice: the chunk alone, with x and the
    optimizer state in the row after the last one written, or (x, state, chunk).
    """

    def __init__(
        self,
        steps: tuple[EagerStep, EagerStep],
        value_and_grad: ValueAndGrad,
        x0: jax.Array,
        carry: tuple,
    ) -> None:
        super().__init__(value_and_grad, x0)
        self._plain, self._recorded = steps
        self._carry = carry  # (chunk,) or (x, state, chunk)
        self._k = 0  # steps since the last drain
        self._device = x0.devices().pop()

    def step(self, record: bool) -> None:
        fn = self._recorded if record else self._plain
        self._carry = fn(*self._carry)
        self._k += 1

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        *apart, chunk = self._carry
        # On CPU np.asarray is a view of the buffer (it waits for the queue); copy the
        # chunk's rows out of it.
        host = np.array(np.asarray(chunk)[: self._k])
        self._k, self._carry = 0, (*apart, _rewind(chunk))
        return host[:, 0], host[:, 1], host[:, 2]

    def final(self) -> tuple[Any, Any, Any]:
        *apart, chunk = self._carry
        if apart:
            self._x = apart[0]
        else:  # x is in the row at the cursor: read on the host, no function to compile
            host = np.asarray(chunk)
            # Put back on the device, committed like x0: final()'s function is not compiled again.
            self._x = jax.device_put(host[int(host[-1, 0]), 0], self._device)
        return super().final()


def _chunk(dtype: Any, device: jax.Device, carried: Sequence[Any] = ()) -> jax.Array:
    """A chunk buffer with `carried` at the start of row 0 and the cursor at 0."""
    chunk = np.zeros((EAGER_CHUNK + 2, 3), dtype)
    chunk[0, : len(carried)] = [np.asarray(value) for value in carried]
    return jax.device_put(chunk, device)


def _cursor(chunk: jax.Array) -> jax.Array:
    """The row the next step writes (exact as a float: it stays below EAGER_CHUNK + 1)."""
    return chunk[-1, 0].astype(jnp.int32)


def _carried(chunk: jax.Array) -> jax.Array:
    """The row at the cursor: x and the optimizer state where they are carried in it."""
    return lax.dynamic_index_in_dim(chunk, _cursor(chunk), keepdims=False)


@functools.partial(jax.jit, donate_argnums=0)
def _rewind(chunk: jax.Array) -> jax.Array:
    """The chunk with its cursor back at row 0 and the row at the cursor moved there."""
    return chunk.at[0].set(_carried(chunk)).at[-1, 0].set(0)


def _written(chunk: jax.Array, block: jax.Array) -> jax.Array:
    """The chunk with `block` (rows of up to 3) at the cursor, and the cursor one row on."""
    chunk = lax.dynamic_update_slice(chunk, block, (_cursor(chunk), jnp.int32(0)))
    return chunk.at[-1, 0].add(1)


def _eager_steps(
    step: StepFn, summary: Summary, x0: jax.Array, state0: Any
) -> tuple[EagerStep, EagerStep, Callable[[], tuple]]:
    """(plain, recorded, start): eager steps that write their row at the chunk's cursor,
    and start() -> a fresh carry at x0 and state0 (the steps donate its chunk).

    A scalar x whose optimizer state is at most two numbers of its dtype (every
    optimizer but Adam, whose count is an integer) is carried in the chunk, so a step
    takes and returns one array: each step writes its row and, in the row after it, x
    and the state it hands on, and the next step reads them there. Scalar SGD, 10,000
    steps: ~4.9 us a step against ~6.7 with (x, state, chunk) carried apart (a
    jitted-call micro-benchmark; the hand-written `x = step(x)`: ~4.6 us), since every
    array a call takes or returns costs ~1 us. Otherwise the steps carry (x, state,
    chunk): the recorded step writes (loss, *summary(x, grad)), and for vectors the
    plain step writes only the loss, so it computes no norm. A state that holds no
    array (optax's sgd without momentum: two empty namedtuples) is then closed over and
    carried as None: flattening optax's namedtuples at every call cost ~1.4 us.
    """
    dtype, device = x0.dtype, x0.devices().pop()
    leaves, treedef = jax.tree_util.tree_flatten(state0)
    if (
        x0.shape == ()
        and len(leaves) <= 2
        and all(leaf.shape == () and leaf.dtype == dtype for leaf in leaves)
    ):

        def packed(chunk: jax.Array) -> tuple[jax.Array]:
            x, *state = _carried(chunk)[: 1 + len(leaves)]
            x_next, state, loss, grad = step(x, jax.tree_util.tree_unflatten(treedef, state))
            handed_on = [x_next, *jax.tree_util.tree_leaves(state)]
            handed_on += [jnp.zeros((), dtype)] * (3 - len(handed_on))
            block = jnp.stack([jnp.stack([loss, *summary(x, grad)]), jnp.stack(handed_on)])
            return (_written(chunk, block),)

        packed_step = jax.jit(packed, donate_argnums=0)
        return packed_step, packed_step, lambda: (_chunk(dtype, device, [x0, *leaves]),)

    stateless = not leaves

    def stepped(x: jax.Array, state: Any) -> tuple[Any, ...]:
        x_next, state, loss, grad = step(x, state0 if stateless else state)
        return x_next, None if stateless else state, loss, grad

    def recorded(x: jax.Array, state: Any, chunk: jax.Array) -> tuple[Any, ...]:
        x_next, state, loss, grad = stepped(x, state)
        return x_next, state, _written(chunk, jnp.stack([loss, *summary(x, grad)])[None])

    def plain(x: jax.Array, state: Any, chunk: jax.Array) -> tuple[Any, ...]:
        x_next, state, loss, _grad = stepped(x, state)
        return x_next, state, _written(chunk, loss.reshape(1, 1))

    # The chunk buffer is donated: each step writes its row in place, with no new buffer.
    recorded_step = jax.jit(recorded, donate_argnums=2)
    plain_step = jax.jit(plain, donate_argnums=2) if x0.shape else recorded_step
    carried_state0 = None if stateless else state0
    return plain_step, recorded_step, lambda: (x0, carried_state0, _chunk(dtype, device))


# Rows one compiled call writes at most: its row buffers have this many slots (or the
# run's row count, if smaller); advance() splits a longer span into several calls.
ROWS_PER_CALL = 1 << 14
# For an x of at most UNROLLED_SIZE entries, steps run in groups of up to UNROLL written
# out one after the other, with no per-step exit test (`_group_loop`, groups of one step
# when `every` has no other divisor); a larger x runs `_flat_loop`, which tests each step.
UNROLL = 12
UNROLLED_SIZE = 16


def _group(every: int) -> int:
    """The largest divisor of `every` that is at most UNROLL (recorded steps start groups)."""
    return max(d for d in range(1, min(every, UNROLL) + 1) if every % d == 0)


class _CompiledProgram(_Program):
    """The loop as one ahead-of-time compiled XLA executable, called once per chunk.

    The executable takes the state (x and the loop's carry: the optimizer state, and
    for the per-step loop the next step's row) and the span (first step, end step) as
    arguments, so one compile serves every chunk; the state stays on the device, only
    the span's rows cross to the host (final() is asked for once, when the run ends). A
    span longer than the row buffers (ROWS_PER_CALL rows) takes several calls. x and the
    carry are donated, so the loop runs in their buffers: the engine holds signals until
    advance() has stored the call's results (CompiledProgram).
    """

    def __init__(
        self,
        executable: Any,
        operands: tuple,
        value_and_grad: ValueAndGrad,
        x0: jax.Array,
        carry0: Any,
        spec: MinimizeSpec,
        group: int,
    ) -> None:
        super().__init__(value_and_grad, x0)
        self._executable = executable
        self._operands = operands  # the executable's last arguments, the same every call
        self._carry = carry0  # the loop's: the optimizer state (and the next row)
        self._done = 0
        self._every = spec.record.every
        self._capacity = min(spec.record.rows, ROWS_PER_CALL)
        # The grouped loop runs whole groups (and the run's last, shorter one).
        self.step_multiple = group

    def advance(self, stop: int) -> Span:
        every = self._every
        begin = self._done
        parts = []
        # On CPU np.asarray views a buffer (~15 us a call, against ~70 us for
        # jax.device_get); the rows are copied out of it.
        host = np.asarray if self._on_cpu else jax.device_get
        while True:
            start = self._done
            end = min(stop, start + self._capacity * every)
            bufs, stopped_at, self._x, self._carry = self._executable(
                self._x, self._carry, np.int32(start), np.int32(end), *self._operands
            )
            stopped_at = self._done = int(host(stopped_at))
            # Slot 0 holds the first recorded step >= start; rows at steps < stopped_at.
            kept = -(-stopped_at // every) - -(-start // every)
            parts.append([np.array(host(b)[:kept]) for b in bufs])
            if stopped_at < end or stopped_at == stop:
                break
        x_rows, loss_rows, grad_rows = (np.concatenate(c) for c in zip(*parts, strict=True))
        steps = np.arange(-(-begin // every) * every, stopped_at, every, dtype=np.int64)
        return Span(steps, x_rows, loss_rows, grad_rows, stopped_at)


def _row_buffers(row: tuple[Any, Any, Any], slots: int) -> tuple[jax.Array, ...]:
    """Zeroed buffers for `slots` rows shaped like `row`: (row x, loss, row grad)."""
    return tuple(jnp.zeros((slots, *value.shape), value.dtype) for value in row)


def _with_row(bufs: tuple, i: Any, row: tuple, every: int, first: Any, spare: int) -> tuple:
    """`bufs` with step i's row (row x, loss, row grad) in slot i // every − first when
    step i is recorded, else in the spare slot."""
    k = jnp.where(i % every == 0, i // every - first, spare)
    return tuple(buf.at[k].set(value) for buf, value in zip(bufs, row, strict=True))


def _flat_loop(
    step: StepFn, observe: Observe, every: int, capacity: int
) -> Callable[..., tuple[Any, ...]]:
    """The per-step loop (for a vector x), as (x, (opt_state, head), start, end, operands) -> ...

    One while_loop over steps start..end-1, the same body for every step, so it may
    start and end at any step; step i records into slot i // every − first. The row of
    step i (its loss, ‖x_i − x*‖ and ‖grad_i‖, "the head") is computed at the end of the
    iteration before, from the x that iteration just updated in place: every reduction
    then reads x after the update, so XLA keeps one x and no copy of it (reductions of
    x_i beside its in-place update cost a copy of x, an n-sized temporary and a pass
    over it each step; x may have 1e7 entries). Step i writes the head to its slot when
    recorded (i % every == 0), else to a spare last slot; a head whose loss is not finite
    leaves x as it was and ends the loop, so x is the state at that loss with no previous
    x carried along. The head is carried from call to call, so each step's row comes from
    the same code whatever the chunks; prepare()'s empty call (end 0) computes x0's.
    `observe(x, operands)` computes the head from `operands` (the problem's data), which
    come in as arguments of the executable: see _apart for why.
    Returns (row buffers, stopped_at, x, (state, head)).
    """

    def run(x0: jax.Array, carry: tuple, start: jax.Array, end: jax.Array, operands: Any) -> tuple:
        state0, head = carry
        # prepare()'s empty call (end 0) computes x0's head
        head = lax.cond(end == 0, observe, lambda _x, _o, _r: head, x0, operands, True)
        first = (start + every - 1) // every

        def cond(c: tuple) -> jax.Array:
            i, _x, _state, _head, ok, _bufs = c
            return (i < end) & ok

        def body(c: tuple) -> tuple:
            i, x, state, (loss, row_x, row_grad), _ok, bufs = c
            bufs = _with_row(bufs, i, (row_x, loss, row_grad), every, first, capacity)
            ok = jnp.isfinite(loss)
            x_next, state_next, _loss, _grad = step(x, state)
            x = jnp.where(ok, x_next, x)
            return i + 1, x, state_next, observe(x, operands, (i + 1) % every == 0), ok, bufs

        loss, row_x, row_grad = head
        bufs = _row_buffers((row_x, loss, row_grad), capacity + 1)
        carry = (start, x0, state0, head, jnp.bool_(True), bufs)
        i, x, state, head, ok, bufs = lax.while_loop(cond, body, carry)
        return bufs, jnp.where(ok, end, i - 1), x, (state, head)

    return run


def _group_loop(
    step: StepFn,
    summary: Summary,
    every: int,
    capacity: int,
    group: int,
) -> Callable[..., tuple[Any, ...]]:
    """The loop for a small x (the scalar problem), as (x, opt_state, start, end) -> ...

    A while_loop over groups of `group` steps (group divides every; start is a multiple
    of it), written out one after the other: a group's first step writes its row (to
    its slot when recorded, else to the spare last slot), and no step has an exit test:
    each only latches the first non-finite loss's step and state, a few selects beside
    the update's own arithmetic, and a group that met one ends the loop. The run's last
    steps that make no whole group run as groups of one. Every step is computed by the
    same code whatever the chunks (they are whole groups), so chunking changes no bit.
    """

    def latched(i: Any, x: jax.Array, state: Any, latch: tuple) -> tuple:
        """Step i, noting in `latch` the step and state of the first non-finite loss."""
        ok, i_bad, x_bad = latch
        x_next, state, loss, grad = step(x, state)
        finite = jnp.isfinite(loss)
        first = ok & ~finite
        latch = (ok & finite, jnp.where(first, i, i_bad), jnp.where(first, x, x_bad))
        return x_next, state, latch, loss, grad

    def run(x0: jax.Array, state0: Any, start: jax.Array, end: jax.Array) -> tuple:
        first = (start + every - 1) // every
        whole = start + (end - start) // group * group  # where the whole groups end

        def steps(size: int) -> tuple[Callable, Callable]:
            """cond and body of a while_loop over groups of `size` steps from i to stop."""

            def cond(c: tuple) -> jax.Array:
                i, stop, latch, *_ = c
                return (i < stop) & latch[0]

            def body(c: tuple) -> tuple:
                i, stop, latch, x, state, bufs = c
                x_i = x
                x, state, latch, loss, grad = latched(i, x, state, latch)
                row_x, row_grad = summary(x_i, grad)
                bufs = _with_row(bufs, i, (row_x, loss, row_grad), every, first, capacity)
                for j in range(1, size):
                    x, state, latch, _loss, _grad = latched(i + j, x, state, latch)
                return i + size, stop, latch, x, state, bufs

            return cond, body

        latch = (jnp.bool_(True), start, jnp.zeros_like(x0))
        row_x, row_grad = jax.eval_shape(summary, x0, x0)
        row = (row_x, jax.ShapeDtypeStruct((), x0.dtype), row_grad)
        carry = (start, whole, latch, x0, state0, _row_buffers(row, capacity + 1))
        carry = lax.while_loop(*steps(group), carry)
        if group > 1:
            carry = lax.while_loop(*steps(1), (carry[0], end, *carry[2:]))
        _i, _stop, (ok, i_bad, x_bad), x, state, bufs = carry
        return bufs, jnp.where(ok, end, i_bad), jnp.where(ok, x, x_bad), state

    return run


class JaxBackend:
    """JAX plugin: jax.grad + hand-written rules for manual, optax for apply and minimize."""

    name: ClassVar[str] = "jax"
    framework: ClassVar[str] = "JAX"

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__}

    def resolved_device(self, requested: str) -> str:
        return str(_device(requested))

    def convention(self, spec: MinimizeSpec) -> Convention:
        return CONVENTION

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        outside = outside_vocabulary(spec)
        if outside:
            return outside
        misfit = option_misfit(spec, {}, ())
        if misfit:
            return misfit
        name = spec.optimizer.name
        if name not in OPTIMIZERS:
            return f"optimizer={name}: backend=jax maps {', '.join(OPTIMIZERS)} to optax"
        try:
            resolve(name, spec.optimizer.lr, spec.optimizer.hyper, CONVENTION)
        except ConfigError as error:
            return BadSetting(str(error))
        return None if spec.rule == "manual" else _convention_gap(name)

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
        update = spec.rule

        def loss_fn(x: jax.Array) -> jax.Array:
            return problem.loss(x, p, OPS)

        value_and_grad = jax.value_and_grad(loss_fn)
        if update == "manual":
            init, rule = manual_rule(opt, lr)
            step = _manual_step(rule, value_and_grad)
        else:
            # lr as a NumPy scalar of the run's dtype, the same value: optax negates it
            # (`-1 * lr`) as it builds the optimizer, which for a jax.Array is an eager
            # op, compiled (~27 ms of a ~70 ms warm-cache prepare), for one number.
            optimizer = native_optimizer(opt, np.asarray(spec.optimizer.lr, dtype=dtype)[()])
            init = optimizer.init
            step = _optax_step(update, loss_fn, value_and_grad, optimizer)
        # Every leaf of the optimizer state (moments, accumulators, Adam's count) on the
        # run's device: init() makes some leaves (the count) on the default device.
        opt_state0 = jax.device_put(init(x0), device)
        x_star = _put(compact(problem.optimum()[0]), dtype, device)  # one number if a broadcast
        summary = _summary(problem, x_star)
        # final(): the state where the run stopped, computed once at its end; the loss and
        # the gradient each from their own operands (see _apart).
        value_and_grad_apart = _apart(problem)
        final_apart = jax.jit(value_and_grad_apart)

        def final_value_and_grad(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return final_apart(x, p, p)

        if spec.mode == "graph":
            capacity = min(spec.record.rows, ROWS_PER_CALL)
            every = spec.record.every
            group = _group(every) if x0.size <= UNROLLED_SIZE else 1
            if x0.size <= UNROLLED_SIZE:
                loop = _group_loop(step, summary, every, capacity, group)
                carry0, operands = opt_state0, ()
            else:
                observe = _observe(value_and_grad_apart)
                # The head's operands: the loss's and the gradient's coefficients, and x*.
                operands = ((p, p, x_star),)
                # The head (loss, row x, row grad), which the empty call below computes.
                head = jax.eval_shape(observe, x0, *operands, True)
                carry0 = (
                    opt_state0,
                    tuple(jnp.zeros(h.shape, h.dtype, device=device) for h in head),
                )
                loop = _flat_loop(step, observe, every, capacity)
            i32 = np.int32(0)
            # x and the loop's carry are donated: the loop runs in their buffers.
            loop = jax.jit(loop, donate_argnums=(0, 1))
            executable = loop.lower(x0, carry0, i32, i32, *operands).compile()
            # An empty chunk: an executable's first run pays one-time costs (~1 ms here).
            # It hands x0 and carry0 back (the per-step loop's with x0's head computed), in
            # the buffers the next call donates.
            _bufs, _i, x0, carry0 = executable(x0, carry0, i32, i32, *operands)
            jax.block_until_ready((x0, carry0, final_value_and_grad(x0)))
            return _CompiledProgram(
                executable, operands, final_value_and_grad, x0, carry0, spec, group
            )

        # The eager steps jit the traceable step (minimize_step, jitted already as the
        # idiom, is inlined into them).
        plain, recorded, start = _eager_steps(step, summary, x0, opt_state0)
        # Warm-up: compile every step, the chunk's rewind and final() here so run_s is
        # steady state, on carries of their own (the steps donate the chunk).
        for fn in {plain, recorded}:
            chunk = fn(*start())[-1]
        jax.block_until_ready((_rewind(chunk), final_value_and_grad(x0)))
        return _EagerProgram((plain, recorded), final_value_and_grad, x0, start())

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


def _summary(problem: Any, x_star: jax.Array) -> Summary:
    """What a recorded row holds: x and grad (scalar problems) or their distances (vectors)."""
    if problem.dim is None:
        return lambda x, grad: (x, grad)
    return functools.partial(_distances, x_star=x_star)


def _distances(x: jax.Array, grad: jax.Array, x_star: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A vector's row: (||x - x*||, ||grad||)."""
    return jnp.linalg.norm(x - x_star), jnp.linalg.norm(grad)


def _apart(problem: Any) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(x, p_loss, p_grad) -> (loss, grad): the loss and the gradient from their own operands.

    The same numbers as jax.value_and_grad, for XLA on the CPU: it sums in YNNPACK
    fusions, and a fusion that cannot take a broadcast of a scalar shared with another
    fusion gets it as an n-sized array, written each time. As closed-over constants,
    the loss's and the gradient's coefficients (b, also the update's) and x* (= c = 1
    in the default problem: equal constants are merged) cost the per-step loop two such
    arrays, written and read every step (14.9 ms a step at n = 1e7 against 6.9-8.3 ms),
    and final() one. Separate arguments of the executable, one per use, are opaque to
    XLA, so none is shared.
    """

    def loss(x: jax.Array, p: Any) -> jax.Array:
        return problem.loss(x, p, OPS)

    def value_and_grad(x: jax.Array, p_loss: Any, p_grad: Any) -> tuple[jax.Array, jax.Array]:
        return loss(x, p_loss), jax.grad(loss)(x, p_grad)

    return value_and_grad


def _observe(value_and_grad: Callable[..., tuple[jax.Array, jax.Array]]) -> Observe:
    """A vector's head (loss, ||x - x*||, ||grad||) from x and (p_loss, p_grad, x*).

    Every step needs the loss (a non-finite one ends the run); the distances only a
    recorded step. XLA on the CPU sums each in a fusion of its own, a pass over x each,
    so an unrecorded step skips two of the three passes (its distances are zeros, never
    written to a recorded slot).
    """

    def distances(x: jax.Array, operands: tuple) -> tuple[jax.Array, jax.Array]:
        p_loss, p_grad, x_star = operands
        _loss, grad = value_and_grad(x, p_loss, p_grad)
        return _distances(x, grad, x_star)

    def skipped(x: jax.Array, _operands: tuple) -> tuple[jax.Array, jax.Array]:
        zero = jnp.zeros((), x.dtype)
        return zero, zero

    def observe(
        x: jax.Array, operands: tuple, recorded: Any
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        p_loss, p_grad, _x_star = operands
        loss, _grad = value_and_grad(x, p_loss, p_grad)
        return loss, *lax.cond(recorded, distances, skipped, x, operands)

    return observe


def _enable_dtype(name: str) -> Any:
    """The run's dtype; jax_enable_x64 (process-wide) on for float64, off for float32.

    Off again for float32, so that a run's numbers do not depend on what ran before it
    in the process (a sweep's worker, the benchmark): optax's Adam takes its bias
    correction from Python-float betas and an int32 count, which x64 computes in
    float64. A float32 run after a float64 one ended at x = 0.049694285 after 50 steps
    (adam, lr 0.001), the same run in a fresh process at 0.049693957.
    """
    x64 = name == "float64"
    if jax.config.jax_enable_x64 != x64:
        jax.config.update("jax_enable_x64", x64)
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
