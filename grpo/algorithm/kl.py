"""Per-token KL estimators of KL(pi_theta || pi_ref) from sampled tokens (Schulman, "Approximating KL").

With log-ratio  d = ref - logp  (log pi_ref/pi_theta at the sampled token):

    k1 = logp - ref = -d                     unbiased, can be negative
    k2 = 0.5 * (logp - ref)^2                biased, non-negative
    k3 = exp(d) - d - 1                      unbiased, non-negative (DeepSeekMath eq. 4; the default)

k3 grows like exp(d) where the policy has pushed a sampled token far below the reference; one such token
can dominate a batch's loss and gradient. As verl's low_var_kl, k3 is clamped at K3_MAX.
"""

from __future__ import annotations

import torch

from grpo.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")
K3_MAX = 10.0


@KL_ESTIMATORS.register("k1")
def _k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def _k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def _k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    d = ref_logprobs - logprobs
    # expm1(d) - d == exp(d) - 1 - d, without cancellation when d is small
    return (torch.expm1(d) - d).clamp(max=K3_MAX)


def kl_divergence(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs ([B, T])."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    return KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)
