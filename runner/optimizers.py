"""One vocabulary of optimizer hyperparameters, and where the frameworks' formulas differ.

Every backend maps `OptimizerSpec` to its native optimizer (tf-keras, torch.optim,
optax). The frameworks agree on SGD but not on the details of the adaptive rules:
where epsilon goes, its default, Adagrad's first accumulator. Those differences are
data here (CONVENTIONS), so the NumPy reference can reproduce each framework exactly
and a test can show that a difference is the documented one and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from runner.errors import ConfigError, flag, setting

if TYPE_CHECKING:  # runner.protocol imports this module
    from runner.protocol import OptimizerSpec

# Our names and defaults; `None` means "the framework's own default" (see CONVENTIONS).
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "nesterov": False},
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": None},
    "adagrad": {"initial_accumulator": None, "eps": None},
    "rmsprop": {"rho": 0.9, "momentum": 0.0, "eps": None},
}
# The decays, in [0, 1): 1 lets the average never forget (and Adam's bias correction 0/0).
UNIT_INTERVAL = ("momentum", "beta1", "beta2", "rho")


@dataclass(frozen=True)
class Convention:
    """How one framework writes the adaptive rules (dense gradients, no weight decay).

    adam_eps:        added to sqrt(v_hat) ("corrected", the paper's form) or to sqrt(v)
                     before the bias correction is folded into the step size ("raw",
                     Keras' epsilon-hat form);
    adagrad_eps:     "inside" sqrt(acc + eps) or "outside" sqrt(acc) + eps;
    rmsprop_eps:     likewise for the mean square; `rmsprop_momentum_eps_form`, where
                     given, is the form with momentum > 0 (Keras 2's legacy RMSprop runs
                     a fused kernel with eps inside only when it has momentum);
    adam_bias_correction: 1 - beta**t in "float64" (torch.optim: Python floats), or in the
                     run's dtype, from betas rounded to it ("run dtype": optax, Keras). In
                     float32 the rounded beta2 (0.99900001) moves 1 - beta2**t by ~1e-5
                     relative at t = 50: Adam's x then differs by ~90 ulps after 50 steps.
    decay_complement: 1 - beta (Adam's moments) and 1 - rho (RMSprop's mean square) in
                     "float64", rounded once to the run's dtype (Python floats: torch.optim,
                     optax, Keras 2's optimizers: 0.1f for beta1 0.9), or in the "run dtype"
                     from the decay rounded to it (Keras 2's legacy fused kernels:
                     1 - 0.9f = 0.100000024). In float32 Adam's x parts by ~100 ulps
                     within 200 steps.
    """

    name: str
    adam_eps: float
    adam_eps_form: str  # corrected | raw
    adagrad_eps: float
    adagrad_eps_form: str  # inside | outside
    adagrad_initial_accumulator: float
    rmsprop_eps: float
    rmsprop_eps_form: str  # inside | outside
    rmsprop_momentum_eps_form: str | None = None  # inside | outside | None: as without
    adam_bias_correction: str = "float64"  # float64 | run dtype
    decay_complement: str = "float64"  # float64 | run dtype

    def rmsprop_form(self, momentum: float) -> str:
        """Where RMSprop's eps goes at this momentum."""
        if momentum and self.rmsprop_momentum_eps_form is not None:
            return self.rmsprop_momentum_eps_form
        return self.rmsprop_eps_form


# the decays whose complement (Convention.decay_complement) a rule computes, as named
DECAYS = {"adam": "1 - beta", "rmsprop": "1 - rho"}

CONVENTIONS: dict[str, Convention] = {
    # tf_keras 2.x optimizers (Keras 2): Adam epsilon-hat, eps 1e-7 everywhere.
    "tf": Convention("tf", 1e-7, "raw", 1e-7, "inside", 0.1, 1e-7, "inside", None, "run dtype"),
    # tf_keras.optimizers.legacy (TF <= 2.10's tf.keras optimizers, fused C++ kernels):
    # Adagrad's and momentum-free RMSprop's eps outside the root, RMSprop's with momentum
    # inside (ResourceApplyRMSProp). Its hyperparameters are float32 variables: Adam's
    # beta**t (tf.pow of the rounded beta) and every 1 - beta, 1 - rho are float32
    # arithmetic (ResourceApplyAdam: m += (g - m) * (1 - beta1)).
    "tf_legacy": Convention(
        "tf_legacy",
        1e-7,
        "raw",
        1e-7,
        "outside",
        0.1,
        1e-7,
        "outside",
        "inside",
        adam_bias_correction="run dtype",
        decay_complement="run dtype",
    ),
    # torch.optim, which follows the papers: eps outside every square root.
    "torch": Convention("torch", 1e-8, "corrected", 1e-10, "outside", 0.0, 1e-8, "outside"),
    # optax: Adam like the paper; adagrad and rmsprop take eps inside the square root.
    "jax": Convention(
        "jax",
        1e-8,
        "corrected",
        1e-7,
        "inside",
        0.1,
        1e-8,
        "inside",
        adam_bias_correction="run dtype",
    ),
}
# torch.optim under torch.compile (backend=torch mode=graph, update apply or minimize):
# the step counter is a tensor in the run's dtype, so Adam's 1 - beta**t is tensor
# arithmetic in that dtype, from betas rounded to it; eagerly torch.optim computes it in
# Python floats. In float32 the two part by ~100 ulps of x within 200 steps.
CONVENTIONS["torch_compiled"] = replace(
    CONVENTIONS["torch"], name="torch_compiled", adam_bias_correction="run dtype"
)
# NumPy's default: the papers' formulas, which torch.optim follows; named for itself, so
# that a NumPy run's record and summary do not call its defaults torch's.
CONVENTIONS["paper"] = replace(CONVENTIONS["torch"], name="paper")


@dataclass(frozen=True)
class Resolved:
    """An optimizer's hyperparameters as one framework will run them: no Nones left."""

    name: str
    lr: float
    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def validate_hyper(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Check optimizer.<key> values against the vocabulary; fill the defaults."""
    if name not in HYPERPARAMETERS:
        raise ConfigError(
            f"optimizer={name!r} is unknown; choose one of: {', '.join(HYPERPARAMETERS)}"
        )
    allowed = HYPERPARAMETERS[name]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(
            f"optimizer.{unknown[0]} is not a setting of optimizer={name}; "
            f"allowed: lr, {', '.join(allowed)}"
        )
    values = {**allowed, **given}
    for key, value in values.items():
        _check(name, key, value)
    if name == "sgd" and values["nesterov"] and values["momentum"] == 0:
        raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0")
    return values


def _check(name: str, key: str, value: Any) -> None:
    where = setting(f"optimizer.{key}", value)
    if key == "nesterov":
        flag(f"optimizer.{key}", value)
        return
    if value is None and HYPERPARAMETERS[name][key] is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} is not allowed; give a finite number")
    if key in UNIT_INTERVAL and not 0 <= value < 1:
        raise ConfigError(f"{where} is not allowed; give a number in [0, 1)")
    if key == "eps" and value <= 0:
        raise ConfigError(f"{where} is not allowed; give a number > 0 (or null: the default)")
    if key == "initial_accumulator" and value < 0:
        raise ConfigError(f"{where} is not allowed; give a number >= 0")


def eps_placement(name: str, momentum: float, convention: Convention) -> str | None:
    """Where `name`'s epsilon goes under `convention`: Adam's corrected|raw, Adagrad's and
    RMSprop's inside|outside (the root); None for SGD, which has none."""
    if name == "adam":
        return convention.adam_eps_form
    if name == "adagrad":
        return convention.adagrad_eps_form
    if name == "rmsprop":
        return convention.rmsprop_form(momentum)
    return None


def eps_form(name: str, momentum: float, convention: Convention) -> str | None:
    """Where `name`'s epsilon goes under `convention`, in a few words (None: no eps)."""
    placement = eps_placement(name, momentum, convention)
    if placement is None or name != "adam":
        return placement and f"{placement} the root"
    return "on sqrt(v_hat)" if placement == "corrected" else "epsilon-hat"


def rule_reads(
    optimizer: OptimizerSpec, convention: Convention, dtype_details: bool
) -> tuple[Any, ...]:
    """All a hand-written rule reads of `convention` for `optimizer`: its settings, the
    framework's defaults filled in, where eps goes, and (dtype_details: a rule that reads
    them, run below float64, where both ways part) the dtypes of Adam's bias correction
    and of 1 - beta / 1 - rho. Two conventions that read alike give one rule, so an
    option choosing between them changed nothing (backends' options_used)."""
    opt = resolve(optimizer.name, optimizer.lr, optimizer.hyper, convention)
    form = eps_placement(opt.name, float(opt.values.get("momentum") or 0), convention)
    bias = convention.adam_bias_correction if dtype_details and opt.name == "adam" else None
    complement = convention.decay_complement if dtype_details and opt.name in DECAYS else None
    return tuple(sorted(opt.values.items())), form, bias, complement


def rule_convention(
    optimizer: OptimizerSpec, chosen: Convention, plain: Convention, dtype_details: bool
) -> Convention:
    """`plain` where `chosen` gives `optimizer`'s hand-written rule nothing of its own (see
    rule_reads): the convention a run's record names is then the one its options leave
    out, so two runs of one rule are one row in the comparison."""
    same = rule_reads(optimizer, chosen, dtype_details) == rule_reads(
        optimizer, plain, dtype_details
    )
    return plain if same else chosen


def used_record(name: str, lr: float, hyper: Mapping[str, Any], convention: Convention) -> dict:
    """The hyperparameters a run ran with, its framework's defaults filled in, and whose
    formulas (results.json's `optimizer_used`; `optimizer` keeps the settings as asked,
    which is what the comparison report groups runs by)."""
    opt = resolve(name, lr, hyper, convention)
    return {"convention": convention.name, "name": opt.name, "lr": opt.lr, **opt.values}


def resolve(name: str, lr: float, hyper: Mapping[str, Any], convention: Convention) -> Resolved:
    """Fill the framework defaults (the Nones) from `convention`."""
    values = validate_hyper(name, hyper)
    if name == "adam" and values["eps"] is None:
        values["eps"] = convention.adam_eps
    if name == "adagrad":
        if values["eps"] is None:
            values["eps"] = convention.adagrad_eps
        if values["initial_accumulator"] is None:
            values["initial_accumulator"] = convention.adagrad_initial_accumulator
    if name == "rmsprop" and values["eps"] is None:
        values["eps"] = convention.rmsprop_eps
    return Resolved(name, float(lr), values)
