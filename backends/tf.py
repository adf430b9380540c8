"""TensorFlow backend: the reference notebook's GradientTape code, one mode at a time.

Each mode is written the way the notebook writes it, so the numbers it prints are the
numbers we get: manual is In [29] (`x.assign_add(-lr * dx)`), apply is In [32]
(`opt.apply_gradients`), minimize is In [35] (`opt.minimize(f, [x])`), and graph is
In [38]/[41] (a `tf.function` over the whole loop).

The optimizer comes from `tf_keras` (Keras 2): Keras 3, which is `tf.keras` from
TF 2.16 on, has no `minimize`, and its SGD is a different implementation.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from runner.errors import ConfigError
from runner.protocol import (
    DTYPES,
    GRAPH_UPDATES,
    MODES,
    Derivatives,
    DerivativesSpec,
    MinimizeSpec,
    Trajectory,
)

# Quiet TensorFlow's C++ INFO/WARNING logs; must be set before the import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


with _quiet_native_startup():
    import tensorflow as tf
    import tf_keras

    tf.config.list_physical_devices()  # device discovery: where cuInit complains


_OPTIONS = ("jit_compile",)
_SGD_HYPER = ("momentum", "nesterov")

# (loss, x, grad) as TensorFlow values.
Values = tuple[Any, Any, Any]


def _tf_dtype(name: str) -> tf.DType:
    return tf.float64 if name == "float64" else tf.float32


def _coefficients(problem: Any, dtype: tf.DType) -> dict[str, tf.Tensor]:
    """The problem's coefficients as constants of the run dtype, like the notebook's a, b, c."""
    return {k: tf.constant(v, dtype=dtype) for k, v in problem.coefficients.items()}


class _ObservedSGD(tf_keras.optimizers.SGD):
    """Keras 2 SGD that keeps the gradients it is handed, so minimize mode can report grad_i.

    Keras 2's `minimize` is `compute_gradients` + `self.apply_gradients`; keeping a
    reference to what reaches apply_gradients changes no arithmetic.
    """

    last_grads: list[Any]

    def apply_gradients(self, grads_and_vars: Any, *args: Any, **kwargs: Any) -> Any:
        grads_and_vars = list(grads_and_vars)
        self.last_grads = [grad for grad, _ in grads_and_vars]
        return super().apply_gradients(grads_and_vars, *args, **kwargs)


def _make_sgd(spec: MinimizeSpec) -> Any:
    """The notebook's `SGD(learning_rate=lr)`, from Keras 2, in the run's dtype.

    Keras 2 stores the learning rate in a variable of `floatx()` (float32) and casts it
    to the variable's dtype at each step, so float64 runs would step with
    float32(lr). Building it under floatx=float64 keeps lr exact there; momentum is
    handed over as a NumPy scalar of the run dtype for the same reason.
    `jit_compile=False`: Keras 2 would otherwise XLA-compile the update on a GPU
    (only), which fuses `x + (-g * lr)` and changes the last bit between devices.
    """
    hyper = spec.optimizer.hyper
    saved = tf_keras.backend.floatx()
    tf_keras.backend.set_floatx(spec.dtype)
    try:
        return _ObservedSGD(
            learning_rate=spec.optimizer.lr,
            # A Python float would reach tf.cast as a float32 tensor: give it the run dtype.
            momentum=np.dtype(spec.dtype).type(hyper.get("momentum", 0.0)),
            nesterov=bool(hyper.get("nesterov", False)),
            jit_compile=False,
        )
    finally:
        tf_keras.backend.set_floatx(saved)


class _Run:
    """State shared by every mode: device, dtype, x, coefficients, lr, optimizer."""

    def __init__(self, spec: MinimizeSpec, device: str) -> None:
        self.spec = spec
        self.device = device
        self.dtype = _tf_dtype(spec.dtype)
        self.np_dtype = np.dtype(spec.dtype)
        with tf.device(device):
            self.p = _coefficients(spec.problem, self.dtype)
            self.lr = tf.constant(spec.optimizer.lr, dtype=self.dtype)
            self.x = tf.Variable(spec.problem.x0, name="x", dtype=self.dtype)
            self.opt = _make_sgd(spec)
            # Create the optimizer's slots now, not inside the timed loop; no update.
            self.opt.build([self.x])

    def loss(self) -> tf.Tensor:
        """No-argument loss, like the notebook's `f()`: reads the variable x."""
        return self.spec.problem.loss(self.x, self.p)

    def loss_and_grad(self) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = self.loss()
        return loss, tape.gradient(loss, self.x)

    # One update each, returning (loss_i, grad_i) at the point before the update.
    # They run eagerly (EagerProgram) and inside the compiled loop (graph mode).

    def update_manual(self) -> tuple[tf.Tensor, tf.Tensor]:
        loss, grad = self.loss_and_grad()
        self.x.assign_add(-self.lr * grad)
        return loss, grad

    def update_apply(self) -> tuple[tf.Tensor, tf.Tensor]:
        loss, grad = self.loss_and_grad()
        self.opt.apply_gradients([(grad, self.x)])
        return loss, grad

    def update_minimize(self) -> tuple[tf.Tensor, tf.Tensor]:
        """`opt.minimize(f, [x])`; f hands us the loss it computed, before the update.

        The gradient is the one minimize itself computed and applied, seen by
        `_ObservedSGD.apply_gradients`: no second differentiation, same arithmetic.
        """
        seen: list[tf.Tensor] = []

        def f() -> tf.Tensor:
            y = self.loss()
            seen.append(y)
            return y

        self.opt.minimize(f, [self.x])
        return seen[0], self.opt.last_grads[0]

    def updater(self, kind: str) -> Callable[[], tuple[tf.Tensor, tf.Tensor]]:
        return {
            "manual": self.update_manual,
            "apply": self.update_apply,
            "minimize": self.update_minimize,
        }[kind]

    def final(self) -> Values:
        with tf.device(self.device):
            loss, grad = self.loss_and_grad()
            return loss, self.x.read_value(), grad


