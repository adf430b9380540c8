"""TensorFlow backend: the reference notebook's GradientTape code, one mode at a time.

Each mode is written the way the notebook writes it, so the numbers it prints are the
numbers we get: manual is In [29] (`x.assign_add(-lr * dx)`), apply is In [32]
(`opt.apply_gradients`), minimize is In [35] (`opt.minimize(f, [x])`), and graph is
In [38]/[41] (a `tf.function` over the loop, called once per chunk of steps).

The optimizers come from `tf_keras` (Keras 2): Keras 3, which is `tf.keras` from
TF 2.16 on, has no `minimize`, and its SGD is a different implementation. Apply,
minimize and graph(apply|minimize) run Keras 2's SGD, Adam, Adagrad and RMSprop with
every hyperparameter given explicitly from `runner.optimizers.resolve`, or with
`legacy_optimizers` its `tf_keras.optimizers.legacy` ones (TF <= 2.10's tf.keras
optimizers, the notebook's own, whose updates are fused C++ kernels); manual mode (and
graph update=manual) writes each rule out in TensorFlow ops following the run's
convention (`CONVENTIONS["tf"]` or `["tf_legacy"]`), so manual against apply checks
Keras' implementation. Vector
problems (problem.dim set) record ||x_i - x*|| and ||grad_i|| in place of x_i, grad_i.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from runner.errors import BadSetting, ConfigError, not_allowed
from runner.optimizers import (
    CONVENTIONS,
    Convention,
    Resolved,
    eps_placement,
    resolve,
    rule_convention,
)
from runner.problems import compact
from runner.protocol import (
    Derivatives,
    DerivativesSpec,
    MinimizeSpec,
    Span,
    option_misfit,
    outside_vocabulary,
)
from runner.provenance import backend_default

FRAMEWORK = "TensorFlow"

# Quiet TensorFlow's C++ INFO/WARNING logs; must be set before the import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `import tensorflow` loads Keras's optimizers eagerly: Keras 3's by default (~1.8 s
# here, scikit-learn included), which this backend never uses. With legacy Keras it
# loads tf_keras's instead, the ones this backend needs anyway; tf.keras is Keras 2
# then, as in the notebook. A value the user set is kept.
backend_default(FRAMEWORK, "TF_USE_LEGACY_KERAS", "1")

# Start-up lines TensorFlow writes to fd 2 before its log level applies (absl prints them
# before InitializeLog), and the cuInit failure every GPU-less machine reports.
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog"
    r"|[IW]0000 .*\b(port|cudart_stub|cpu_feature_guard)\.cc"
    r"|To enable the following instructions:"
    r"|E0000 .*failed call to cuInit"
)


@contextmanager
def _quiet_native_startup() -> Iterator[None]:
    """Hold fd 2 while TensorFlow starts; pass on every line that is not known noise.

    If the import fails, everything it printed is passed on unfiltered.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if failed or not _STARTUP_NOISE.search(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


@contextmanager
def _without_tflite_jax() -> Iterator[None]:
    """Keep JAX out of `import tensorflow`, which imports it when it is installed.

    tensorflow.lite's util does `from jax import jit` (in a try, for TFLite's JAX
    converter) as TensorFlow starts: ~0.6 s of JAX's import that a TF run never uses. A
    None in sys.modules makes that import fail as if JAX were absent, for the duration
    of TensorFlow's import only; `import jax` later in the process works as usual.
    """
    if "jax" in sys.modules:  # imported already (a worker that ran JAX jobs): no cost
        yield
        return
    sys.modules["jax"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("jax") is None:  # ours, not a JAX that was imported meanwhile
            sys.modules.pop("jax", None)


with _quiet_native_startup(), _without_tflite_jax():
    import tensorflow as tf
    import tf_keras

    tf.config.list_physical_devices()  # device discovery: where cuInit complains


class _NoRetracingWarningPerRun(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning about our programs.

    Each run builds its own loop function and traces it once; TF counts traces per
    Python code object, so the runs of one process (an Optuna search, a sweep's worker)
    add up to "frequent retracing" that no run does.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message and "_GraphProgram" in message)


tf.get_logger().addFilter(_NoRetracingWarningPerRun())

# Backend options (backend.<key>), all true/false.
_OPTIONS = ("jit_compile", "legacy_optimizers")

# The problems' reductions, from TensorFlow (problem.loss(x, p, ops)).
_OPS = SimpleNamespace(sum=tf.reduce_sum, matvec=tf.linalg.matvec)


def _convention(spec: MinimizeSpec) -> Convention:
    """Where the run's Keras 2 optimizers put epsilon, their defaults, Adagrad's first sum.
    The hand-written rule (mode=manual, update=manual) follows legacy_optimizers only where
    the legacy convention changes it (Adagrad, RMSprop without momentum): elsewhere the
    rule that ran is the plain one, and its record says so."""
    plain = CONVENTIONS["tf"]
    if not spec.options.get("legacy_optimizers"):
        return plain
    legacy = CONVENTIONS["tf_legacy"]
    if spec.rule != "manual":
        return legacy
    return rule_convention(spec.optimizer, legacy, plain, False)


# (loss, x, grad) as TensorFlow values.
Values = tuple[Any, Any, Any]
# What one update returns: (loss_i, grad_i, x_i or None), see _Run.loss().
Step = tuple[Any, Any, Any]


def _tf_dtype(name: str) -> tf.DType:
    return tf.float64 if name == "float64" else tf.float32


def _coefficients(problem: Any, dtype: tf.DType) -> dict[str, tf.Tensor]:
    """The problem's coefficients as constants of the run dtype, like the notebook's a, b, c."""
    return {k: tf.constant(v, dtype=dtype) for k, v in problem.coefficients.items()}


def _vector_constant(value: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """A float64 array (x0) in the run's dtype, with no host copy of size n on the way.

    One number broadcast (x0_array's view of a scalar x0) is filled in on the device;
    other arrays are cast by NumPy first, not converted to a float64 tensor and cast.
    """
    one = compact(value)
    if np.ndim(one) == 0 and np.ndim(value) > 0:
        return tf.fill(np.shape(value), tf.constant(one, dtype))
    return tf.constant(np.asarray(value, dtype.as_numpy_dtype))


class _Observed:
    """Keras 2 optimizer that keeps the gradients it is handed, so minimize mode can report grad_i.

    Keras 2's `minimize` is `compute_gradients` + `self.apply_gradients`; keeping a
    reference to what reaches apply_gradients changes no arithmetic.
    """

    last_grads: list[Any]

    def apply_gradients(self, grads_and_vars: Any, *args: Any, **kwargs: Any) -> Any:
        grads_and_vars = list(grads_and_vars)
        # Not `self.last_grads = ...`: Keras tracks a list assigned to an attribute
        # (wraps it in a ListWrapper, a dependency of the optimizer), ~50 us a step eagerly.
        object.__setattr__(self, "last_grads", [grad for grad, _ in grads_and_vars])
        return super().apply_gradients(grads_and_vars, *args, **kwargs)  # type: ignore[misc]


def _observed(optimizers: Any) -> dict[str, type]:
    return {
        name: type(f"_Observed{cls.__name__}", (_Observed, cls), {})
        for name, cls in {
            "sgd": optimizers.SGD,
            "adam": optimizers.Adam,
            "adagrad": optimizers.Adagrad,
            "rmsprop": optimizers.RMSprop,
        }.items()
    }


# (legacy_optimizers, name) -> the optimizer class.
_NATIVE: dict[tuple[bool, str], type] = {
    (legacy, name): cls
    for legacy, module in ((False, tf_keras.optimizers), (True, tf_keras.optimizers.legacy))
    for name, cls in _observed(module).items()
}


def _native_settings(opt: Resolved, dtype: str) -> dict[str, Any]:
    """Our vocabulary -> the Keras 2 constructor's names, every value given explicitly.

    For float64 runs the values are NumPy float64 scalars: Keras 2 does
    `tf.cast(self.momentum, dtype)` (and the same for Adam's betas), and a Python float
    would reach that cast as a float32 tensor, so the run would step with float32(0.9).
    float32 runs get Python floats, rounded once to float32 as the float64 scalars would
    be (`1 - beta_1`, `rho * velocity`, `+ epsilon` alike), with no cast op: that cast
    of a float64 scalar is one more eager op every step (~25 us, 2% of an SGD step).
    """
    f = np.float64 if dtype == "float64" else float
    if opt.name == "sgd":
        return {"momentum": f(opt["momentum"]), "nesterov": bool(opt["nesterov"])}
    if opt.name == "adam":
        return {"beta_1": f(opt["beta1"]), "beta_2": f(opt["beta2"]), "epsilon": f(opt["eps"])}
    if opt.name == "adagrad":
        return {
            "initial_accumulator_value": f(opt["initial_accumulator"]),
            "epsilon": f(opt["eps"]),
        }
    return {"rho": f(opt["rho"]), "momentum": f(opt["momentum"]), "epsilon": f(opt["eps"])}


def _make_optimizer(opt: Resolved, dtype: str, legacy: bool, x: tf.Variable) -> Any:
    """The native Keras 2 optimizer (the notebook's `SGD(learning_rate=lr)` for sgd), its
    slots for x made now, not inside the timed loop (no update).

    Keras 2 stores the learning rate in a variable of `floatx()` (float32) and casts it
    to the variable's dtype at each step, so float64 runs would step with
    float32(lr). Building it under floatx=float64 keeps lr exact there.
    `jit_compile=False`: Keras 2 would otherwise XLA-compile the update on a GPU
    (only), which fuses `x + (-g * lr)` and changes the last bit between devices.
    """
    if legacy:
        return _make_legacy_optimizer(opt, dtype, x)
    saved = tf_keras.backend.floatx()
    tf_keras.backend.set_floatx(dtype)
    try:
        optimizer = _NATIVE[False, opt.name](
            learning_rate=opt.lr, jit_compile=False, **_native_settings(opt, dtype)
        )
    finally:
        tf_keras.backend.set_floatx(saved)
    optimizer.build([x])
    return optimizer


def _make_legacy_optimizer(opt: Resolved, dtype: str, x: tf.Variable) -> Any:
    """The legacy optimizer, its slots and hyperparameter variables made now.

    Legacy Keras keeps the learning rate, momentum, betas and rho in float32 variables
    whatever floatx says, cast to the variable's dtype at each step (epsilon and
    Adagrad's first sum are converted to it directly); a float64 run hands them over as
    float64 tensors, which it keeps as they are. SGD's momentum stays a number where it
    is 0: a tensor would switch on its momentum kernel. There is no public call that
    builds one: apply_gradients makes its variables on first use with this one.
    """
    settings: dict[str, Any] = {"learning_rate": opt.lr, **_native_settings(opt, dtype)}
    if dtype == "float64":
        for key in _LEGACY_HYPERPARAMETERS.intersection(settings):
            if settings[key] != 0:
                settings[key] = tf.constant(settings[key], tf.float64)
    optimizer = _NATIVE[True, opt.name](**settings)
    optimizer._create_all_weights([x])
    return optimizer


# What tf_keras.optimizers.legacy keeps in (float32) variables.
_LEGACY_HYPERPARAMETERS = frozenset({"learning_rate", "momentum", "beta_1", "beta_2", "rho"})


class _Manual:
    """The update rules written out in TensorFlow ops, following the run's convention.

    The same formulas as runner.reference (not Keras' code), so manual against apply
    checks Keras' implementation. The state lives in variables made here, on the run's
    device; `t` counts updates from 1 as in the papers.
    """

    def __init__(
        self, opt: Resolved, convention: Convention, x: tf.Variable, dtype: tf.DType
    ) -> None:
        self.opt = opt
        # all it reads of the convention: where eps goes, and the dtype of 1 - beta,
        # 1 - rho (TF's rule computes Adam's bias correction in the run's dtype whatever
        # the convention says). The legacy convention reaches it only where its rule is
        # the legacy one (rule_convention: RMSprop without momentum), whose record then
        # says tf_legacy: 1 - rho in the run's dtype, as that record says.
        self.form = eps_placement(opt.name, float(opt.values.get("momentum") or 0), convention)
        self.complement_in_dtype = convention.decay_complement == "run dtype"
        self.name = opt.name
        self.dtype = dtype
        self.lr = self._c(opt.lr)
        # The notebook's `-lr` (In [29]: `x.assign_add(- lr * dx)`), negated once: eagerly
        # each `-lr` is an op of its own, every step. Negation is exact: the same product.
        self.neg_lr = self._c(-opt.lr)
        self.t = tf.Variable(0, dtype=tf.int64, trainable=False, name="t")

        def slot(name: str, value: float = 0.0) -> tf.Variable:
            return tf.Variable(tf.fill(tf.shape(x), self._c(value)), trainable=False, name=name)

        self.state: dict[str, tf.Variable] = {}
        if opt.name == "sgd" and opt["momentum"]:
            self.state["buf"] = slot("buf")
        elif opt.name == "adam":
            self.state.update(m=slot("m"), v=slot("v"))
        elif opt.name == "adagrad":
            self.state["acc"] = slot("acc", opt["initial_accumulator"])
        elif opt.name == "rmsprop":
            self.state["ms"] = slot("ms")
            if opt["momentum"]:
                self.state["buf"] = slot("buf")

    def _c(self, value: float) -> tf.Tensor:
        """A hyperparameter (or 1 - one, computed in float64) as a constant of the run dtype."""
        return tf.constant(value, dtype=self.dtype)

    def _complement(self, decay: float) -> tf.Tensor:
        """1 - decay as the convention computes it (Convention.decay_complement)."""
        return self._c(1) - self._c(decay) if self.complement_in_dtype else self._c(1 - decay)

    def _root(self, accumulated: tf.Tensor, eps: tf.Tensor, form: str) -> tf.Tensor:
        return tf.sqrt(accumulated + eps) if form == "inside" else tf.sqrt(accumulated) + eps

    def update(self, x: tf.Variable, g: tf.Tensor) -> None:
        opt, s, lr, c = self.opt, self.state, self.lr, self._c
        if self.name == "sgd":
            if not opt["momentum"]:
                x.assign_add(self.neg_lr * g)  # the notebook's In [29], bit for bit
                return
            mu = c(opt["momentum"])
            buf = s["buf"].assign(mu * s["buf"] + g)
            x.assign_sub(lr * (g + mu * buf if opt["nesterov"] else buf))
        elif self.name == "adam":
            b1, b2, eps = opt["beta1"], opt["beta2"], c(opt["eps"])
            t = tf.cast(self.t.assign_add(1), self.dtype)
            m = s["m"].assign(c(b1) * s["m"] + self._complement(b1) * g)
            v = s["v"].assign(c(b2) * s["v"] + self._complement(b2) * g * g)
            bias1, bias2 = 1 - tf.pow(c(b1), t), 1 - tf.pow(c(b2), t)
            if self.form == "corrected":
                x.assign_sub(lr * (m / bias1) / (tf.sqrt(v / bias2) + eps))
            else:  # Keras' epsilon-hat: the bias correction folded into the step size
                x.assign_sub(lr * tf.sqrt(bias2) / bias1 * m / (tf.sqrt(v) + eps))
        elif self.name == "adagrad":
            acc = s["acc"].assign_add(g * g)
            x.assign_sub(lr * g / self._root(acc, c(opt["eps"]), self.form))
        else:  # rmsprop
            rho = opt["rho"]
            ms = s["ms"].assign(c(rho) * s["ms"] + self._complement(rho) * g * g)
            direction = g / self._root(ms, c(opt["eps"]), self.form)
            if opt["momentum"]:
                direction = s["buf"].assign(c(opt["momentum"]) * s["buf"] + direction)
            x.assign_sub(lr * direction)


class _Run:
    """State shared by every mode: device, dtype, x, coefficients, the optimizer's state."""

    def __init__(self, spec: MinimizeSpec, device: str) -> None:
        problem = spec.problem
        self.spec = spec
        self.device = device
        self.dtype = _tf_dtype(spec.dtype)
        self.np_dtype = np.dtype(spec.dtype)
        self.vector = problem.dim is not None
        self.kind = spec.rule
        self.keep_x = not self.vector or spec.mode == "graph"  # see loss()
        convention = _convention(spec)
        opt = resolve(spec.optimizer.name, spec.optimizer.lr, spec.optimizer.hyper, convention)
        with tf.device(device):
            self.p = _coefficients(problem, self.dtype)
            self.x = tf.Variable(_vector_constant(problem.x0_array(), self.dtype), name="x")
            # x* for the recorded distance ||x_i - x*|| of vector problems; one number
            # when it is one broadcast (scalar coefficients).
            x_star = compact(problem.optimum()[0])
            self.x_star = tf.constant(x_star, self.dtype) if self.vector else None
            self.manual = self.opt = None
            if self.kind == "manual":
                self.manual = _Manual(opt, convention, self.x, self.dtype)
            else:
                legacy = bool(spec.options.get("legacy_optimizers"))
                self.opt = _make_optimizer(opt, spec.dtype, legacy, self.x)

    def loss(self) -> tuple[tf.Tensor, tf.Tensor | None]:
        """The notebook's no-argument `f()`, with the x it saw: (loss_i, x_i).

        x is read once, for the loss and as the step's recorded x_i: each read of a
        variable is an op (up to ~27 us eager here), and the expression's two uses of x would read
        it twice, the row a third time. The read is a snapshot, the update after it
        leaves it alone. An eager run of a vector drops it (None): kept across the
        update, it would make the update copy x instead of writing it in place.
        """
        x = self.x.value()
        return self.spec.problem.loss(x, self.p, _OPS), (x if self.keep_x else None)

    def loss_and_grad(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
        """(loss_i, grad_i, x_i), x_i as loss() gives it."""
        with tf.GradientTape() as tape:
            loss, x = self.loss()
        return loss, tape.gradient(loss, self.x), x

    def distance(self, x: Any) -> tf.Tensor:
        """||x - x*||_2, what vector problems record in place of x."""
        return tf.norm(x - self.x_star)

    def row(self, x: Any, grad: Any) -> tuple[Any, Any]:
        """What a recorded row holds: (x, grad), or (||x - x*||, ||grad||) for vectors."""
        return (self.distance(x), tf.norm(grad)) if self.vector else (x, grad)

    # One update each, returning (loss_i, grad_i, x_i) at the point before the update
    # (x_i as loss() gives it). They run eagerly (EagerProgram) and inside the compiled
    # loop (graph mode).

    def update_manual(self) -> Step:
        loss, grad, x = self.loss_and_grad()
        self.apply(grad)
        return loss, grad, x

    def update_apply(self) -> Step:
        loss, grad, x = self.loss_and_grad()
        self.apply(grad)
        return loss, grad, x

    def apply(self, grad: tf.Tensor) -> None:
        """The update of manual and apply, from a gradient computed before it."""
        if self.manual is not None:
            self.manual.update(self.x, grad)
        else:
            self.opt.apply_gradients([(grad, self.x)])  # type: ignore[union-attr]

    def update_minimize(self) -> Step:
        """`opt.minimize(f, [x])`; f hands us the loss it computed, before the update.

        The gradient is the one minimize itself computed and applied, seen by
        `_Observed.apply_gradients`: no second differentiation, same arithmetic.
        """
        seen: list[tuple[tf.Tensor, tf.Tensor | None]] = []

        def f() -> tf.Tensor:
            seen.append(self.loss())
            return seen[0][0]

        self.opt.minimize(f, [self.x])  # type: ignore[union-attr]
        (loss, x), grad = seen[0], self.opt.last_grads[0]  # type: ignore[union-attr]
        return loss, grad, x

    def updater(self) -> Callable[[], Step]:
        return {
            "manual": self.update_manual,
            "apply": self.update_apply,
            "minimize": self.update_minimize,
        }[self.kind]

    def final(self) -> Values:
        with tf.device(self.device):
            loss, grad, _x = self.loss_and_grad()
            return loss, self.x.read_value(), grad


class _Program:
    """What eager and graph programs share: the run's state, read by final() and to_numpy()."""

    _run: _Run

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        # Stack on the run's device, then one transfer to the host; one value (the final
        # x or grad, n entries) goes as it is: stacking would copy it (and cost an op).
        if isinstance(values[0], np.generic):  # an eager CPU chunk's, already on the host
            return np.asarray(values, dtype=self._run.np_dtype)
        if len(values) == 1:
            return np.asarray(values[0].numpy(), dtype=self._run.np_dtype)[np.newaxis]
        with tf.device(self._run.device):
            stacked = tf.stack(list(values))
        return np.asarray(stacked.numpy(), dtype=self._run.np_dtype)

    def final(self) -> Values:
        return self._run.final()


class _EagerProgram(_Program):
    """manual | apply | minimize, one eager step at a time (TF eager: ~300 us a step).

    Recorded steps return x_i and grad_i for the scalar problem, and the summaries
    ||x_i - x*|| and ||grad_i|| for vector problems (x may have 1e7 entries). On the CPU
    they are NumPy scalars at once, not tensors held to the chunk's end and stacked then
    (as torch's eager steps hand over floats): holding and stacking them cost ~17 us a
    step, numpy() and holding scalars ~5 (manual, 3000 steps, one process); runner /
    hand-written 0.3-1.4% lower in two alternated pairs of manual, apply and minimize.
    On a GPU numpy() would wait for the device every step, so there the tensors wait.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._on_host = tf.DeviceSpec.from_string(run.device).device_type == "CPU"
        self._update = run.updater()
        # A tf.device scope costs ~30 us a step (5% of an SGD step here); it is left out
        # where TF eager puts ops anyway (the first GPU if there is one, else the CPU).
        self._scoped = run.device != _device_name("auto")

    def step(self, record: bool) -> Values:
        if self._scoped:
            with tf.device(self._run.device):
                return self._step(record)
        return self._step(record)

    def _step(self, record: bool) -> Values:
        run = self._run
        # A vector's row is its distance to x*, taken before the update writes x.
        distance = run.distance(run.x) if record and run.vector else None
        loss, grad, x_i = self._update()
        if record and run.vector:
            x_i, grad = distance, tf.norm(grad)
        if not self._on_host:
            return loss, x_i, grad
        if not record:
            return loss.numpy(), None, None
        return loss.numpy(), x_i.numpy(), grad.numpy()


# Loops over an x of at most UNROLLED_SIZE entries run steps in groups of up to UNROLL
# written out one after the other, with no per-step exit test; without XLA, groups of at
# least GROUP_WITHOUT_XLA steps (see _GraphProgram).
UNROLL = 12
UNROLLED_SIZE = 16
GROUP_WITHOUT_XLA = 4
# Rows one call hands back at most; advance() splits a longer span into several calls.
ROWS_PER_CALL = 1 << 14


def _group(every: int, xla: bool) -> int:
    """Steps a loop iteration runs, such that its recorded steps sit where j % every == 0.

    The largest divisor of `every` up to UNROLL (a group's first step is its only
    recorded one); without XLA, where that is under GROUP_WITHOUT_XLA, the largest
    multiple of `every` up to UNROLL instead (every = 1: 12 steps, each writing its row).
    """
    divisor = max(d for d in range(1, min(every, UNROLL) + 1) if every % d == 0)
    if xla or divisor >= GROUP_WITHOUT_XLA:
        return divisor
    return max(divisor, UNROLL // every * every)


@contextmanager
def _op_by_op(on: bool) -> Iterator[None]:
    """Grappler's arithmetic optimizer off for the calls inside (if on), as it was after.

    It rewrites expressions (the loss's sum among them) into forms that round
    differently, and whether it can depends on the rest of the graph: the loop over
    groups of steps without XLA recorded the loss at step 7 of the notebook's problem one
    ulp off the per-step loop's and the eager run's (0.7536419 against 0.75364196). Off,
    a graph computes each op as eager TensorFlow does. Loops over x of at most
    UNROLLED_SIZE entries turn it off, grouped or not, so that record_every changes no
    bit; a larger x keeps it: its rewrite of Pow(x, 2) into Square(x) (the same bits)
    is what makes such a loop fast (n = 1e7: 47.6 ms a step with it, 145.6 without),
    and there rows may differ from eager's in the last bit. The setting is read when a
    function is called (it goes into the call op), not when it is traced, so it is set
    around every call.
    """
    if not on:
        yield
        return
    saved = tf.config.optimizer.get_experimental_options().get("arithmetic_optimization")
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"arithmetic_optimization": saved})


class _GraphProgram(_Program):
    """The loop in one `tf.function` (optionally XLA), called once per chunk.

    The function takes the chunk's first and end step as tensors of a fixed signature,
    so prepare()'s empty call traces (and with XLA compiles) it once and every chunk
    reuses it; x and the optimizer's state are variables, so a chunk goes on where the
    last one stopped, and only the chunk's rows cross to the host (each call also
    computes the state where it stopped, kept as TensorFlow values until final() is
    asked for at the run's end). Rows go into preallocated variables of `rows + 1`
    slots, written in place.

    The chunk is one `tf.while_loop` over its steps that stops at the first non-finite
    loss, so it may start and end at any step (without XLA every op costs ~1 us of
    graph-executor overhead, so this short per-step test is the cheap loop): each step
    writes its row with one scatter op per variable, to its slot when recorded and to
    the spare last slot otherwise, so the body has no branch and the same ops whatever
    the record plan (Grappler rewrites nested loop bodies differently, which moved
    recorded losses by an ulp). Vector problems record the summaries ||x_i - x*|| and
    ||grad_i|| (with every > 1, in a `tf.cond` that computes them on recorded steps
    only). So that a loop stopped by a non-finite loss can hand back the state there,
    a vector's update=manual|apply step updates x only after a finite loss, or x_i is
    copied into one more variable before each update (update=minimize, which computes
    the loss inside the update). With XLA, a vector's loop computes each row after the
    update before it instead, and needs no copy (_head_chunk).

    With a small x (the scalar problem) the chunk runs groups of steps instead (see
    `_group`: a divisor of every, whose first step writes the row, or without XLA a
    multiple of it, whose recorded steps write theirs) with no per-step exit test; the
    group notes the first non-finite loss's step and x (with XLA selects fused with
    the steps, see _group_chunk; without XLA a few ops a group, counting the finite
    losses before the first that is not); the steps after the chunk's last whole group
    test each step. Without XLA a group saves the loop's own ops per iteration (each loop
    variable passes Merge, Switch, Identity and NextIteration) and, for a divisor of
    every, the row's scatters: at every = 20 (groups of 10) 7.1-7.7 us a step against
    13.2-13.8 for the per-step loop (the notebook's loop 7.7-8.4); with selects every
    step it was 9.2-9.8. Groups of 2 were no faster than the per-step loop (14.0-15.3
    against 13.2-14.5), so a divisor under GROUP_WITHOUT_XLA gives way to a multiple of
    every (every = 1, 5000 steps: 1.16-1.39 times the notebook's loop, 1.43-1.50 per step).
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        spec = run.spec
        self._every = spec.record.every
        self._update = run.updater()
        self._xla = jit_compile = bool(spec.options.get("jit_compile", False))
        group = _group(self._every, jit_compile)
        small = run.x.shape.num_elements() <= UNROLLED_SIZE
        grouped = small and (jit_compile or group >= GROUP_WITHOUT_XLA)
        # Steps a loop iteration runs (`_group`); 1 for the per-step loop, which can stop
        # anywhere.
        self.step_multiple = group if grouped else 1
        self._ops_as_eager = small and not jit_compile
        self._done = 0
        self._rows_n = spec.record.rows
        # A call hands back a window of this many rows (all of them, up to ROWS_PER_CALL).
        self._window = min(self._rows_n + 1, ROWS_PER_CALL)
        with tf.device(run.device):
            self._buffers = [
                tf.Variable(tf.zeros([self._rows_n + 1], run.dtype), trainable=False)
                for _ in ("x", "loss", "grad")
            ]
            # A vector loop keeps x_i aside, to hand back the state at a non-finite loss:
            # minimize computes the loss and updates x in one call (without XLA; with XLA,
            # the grouped loop's per-step tail, x of up to UNROLLED_SIZE entries). Without
            # XLA, manual and apply update only after a finite loss instead (see _step),
            # with no copy: 1.6-2.2 ms a step against 2.0-2.7 at 1e6 entries, 34-42
            # against 41-45 ms at 1e7, one n-sized variable less. With XLA a larger x
            # needs neither (_head_chunk): its row, computed after the update before it,
            # is kept between calls in `_head`.
            headed = jit_compile and run.vector and not grouped
            self._x_prev = (
                tf.Variable(tf.zeros_like(run.x), trainable=False, name="x_prev")
                if run.vector and (grouped or (not jit_compile and run.kind == "minimize"))
                else None
            )
            self._head = (
                [tf.Variable(tf.zeros([], run.dtype), trainable=False) for _ in range(3)]
                if headed
                else None
            )
        i32 = tf.TensorSpec([], tf.int32)
        chunk = self._group_chunk if grouped else self._head_chunk if headed else self._flat_chunk
        self._fn = tf.function(
            chunk, input_signature=[i32, i32], jit_compile=jit_compile, reduce_retracing=False
        )
        # Trace/compile now, with an empty chunk: no step runs, so x and the optimizer stay
        # fresh. Twice: the first call after tracing costs ~0.5 ms more than later ones.
        for _ in range(2):
            empty = self._call(0, 0)
        # (loss, x, grad) where the last call stopped (x0 here), as TensorFlow values: the
        # call computes them in its graph (a call of its own costs ~0.5 ms), and they reach
        # the host only as the run's final state.
        self._final: Values | None = empty["final"]

    def final(self) -> Values:
        return self._final if self._final is not None else self._run.final()

    def _call(self, start: int, end: int) -> dict:
        """The chunk function over steps start..end-1, Grappler set as `_op_by_op` says."""
        with _op_by_op(self._ops_as_eager):
            return self._fn(tf.constant(start, tf.int32), tf.constant(end, tf.int32))

    # -- one loop over the chunk's steps -----------------------------------------------------

    def _slot(self, i: tf.Tensor) -> tf.Tensor:
        """Row i // every when step i is recorded, else the spare last row."""
        if self._every == 1:
            return i
        return tf.where(i % self._every == 0, i // self._every, self._rows_n)

    def _write_row(self, i: tf.Tensor, row_x: Any, loss: Any, row_grad: Any) -> None:
        """Step i's row into its slot (`_slot`): one scatter per buffer."""
        slot = self._slot(i)
        for buffer, value in zip(self._buffers, (row_x, loss, row_grad), strict=True):
            buffer.scatter_update(tf.IndexedSlices(value, slot))

    def _step(self, i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """One update: (row x, loss_i, row grad) for step i."""
        run = self._run
        if not run.vector:
            loss, grad, x_i = self._update()
            return x_i, loss, grad
        x_prev = self._x_prev
        if x_prev is None:  # manual, apply: x stays at x_i when its loss is not finite
            loss, grad, x_i = run.loss_and_grad()
            dist, grad_norm = self._summaries(i, lambda: run.row(x_i, grad))
            # After the row: x_i is read and can be written in place.
            with tf.control_dependencies([dist, grad_norm]):
                tf.cond(tf.math.is_finite(loss), lambda: run.apply(grad), lambda: None)
            return dist, loss, grad_norm
        # The copy is made before the update writes x, so that write can be in place.
        with tf.control_dependencies([x_prev.assign(run.x, read_value=False)]):
            loss, grad, _x = self._update()
        dist, grad_norm = self._summaries(i, lambda: run.row(x_prev.read_value(), grad))
        return dist, loss, grad_norm

    def _summaries(self, i: tf.Tensor, summaries: Callable[[], tuple]) -> tuple:
        """A vector's row (||x_i - x*||, ||grad_i||): `summaries()` on recorded steps only.

        Each norm is a pass over x (XLA does not merge sibling sums), so an unrecorded
        step skips two; its zeros land in the spare slot.
        """
        if self._every == 1:
            return summaries()
        zero = tf.zeros([], self._run.dtype)
        return tf.cond(i % self._every == 0, summaries, lambda: (zero, zero))

    def _flat_loop(self, start: tf.Tensor, stop: tf.Tensor) -> tuple:
        """Steps start..stop-1, stopping after the first non-finite loss.

        Returns (ok, the step of the last loss, x there).
        """

        def cond(i: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
            return tf.logical_and(ok, i < stop)

        def body(i: tf.Tensor, ok: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            row_x, loss, row_grad = self._step(i)
            # A row written at the stopping step lands in a slot that advance() drops.
            self._write_row(i, row_x, loss, row_grad)
            return i + 1, tf.math.is_finite(loss)

        i, ok = tf.while_loop(cond, body, (start, tf.constant(True)))
        last = i - 1
        # The x of that step: its row (scalar problems: the spare slot holds unrecorded
        # steps) or x_prev (vectors that keep it); None where x stopped there itself
        # (vectors updated only after a finite loss, see _step).
        if not self._run.vector:
            x_last = tf.gather(self._buffers[0], self._slot(tf.maximum(last, 0)))
        else:
            x_last = None if self._x_prev is None else self._x_prev.read_value()
        return ok, last, x_last

    def _flat_chunk(self, start: tf.Tensor, stop: tf.Tensor) -> dict:
        with tf.device(self._run.device):
            ok, last, x_last = self._flat_loop(start, stop)
            return self._finish(start, ok, tf.where(ok, stop, last), x_last)

    def _window_start(self, start: Any) -> Any:
        """The first row of a call's window: its first recorded step's (kept in bounds)."""
        first_row = (start + self._every - 1) // self._every
        last_start = self._rows_n + 1 - self._window
        minimum = tf.minimum if tf.is_tensor(start) else min
        return minimum(first_row, last_start)

    def _finish(
        self, start: tf.Tensor, ok: tf.Tensor, stopped_at: tf.Tensor, x_stop: tf.Tensor | None
    ):
        """The call's outputs: the step it stopped at, its rows' window, the state there.

        Stopped by a non-finite loss, x went on past that step: x_stop is put back
        (None: x did not go on).
        """
        run = self._run
        if x_stop is not None:
            run.x.assign(tf.where(ok, run.x.read_value(), x_stop))
        loss, grad, _x = run.loss_and_grad()
        begin = self._window_start(start)
        return {
            "stopped_at": stopped_at,
            # A gather: with XLA, tf.slice's begin would be a compile-time constant.
            "rows": tf.stack([tf.gather(b, begin + tf.range(self._window)) for b in self._buffers]),
            "final": (loss, run.x.read_value(), grad),
        }

    # -- with XLA, a vector x: each step's row computed after the update before it -----------

    def _head_chunk(self, start: tf.Tensor, end: tf.Tensor) -> dict:
        """Steps start..end-1, stopping at the first non-finite loss, with no copy of x.

        The row of step i (loss, ||x_i - x*||, ||grad_i||, "the head") is computed at the
        end of the iteration before, from x just updated; the loop runs while the head's
        loss is finite, so it stops with x at that loss (nothing to put back) and writes
        that row after it. The head is kept between calls (the first call computes x0's).
        With the x_i of every step copied aside instead (to hand back the state at a
        non-finite loss), XLA wrote a copy of x and read it back every step.
        """
        run = self._run

        def observe(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            """Step i's head: the loss, and its distances if step i is recorded."""

            def summaries() -> tuple[tf.Tensor, tf.Tensor]:
                _loss, grad, x = run.loss_and_grad()
                return run.row(x, grad)

            return run.loss()[0], *self._summaries(i, summaries)

        def write(i: tf.Tensor, loss: tf.Tensor, dist: tf.Tensor, grad_norm: tf.Tensor) -> None:
            self._write_row(i, dist, loss, grad_norm)

        def cond(i: tf.Tensor, loss: tf.Tensor, *_: tf.Tensor) -> tf.Tensor:
            return tf.logical_and(i < end, tf.math.is_finite(loss))

        def body(i: tf.Tensor, *head: tf.Tensor) -> tuple:
            write(i, *head)
            self._update()
            return (i + 1, *observe(i + 1))

        with tf.device(run.device):
            head = tf.cond(
                tf.equal(end, 0),
                lambda: observe(start),
                lambda: tuple(v.read_value() for v in self._head),
            )
            i, *head = tf.while_loop(cond, body, (start, *head))
            write(i, *head)  # the non-finite row (or step end's, which its call rewrites)
            for variable, value in zip(self._head, head, strict=True):
                variable.assign(value)
            ok = tf.math.is_finite(head[0])
            return self._finish(start, ok, tf.where(ok, end, i), None)

    # -- a small x: a loop over groups of steps -----------------------------------------------

    def _group_chunk(self, start: tf.Tensor, end: tf.Tensor) -> dict:
        """Steps start..end-1 in groups of `group` steps (start: a group's first step).

        The run's last steps that make no whole group go through the per-step loop.
        """
        run, group = self._run, self.step_multiple
        groups = (end - start) // group

        # The loop enters a group only while every loss before it was finite, so it ends
        # after the first group with a non-finite loss: each group says whether all its
        # losses were finite, and where in it the first non-finite one was and x there;
        # only the last group's answer is used (i_bad below). With XLA by selects, fused
        # with the steps; the position within the group is a float (a select beside x's),
        # the step number is made once the loop has ended. tf graph+xla, 1e6 steps, one
        # process, four rounds each, runner / hand-written loop: legacy SGD 1.00-1.07
        # against 1.24-1.31 with the step number selected and added as int32 every step
        # before; current SGD unchanged (1.01-1.09 against 1.02-1.10). Selecting in
        # reverse order, which keeps every step's x until the group's end, or starting
        # from a step's x instead of the carried one, made the current SGD's loop ~100 ns
        # a step. Without XLA, where each op costs ~0.15-1 us, a few ops a group count the
        # finite losses (7.1-7.7 us a step against 9.2-9.8 with selects, every = 20); with
        # XLA their stack and gather cost ~70x the step.
        def selected(losses: list, xs: list, latch: tuple) -> tuple:
            ok, (j_bad, x_bad) = tf.constant(True), latch
            for j, (loss, x_j) in enumerate(zip(losses, xs, strict=True)):
                finite = tf.math.is_finite(loss)
                first = tf.logical_and(ok, tf.logical_not(finite))
                x_bad = tf.where(first, x_j, x_bad)
                j_bad = tf.where(first, tf.constant(j, run.dtype), j_bad)
                ok = tf.logical_and(ok, finite)
            return ok, j_bad, x_bad

        def counted(losses: list, xs: list) -> tuple:
            finite = tf.cast(tf.math.is_finite(tf.stack(losses)), tf.int32)
            good = tf.reduce_sum(tf.math.cumprod(finite))
            return good == group, good, tf.gather(tf.stack(xs), tf.minimum(good, group - 1))

        def cond(g: tf.Tensor, ok: tf.Tensor, *_: tf.Tensor) -> tf.Tensor:
            return tf.logical_and(ok, g < groups)

        def body(g: tf.Tensor, _ok: tf.Tensor, *latch: tf.Tensor) -> tuple:
            """One group; its recorded steps write their rows (slot or spare, see _slot)."""
            i = start + g * group
            losses, xs = [], []
            for j in range(group):
                loss, grad, x_i = self._update()
                # Recorded steps have j % every == 0: with group dividing every only a
                # group's first step, which _slot sends to its row or the spare; with group
                # a multiple of every, groups start at multiples of every (a call starts
                # at a multiple of the group or where a window of rows ended).
                if j % self._every == 0:
                    row_x, row_grad = run.row(x_i, grad)
                    self._write_row(i + j, row_x, loss, row_grad)
                losses.append(loss)
                xs.append(x_i)
            found = selected(losses, xs, latch) if self._xla else counted(losses, xs)
            return (g + 1, *found)

        with tf.device(run.device):
            at = tf.zeros([], run.dtype if self._xla else tf.int32)
            carry = (tf.constant(0, tf.int32), tf.constant(True), at, tf.zeros_like(run.x))
            g, ok, at, x_bad = tf.while_loop(cond, body, carry)
            # the first non-finite loss's step: in the last group entered (g - 1), at `at`
            i_bad = start + (g - 1) * group + tf.cast(at, tf.int32)
            ok, last, x_last = tf.cond(
                tf.logical_and(ok, start + groups * group < end),
                lambda: self._flat_loop(start + groups * group, end),
                lambda: (ok, i_bad, x_bad),
            )
            return self._finish(start, ok, tf.where(ok, end, last), x_last)

    def advance(self, stop: int) -> Span:
        every, begin = self._every, self._done
        parts = []
        while True:  # one call, or several when the span has more rows than a window
            start = self._done
            end = min(stop, start + (self._window - 1) * every)
            self._final = None  # the last call's final state goes before this one runs
            out = self._call(start, end)
            self._final = out["final"]
            stopped_at = int(out["stopped_at"])
            # The rows at recorded steps start <= i < stopped_at, in the window.
            first, last = -(-start // every), -(-stopped_at // every)
            offset = first - self._window_start(start)
            parts.append(out["rows"].numpy()[:, offset : offset + last - first])
            self._done = stopped_at
            if stopped_at < end or stopped_at == stop:
                break
        x, loss, grad = np.concatenate(parts, axis=1).astype(self._run.np_dtype, copy=False)
        steps = np.arange(-(-begin // every) * every, stopped_at, every, dtype=np.int64)
        return Span(steps, x, loss, grad, stopped_at)


def _device_name(requested: str) -> str:
    """TF's name for device=cpu|gpu|auto; "auto" is also where TF eager runs an op given
    no device (the first GPU, if there is one, else the CPU)."""
    gpus = tf.config.list_logical_devices("GPU")
    if requested == "gpu" and not gpus:
        raise ConfigError(
            "device=gpu: TensorFlow sees no GPU on this machine; use device=cpu or device=auto"
        )
    if requested in ("gpu", "auto") and gpus:
        return gpus[0].name
    if requested in ("cpu", "auto", "gpu"):
        return tf.config.list_logical_devices("CPU")[0].name
    raise ConfigError(f"device={requested!r} is unknown; choose one of cpu, gpu, auto")


def _warm_up(spec: MinimizeSpec, device: str) -> None:
    """One throwaway eager step on its own variable and optimizer: pays TF's first-op costs."""
    scratch = _EagerProgram(_Run(spec, device))
    scratch.step(True)
    scratch.final()


class TensorFlowBackend:
    """TensorFlow GradientTape, with Keras 2's (tf_keras) SGD, Adam, Adagrad and RMSprop."""

    name: ClassVar[str] = "tf"
    framework: ClassVar[str] = FRAMEWORK

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__}

    def resolved_device(self, requested: str) -> str:
        return _device_name(requested)

    def convention(self, spec: MinimizeSpec) -> Convention:
        return _convention(spec)

    def options_used(self, spec: MinimizeSpec) -> dict[str, Any]:
        """The options that made this run differ from one at the defaults (both are off by
        default; unsupported() allows jit_compile only in mode=graph): legacy_optimizers
        where the run followed the legacy convention (not the hand-written rule of SGD,
        Adam, RMSprop with momentum, which it leaves alone)."""
        used = {key: value for key, value in spec.options.items() if value}
        if _convention(spec).name != "tf_legacy":
            used.pop("legacy_optimizers", None)
        return used

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        outside = outside_vocabulary(spec)
        if outside:
            return outside
        for key in _OPTIONS:
            if not isinstance(spec.options.get(key, False), bool):
                return not_allowed(f"backend.{key}", spec.options[key], ("true", "false"))
        misfit = option_misfit(spec, dict.fromkeys(_OPTIONS, False), ("jit_compile",))
        if misfit:
            return misfit
        try:
            opt = spec.optimizer
            resolve(opt.name, opt.lr, opt.hyper, _convention(spec))
        except ConfigError as exc:
            return BadSetting(str(exc))
        return None

    def prepare(self, spec: MinimizeSpec) -> _EagerProgram | _GraphProgram:
        reason = self.unsupported(spec)
        if reason is not None:
            raise ConfigError(reason)
        device = self.resolved_device(spec.device)
        if spec.mode == "graph":
            return _GraphProgram(_Run(spec, device))
        _warm_up(spec, device)
        return _EagerProgram(_Run(spec, device))

    def derivatives(self, spec: DerivativesSpec) -> Derivatives:
        """The notebook's first half (In [3]-[21]) at x = problem.x0."""
        problem = spec.problem
        dtype = _tf_dtype(spec.dtype)
        with tf.device(self.resolved_device(spec.device)):
            p = _coefficients(problem, dtype)
            x = tf.Variable(problem.x0, name="x", dtype=dtype)
            with tf.GradientTape() as tape:
                tape.watch(list(p.values()))  # constants are not watched by default
                y = problem.loss(x, p)
            dy_dx, dy_dcoef = tape.gradient(y, [x, p])
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    y2 = problem.loss(x, p)
                first = inner.gradient(y2, x)
            d2y_dx2 = outer.gradient(first, x)
            c_dy_dx, c_y = _get_gradient(problem, dtype)(tf.constant(problem.x0, dtype), p)
        return Derivatives(
            y=float(y),
            dy_dx=float(dy_dx),
            dy_dcoef={k: float(v) for k, v in dy_dcoef.items()},
            d2y_dx2=float(d2y_dx2),
            compiled_dy_dx=float(c_dy_dx),
            compiled_y=float(c_y),
        )


_GET_GRADIENT: dict[tuple[type, tuple[str, ...], tf.DType], Any] = {}


def _get_gradient(problem: Any, dtype: tf.DType) -> Any:
    """The notebook's `get_gradient` (In [18]): a tf.function -> (dy_dx, y).

    The coefficients are arguments rather than constants inside, and the input
    signature is fixed, so it is traced once per (problem kind, dtype), never once per
    call. (Problem.loss depends on the instance only through the coefficients.)
    """
    names = tuple(problem.coefficients)
    key = (type(problem), names, dtype)
    if key not in _GET_GRADIENT:
        scalar = tf.TensorSpec([], dtype)

        @tf.function(input_signature=[scalar, dict.fromkeys(names, scalar)])
        def get_gradient(x: tf.Tensor, p: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = problem.loss(x, p)
            return tape.gradient(y, x), y

        _GET_GRADIENT[key] = get_gradient
    return _GET_GRADIENT[key]
