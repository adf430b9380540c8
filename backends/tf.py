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

# Quiet TensorFlow's C++ INFO/WARNING logs; must be set before the import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from runner.errors import ConfigError  # noqa: E402
from runner.protocol import (  # noqa: E402
    DTYPES,
    GRAPH_UPDATES,
    MODES,
    Derivatives,
    DerivativesSpec,
    MinimizeSpec,
    Trajectory,
)

_OPTIONS = ("jit_compile",)
_SGD_HYPER = ("momentum", "nesterov")

# (loss, x, grad) as TensorFlow values.
Values = tuple[Any, Any, Any]


def _tf_dtype(name: str) -> tf.DType:
    return tf.float64 if name == "float64" else tf.float32


def _coefficients(problem: Any, dtype: tf.DType) -> dict[str, tf.Tensor]:
    """The problem's coefficients as constants of the run dtype, like the notebook's a, b, c."""
    return {k: tf.constant(v, dtype=dtype) for k, v in problem.coefficients.items()}


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
        return tf_keras.optimizers.SGD(
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

    def update_minimize(self, want_grad: bool = True) -> tuple[tf.Tensor, tf.Tensor | None]:
        """`opt.minimize(f, [x])`; f hands us the loss it computed, before the update.

        Keras 2's minimize is compute_gradients(f, var_list, tape) + apply_gradients.
        For grad_i we pass it a persistent tape and ask that tape once more for the
        gradient it already recorded (at x_i): the update's arithmetic is untouched.
        """
        seen: list[tf.Tensor] = []

        def f() -> tf.Tensor:
            y = self.loss()
            seen.append(y)
            return y

        if not want_grad:
            self.opt.minimize(f, [self.x])
            return seen[0], None
        tape = tf.GradientTape(persistent=True)
        self.opt.minimize(f, [self.x], tape=tape)
        grad = tape.gradient(seen[0], self.x)
        del tape
        return seen[0], grad

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
        self._minimize = mode == "minimize"

    def step(self, record: bool) -> Values:
        run = self._run
        with tf.device(run.device):
            # A resource variable's read is a snapshot: the update below copies on write.
            x_i = run.x.read_value() if record else None
            if self._minimize:
                loss, grad = run.update_minimize(want_grad=record)
            else:
                loss, grad = self._update()
        return loss, x_i, grad

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        with tf.device("/device:CPU:0"):
            stacked = tf.stack(list(values))
        return np.asarray(stacked.numpy(), dtype=self._run.np_dtype)

    def final(self) -> Values:
        return self._run.final()


class _GraphProgram:
    """The whole loop in one `tf.function` (optionally XLA), recording inside the loop.

    `steps` is a tensor argument with a fixed signature, so prepare()'s 0-step call
    traces (and with XLA compiles) the function once and run() reuses it. A
    `tf.while_loop` stops at the first non-finite loss; rows go into TensorArrays of
    `rows + 1` slots where the extra slot absorbs the writes of unrecorded steps, so
    the loop body has no branch.
    """

    def __init__(self, run: _Run) -> None:
        self._run = run
        spec = run.spec
        self._every = spec.record.every
        self._rows = spec.record.rows
        self._update = run.updater(spec.update)
        self._fn = tf.function(
            self._loop,
            input_signature=[tf.TensorSpec([], tf.int32)],
            jit_compile=bool(spec.options.get("jit_compile", False)),
            reduce_retracing=False,
        )
        # Trace/compile now; the loop body does not run, so x and the optimizer stay fresh.
        self._call(0)

    def _loop(self, steps: tf.Tensor) -> dict[str, tf.Tensor]:
        run = self._run
        with tf.device(run.device):
            every = tf.constant(self._every, tf.int32)
            spare = tf.constant(self._rows, tf.int32)

            def buffer() -> tf.TensorArray:
                return tf.TensorArray(
                    run.dtype, size=self._rows + 1, element_shape=run.x.shape
                )

            def cond(i, ok, x_i, xs, losses, grads):  # noqa: ARG001
                return tf.logical_and(ok, i < steps)

            def body(i, ok, x_i, xs, losses, grads):  # noqa: ARG001
                x_i = run.x.read_value()
                loss, grad = self._update()
                # A row written at the stopping step lands in a slot that run() drops.
                slot = i if self._every == 1 else tf.where(i % every == 0, i // every, spare)
                xs = xs.write(slot, x_i)
                losses = losses.write(slot, loss)
                grads = grads.write(slot, grad)
                return i + 1, tf.math.is_finite(loss), x_i, xs, losses, grads

            start = (
                tf.constant(0, tf.int32),
                tf.constant(True),
                run.x.read_value(),
                buffer(),
                buffer(),
                buffer(),
            )
            i, ok, x_stop, xs, losses, grads = tf.while_loop(cond, body, start)
            # Stopped by a non-finite loss: x went one update past step i; put it back
            # so that the final state is the one at step i.
            run.x.assign(tf.where(ok, run.x.read_value(), x_stop))
            loss, grad = run.loss_and_grad()
            return {
                "stopped_at": tf.where(ok, i, i - 1),
                "x": xs.stack(),
                "loss": losses.stack(),
                "grad": grads.stack(),
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
            coefs = [p["a"], p["b"], p["c"]]
            with tf.GradientTape() as tape:
                tape.watch(coefs)
                y = problem.loss(x, p)
            dy_dx, *dy_dcoef = tape.gradient(y, [x, *coefs])
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    y2 = problem.loss(x, p)
                first = inner.gradient(y2, x)
            d2y_dx2 = outer.gradient(first, x)
            c_dy_dx, c_y = _get_gradient(problem, dtype)(
                tf.constant(problem.x0, dtype), p["a"], p["b"], p["c"]
            )
        return Derivatives(
            y=float(y),
            dy_dx=float(dy_dx),
            dy_dcoef={k: float(v) for k, v in zip("abc", dy_dcoef, strict=True)},
            d2y_dx2=float(d2y_dx2),
            compiled_dy_dx=float(c_dy_dx),
            compiled_y=float(c_y),
        )


_GET_GRADIENT: dict[tuple[type, tf.DType], Any] = {}


def _get_gradient(problem: Any, dtype: tf.DType) -> Any:
    """The notebook's `get_gradient` (In [18]): a tf.function -> (dy_dx, y).

    Coefficients are arguments rather than constants inside, and the input signature
    is fixed, so it is traced once per (problem, dtype), never once per call.
    """
    key = (type(problem), dtype)
    if key not in _GET_GRADIENT:
        spec = tf.TensorSpec([], dtype)

        @tf.function(input_signature=[spec, spec, spec, spec])
        def get_gradient(x, a, b, c):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = problem.loss(x, {"a": a, "b": b, "c": c})
            return tape.gradient(y, x), y

        _GET_GRADIENT[key] = get_gradient
    return _GET_GRADIENT[key]