class _EagerProgram:
    """manual | apply | minimize, one eager step at a time (TF eager: ~300 us a step)."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        mode = run.spec.mode
        self._update = run.updater(mode)

    def step(self, record: bool) -> Values:
        run = self._run
        with tf.device(run.device):
            # A resource variable's read is a snapshot: the update below copies on write.
            x_i = run.x.read_value() if record else None
            loss, grad = self._update()
        return loss, x_i, grad

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        # Stack on the run's device, then one transfer to the host.
        with tf.device(self._run.device):
            stacked = tf.stack(list(values))
        return np.asarray(stacked.numpy(), dtype=self._run.np_dtype)

    def final(self) -> Values:
        return self._run.final()


class _GraphProgram:
    """The whole loop in one `tf.function` (optionally XLA), recording inside the loop.

    `steps` is a tensor argument with a fixed signature, so prepare()'s 0-step call
    traces (and with XLA compiles) the function once and run() reuses it. A
    `tf.while_loop` stops at the first non-finite loss. Rows go into preallocated
    variables of `rows + 1` slots, written in place (one scatter op each; a TensorArray
    write cost about 3x more per step here); the extra slot takes the writes of
    unrecorded steps, so the loop body has no branch.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        spec = run.spec
        self._every = spec.record.every
        self._rows = spec.record.rows
        self._update = run.updater(spec.update)
        with tf.device(run.device):
            self._buffers = [
                tf.Variable(tf.zeros([self._rows + 1, *run.x.shape], run.dtype), trainable=False)
                for _ in ("x", "loss", "grad")
            ]
        self._fn = tf.function(
            self._loop,
            input_signature=[tf.TensorSpec([], tf.int32)],
            jit_compile=bool(spec.options.get("jit_compile", False)),
            reduce_retracing=False,
        )
        # Trace/compile now; the loop body does not run, so x and the optimizer stay fresh.
        self._call(0)

    def _slot(self, i: tf.Tensor) -> tf.Tensor:
        """Row i // every when step i is recorded, else the spare last row."""
        if self._every == 1:
            return i
        return tf.where(i % self._every == 0, i // self._every, self._rows)

    def _loop(self, steps: tf.Tensor) -> dict[str, tf.Tensor]:
        run = self._run
        xs, losses, grads = self._buffers
        with tf.device(run.device):

            def cond(i: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
                return tf.logical_and(ok, i < steps)

            def body(i: tf.Tensor, ok: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                x_i = run.x.read_value()
                loss, grad = self._update()
                # A row written at the stopping step lands in a slot that run() drops.
                slot = self._slot(i)
                xs.scatter_update(tf.IndexedSlices(x_i, slot))
                losses.scatter_update(tf.IndexedSlices(loss, slot))
                grads.scatter_update(tf.IndexedSlices(grad, slot))
                return i + 1, tf.math.is_finite(loss)

            i, ok = tf.while_loop(cond, body, (tf.constant(0, tf.int32), tf.constant(True)))
            stopped_at = tf.where(ok, i, i - 1)
            # Stopped by a non-finite loss: x went one update past that step; put back
            # the x of that step (its row was written) so the final state is the one there.
            x_stop = tf.gather(xs, self._slot(tf.maximum(stopped_at, 0)))
            run.x.assign(tf.where(ok, run.x.read_value(), x_stop))
            loss, grad = run.loss_and_grad()
            return {
                "stopped_at": stopped_at,
                "x": xs.read_value(),
                "loss": losses.read_value(),
                "grad": grads.read_value(),
                "final_x": run.x.read_value(),
                "final_loss": loss,
                "final_grad": grad,
            }

    def _call(self, steps: int) -> dict[str, np.ndarray]:
        out = self._fn(tf.constant(steps, tf.int32))
        return {k: v.numpy() for k, v in out.items()}

    def run(self) -> Trajectory:
        spec = self._run.spec
        out = self._call(spec.steps)
        stopped_at = int(out["stopped_at"])
        kept = -(-stopped_at // self._every)
        np_dtype = self._run.np_dtype
        return Trajectory(
            steps=spec.record.recorded_steps()[:kept],
            x=out["x"][:kept].astype(np_dtype, copy=False),
            loss=out["loss"][:kept].astype(np_dtype, copy=False),
            grad=out["grad"][:kept].astype(np_dtype, copy=False),
            final_x=out["final_x"],
            final_loss=float(out["final_loss"]),
            final_grad=out["final_grad"],
            stopped_at=stopped_at,
        )


def _warm_up(spec: MinimizeSpec, device: str) -> None:
    """One throwaway eager step on its own variable and optimizer: pays TF's first-op costs."""
    scratch = _Run(spec, device)
    update = scratch.updater(spec.mode)
    with tf.device(device):
        update()
    scratch.final()


class TensorFlowBackend:
    """TensorFlow GradientTape, with the Keras 2 (tf_keras) SGD optimizer."""

    name: ClassVar[str] = "tf"
    framework: ClassVar[str] = "TensorFlow"

    def versions(self) -> dict[str, str]:
        return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__}

    def resolved_device(self, requested: str) -> str:
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

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        if spec.mode not in MODES:
            return f"mode={spec.mode} is not one of {', '.join(MODES)}"
        if spec.dtype not in DTYPES:
            return f"dtype={spec.dtype} is not one of {', '.join(DTYPES)}"
        if spec.mode == "graph" and spec.update not in GRAPH_UPDATES:
            return f"update={spec.update} is not one of {', '.join(GRAPH_UPDATES)}"
        if spec.optimizer.name != "sgd":
            return f"optimizer={spec.optimizer.name}: the TensorFlow backend supports sgd only"
        unknown = sorted(set(spec.optimizer.hyper) - set(_SGD_HYPER))
        if unknown:
            return (
                f"optimizer.{unknown[0]} is not a setting of Keras 2 SGD here; "
                f"allowed: {', '.join(_SGD_HYPER)}"
            )
        update = spec.update if spec.mode == "graph" else spec.mode
        hyper: Mapping[str, Any] = spec.optimizer.hyper
        if update == "manual" and (hyper.get("momentum", 0) or hyper.get("nesterov", False)):
            return "manual updates are plain x - lr*g; momentum/nesterov need apply or minimize"
        unknown = sorted(set(spec.options) - set(_OPTIONS))
        if unknown:
            return f"option {unknown[0]} is unknown to the TensorFlow backend; allowed: jit_compile"
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
