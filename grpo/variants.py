"""Which registry each variant parameter picks from, and the check of params.yaml's names against them.

check-inputs runs it once before every other stage; grpo.config itself stays free of these imports, so that a
stage depends only on the library code it runs (dvc.yaml), not on every registry.
"""

from __future__ import annotations

from grpo.algorithm.advantages import ADVANTAGE_SCALES
from grpo.errors import ConfigError
from grpo.algorithm.kl import KL_ESTIMATORS
from grpo.algorithm.loss import IMPORTANCE_LEVELS, LOSS_AGGREGATIONS
from grpo.registry import Registry
from grpo.environments.rewards import REWARD_FUNCTIONS

# params.yaml key -> the registry its value (or, for a mapping, each of its keys) must be in
VARIANTS: dict[str, Registry] = {
    "advantage.scale": ADVANTAGE_SCALES,
    "loss.kl_estimator": KL_ESTIMATORS,
    "loss.aggregation": LOSS_AGGREGATIONS,
    "loss.importance": IMPORTANCE_LEVELS,
    "reward.weights": REWARD_FUNCTIONS,
}


def check_variant_names(params, source: str = "params.yaml") -> None:
    """Raise ConfigError naming the key, the value and the registered names, for the first unknown name."""
    for key, registry in VARIANTS.items():
        section, name = key.split(".")
        value = getattr(getattr(params, section), name)
        for chosen in (value if isinstance(value, dict) else [value]):
            if chosen not in registry:
                shown = f"{key}.{chosen} = {value[chosen]!r}" if isinstance(value, dict) else f"{key} = {chosen!r}"
                raise ConfigError(f"{source}: {shown} is not allowed; expected a {registry.kind}, one of "
                                  f"{', '.join(registry.names())}")
