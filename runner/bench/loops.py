"""The reference loops `python -m runner.bench` times the runner against.

Each framework's loop is written the way a user writes it by hand: TensorFlow as the
reference notebook does (In [29] tape + assign_add, In [32] apply_gradients, In [35]
minimize, In [38] a tf.function over tf.range), PyTorch as its plain loops, JAX as a
jitted step in a Python loop or one jit + fori_loop. None of them records a trajectory
or checks for divergence: the ratio runner / hand-written is exactly what the runner's
recording, checks and plumbing cost per step. A numba loop gives the native floor and
NumPy the streaming baseline for vectors.

Frameworks are imported inside the builders, so importing this module imports none.
Every builder pays its one-time costs (tracing, compiling, a warm-up step) and returns
a `Prepared`, whose `run()` executes the timed loop from x0 and returns the final x.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# The notebook's problem and optimizer: y = a*x^2 + b*x + c from x0 with SGD(lr).
A, B, C, X0, LR = 1.0, -2.0, 1.0, 0.0, 0.01


@dataclass(frozen=True)
class Prepared:
    """A hand-written loop with its one-time cost paid: `run()` is the timed part."""

    compile_s: float
    run: Callable[[], float]


def _prepared(
    build: Callable[[], Callable[[], float]], warm_up: Callable[[], object] | None = None
) -> Prepared:
    """Time build + warm_up as compile_s; the loop itself is left to the caller to time.

    Without a warm_up the built loop runs once: a compiled loop's first call pays set-up
    (a JAX executable's ~0.2 ms) that would otherwise land in the first timed run.
    """
    start = time.perf_counter()
    run = build()
    (warm_up or run)()
    return Prepared(time.perf_counter() - start, run)


def hand_written(framework: str, mode: str, steps: int, options: Mapping[str, Any]) -> Prepared:
    """The hand-written loop for one framework x mode (graph mode: update=apply), with the
    variant's backend options (TF: jit_compile, legacy_optimizers)."""
    builders = {"tf": _tf, "torch": _torch, "jax": _jax}
    return builders[framework](mode, steps, options)


# --------------------------------------------------------------------------- TensorFlow


def _tf(mode: str, steps: int, options: Mapping[str, Any]) -> Prepared:
    """The notebook's own cells, with tf_keras's SGD (Keras 3 has no minimize), or its
    legacy SGD: the class the notebook's `tf.keras.optimizers.SGD` was up to TF 2.10."""
    import tensorflow as tf
    import tf_keras

    jit_compile = bool(options.get("jit_compile"))
    a, b, c = tf.constant(A), tf.constant(B), tf.constant(C)
    x = tf.Variable(X0, name="x", dtype=tf.float32)
    lr = tf.constant(LR)
    if options.get("legacy_optimizers"):
        opt = tf_keras.optimizers.legacy.SGD(learning_rate=LR)
        opt._create_all_weights([x])  # its slots and hyperparameters, outside the loop
    else:
        opt = tf_keras.optimizers.SGD(learning_rate=LR)
        opt.build([x])

    def f() -> tf.Tensor:
        return a * tf.pow(x, 2) + b * x + c

    def in29(n: int) -> None:  # In [29]: tape.gradient, then x.assign_add(-lr * dx)
        cnt = 0
        while cnt < n:
            cnt += 1
            with tf.GradientTape() as tape:
                y = a * tf.pow(x, 2) + b * x + c
            dx = tape.gradient(y, x)
            x.assign_add(-lr * dx)

    def in32(n: int) -> None:  # In [32]: opt.apply_gradients
        cnt = 0
        while cnt < n:
            cnt += 1
            with tf.GradientTape() as tape:
                y = a * tf.pow(x, 2) + b * x + c
            dx = tape.gradient(y, x)
            opt.apply_gradients(grads_and_vars=[(dx, x)])

    def in35(n: int) -> None:  # In [35]: opt.minimize(f, [x])
        for _ in range(n):
            opt.minimize(f, [x])

    @tf.function(jit_compile=jit_compile, input_signature=[tf.TensorSpec([], tf.int32)])
    def minimizef(n: tf.Tensor) -> tf.Tensor:  # In [38], with the step count an argument
        for _ in tf.range(n):
            with tf.GradientTape() as tape:
                y = a * tf.pow(x, 2) + b * x + c
            dy_dx = tape.gradient(y, x)
            opt.apply_gradients(grads_and_vars=[(dy_dx, x)])
        return a * tf.pow(x, 2) + b * x + c

    if mode == "graph":
        loop: Callable[[int], object] = lambda n: minimizef(tf.constant(n, tf.int32)).numpy()  # noqa: E731
    else:
        loop = {"manual": in29, "apply": in32, "minimize": in35}[mode]

    def run() -> float:
        x.assign(X0)
        loop(steps)
        return float(x.numpy())

    def warm_up() -> None:
        # Graph: n=0 traces without stepping. XLA compiles the loop for each value of n
        # (tf.range's limit is a compile-time constant there): with n=0 the first timed
        # run paid ~40 ms of compiling, so XLA warms up on the timed n itself.
        loop((steps if jit_compile else 0) if mode == "graph" else 1)
        x.assign(X0)

    return _prepared(lambda: run, warm_up)


# --------------------------------------------------------------------------- PyTorch


def _torch(mode: str, steps: int, _options: Mapping[str, Any]) -> Prepared:
    """PyTorch's plain loops; graph is a torch.compile'd step called from a Python loop."""
    import torch

    a, b, c = torch.tensor(A), torch.tensor(B), torch.tensor(C)
    lr = torch.tensor(LR)
    x = torch.tensor(X0, requires_grad=True)
    opt = torch.optim.SGD([x], lr=LR)

    def f() -> torch.Tensor:
        return a * x**2 + b * x + c

    def manual(n: int) -> None:
        for _ in range(n):
            y = a * x**2 + b * x + c
            (g,) = torch.autograd.grad(y, x)
            with torch.no_grad():
                x.sub_(lr * g)

    def apply(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            y = f()
            y.backward()
            opt.step()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        y = f()
        y.backward()
        return y

    def minimize(n: int) -> None:
        for _ in range(n):
            opt.step(closure)

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        return a * v**2 + b * v + c

    @torch.compile(fullgraph=True)
    def compiled_step(v: torch.Tensor) -> torch.Tensor:
        return v - lr * torch.func.grad(loss_of)(v)

    def graph(n: int) -> None:
        v = x.detach().clone()
        for _ in range(n):
            v = compiled_step(v)
        with torch.no_grad():
            x.copy_(v)

    loop = {"manual": manual, "apply": apply, "minimize": minimize, "graph": graph}[mode]

    def reset() -> None:
        with torch.no_grad():
            x.fill_(X0)

    def run() -> float:
        reset()
        loop(steps)
        return float(x.detach())

    def warm_up() -> None:
        loop(1)
        reset()

    return _prepared(lambda: run, warm_up)


# --------------------------------------------------------------------------- JAX


def _jax(mode: str, steps: int, _options: Mapping[str, Any]) -> Prepared:
    """A jitted step in a Python loop (eager modes), or jit + fori_loop (graph)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    a, b, c = jnp.float32(A), jnp.float32(B), jnp.float32(C)
    lr = jnp.float32(LR)
    x0 = jnp.float32(X0)
    opt = optax.sgd(LR)
    state0 = opt.init(x0)

    def f(x: jax.Array) -> jax.Array:
        return a * x**2 + b * x + c

    @jax.jit
    def manual_step(x: jax.Array) -> jax.Array:
        return x - lr * jax.grad(f)(x)

    @jax.jit
    def apply_step(x: jax.Array, state: optax.OptState) -> tuple[jax.Array, optax.OptState]:
        updates, state = opt.update(jax.grad(f)(x), state, x)
        return optax.apply_updates(x, updates), state

    @jax.jit
    def minimize_step(x: jax.Array, state: optax.OptState) -> tuple[jax.Array, optax.OptState]:
        _loss, g = jax.value_and_grad(f)(x)  # handed the loss, differentiates it itself
        updates, state = opt.update(g, state, x)
        return optax.apply_updates(x, updates), state

    def loop_of(step: Callable, with_state: bool) -> Callable[[], float]:
        def run() -> float:
            x, state = x0, state0
            for _ in range(steps):
                if with_state:
                    x, state = step(x, state)
                else:
                    x = step(x)
            return float(jax.block_until_ready(x))

        return run

    def body(_i: int, carry: tuple) -> tuple:
        x, state = carry
        updates, state = opt.update(jax.grad(f)(x), state, x)
        return optax.apply_updates(x, updates), state

    def fori(x: jax.Array, state: optax.OptState) -> tuple:
        return lax.fori_loop(0, steps, body, (x, state))

    if mode == "graph":  # compiled ahead of time, like the runner's graph mode
        return _prepared(
            lambda: _run_executable(jax, jax.jit(fori).lower(x0, state0).compile(), x0, state0)
        )
    step, with_state = {
        "manual": (manual_step, False),
        "apply": (apply_step, True),
        "minimize": (minimize_step, True),
    }[mode]
    args = (x0, state0) if with_state else (x0,)
    return _prepared(lambda: loop_of(step, with_state), lambda: jax.block_until_ready(step(*args)))


def _run_executable(jax: Any, executable: Any, *args: Any) -> Callable[[], float]:
    return lambda: float(jax.block_until_ready(executable(*args)[0]))


# --------------------------------------------------------------------------- floors


def numba_floor() -> tuple[float, Callable[[int], float]]:
    """(compile_s, run(steps) -> final x): the update loop compiled to machine code.

    Each step depends on the last, so this is the latency floor of the arithmetic
    itself: x -= lr * (2*a*x + b) in float32, no recording, no checks.
    """
    import numba

    f32 = np.float32

    @numba.njit(cache=False)
    def loop(x: float, a: float, b: float, lr: float, n: int) -> float:
        two = np.float32(2.0)
        for _ in range(n):
            x -= lr * (two * a * x + b)
        return x

    start = time.perf_counter()
    loop(f32(X0), f32(A), f32(B), f32(LR), 1)
    compile_s = time.perf_counter() - start
    return compile_s, lambda n: float(loop(f32(X0), f32(A), f32(B), f32(LR), n))


def numpy_update(n: int) -> Callable[[int], None]:
    """The n-dim SGD step x -= lr*(2*a*x + b) in NumPy, in place with out=: run(steps).

    a and b are numbers, as in the runner's problem.
    """
    x = np.zeros(n, np.float32)
    t = np.empty(n, np.float32)
    two_a, b, lr = np.float32(2.0 * A), np.float32(B), np.float32(LR)

    def run(steps: int) -> None:
        for _ in range(steps):
            np.multiply(x, two_a, out=t)
            np.add(t, b, out=t)
            np.multiply(t, lr, out=t)
            np.subtract(x, t, out=x)

    return run


def numpy_stream(n: int) -> tuple[int, Callable[[int], None]]:
    """(bytes per call, run(calls)): STREAM's "add", z = x + y with out=, in float32.

    Counted as STREAM counts it, 2 reads + 1 write (no write-allocate traffic), the
    same convention as the runner's byte model, so the two bandwidths compare.
    """
    x = np.ones(n, np.float32)
    y = np.ones(n, np.float32)
    z = np.empty(n, np.float32)

    def run(calls: int) -> None:
        for _ in range(calls):
            np.add(x, y, out=z)

    return 3 * n * 4, run
