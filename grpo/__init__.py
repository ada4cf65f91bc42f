"""GRPO as a library: pure functions on tensors, variants in registries, no orchestration.

    from grpo import group_advantages, kl_divergence, policy_loss, token_logprobs
"""

from grpo.advantages import ADVANTAGE_SCALES, group_advantages, group_stats
from grpo.kl import KL_ESTIMATORS, kl_divergence
from grpo.logprobs import token_entropy, token_logprobs
from grpo.loss import IMPORTANCE_LEVELS, LOSS_AGGREGATIONS, policy_loss

__all__ = [
    "ADVANTAGE_SCALES",
    "IMPORTANCE_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "group_advantages",
    "group_stats",
    "kl_divergence",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
]
