"""The GRPO policy loss: PPO's clipped surrogate with group advantages, plus a KL penalty to a reference.

Per token t of completion i, with the importance ratio rho = pi_theta / pi_old:

    surrogate_it = min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i)
    loss_it      = -surrogate_it + beta * KL_it

J = surrogate - beta*KL is maximised (DeepSeekMath eq. 3); we minimise its negation. eps_high > eps_low is
DAPO's clip-higher (0.2 / 0.28).

With mu = 1 update epoch, pi_old is pi_theta detached: rho == 1, the surrogate term's *value* is the mean
advantage (0 over complete groups), so the loss value is just beta * KL, while its *gradient*
A_i * grad log pi_theta is not zero. "loss is 0 but the model learns" is expected.

Truncated importance sampling (TIS, against sampler/trainer mismatch) weights the surrogate only:

    loss_it = -w_it * surrogate_it + beta * KL_it,    w_it = min(pi_old(o_it) / pi_sampler(o_it), C)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from grpo.algorithm.kl import kl_divergence
from grpo.registry import Registry

LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")
IMPORTANCE_LEVELS: Registry = Registry("importance ratio level")


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


# ---- aggregation over tokens: [B, T] per-token loss -> scalar ------------------------------------------
#
# Every aggregation is  loss = sum_{i,t} w_it * loss_it / N : per-token weights w (from the mask alone) and a
# count N of `unit`s (sequences or tokens). Written this way, N can be the count of a whole minibatch (or of
# every rank) while each micro-batch sums its own tokens: the micro-batch losses then add up to the
# minibatch loss exactly, whatever the split.


@dataclass(frozen=True)
class Aggregation:
    unit: str  # "sequence" or "token": what N counts
    token_weights: Callable[[torch.Tensor, int], torch.Tensor]  # (mask [B, T], max_completion_tokens) -> w [B, T]

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        """N of this batch alone: its sequences or its tokens."""
        return mask.new_tensor(float(mask.shape[0])) if self.unit == "sequence" else mask.sum()


# GRPO paper / TRL "grpo":  (1/B) sum_i (1/|o_i|) sum_t loss_it
LOSS_AGGREGATIONS.register("seq_mean_token_mean")(
    Aggregation("sequence", lambda mask, budget: mask / mask.sum(-1, keepdim=True).clamp(min=1)))
# DAPO / verl default:  sum_{i,t} loss_it / sum_i |o_i|
LOSS_AGGREGATIONS.register("token_mean")(Aggregation("token", lambda mask, budget: mask))
# Dr. GRPO:  sum_{i,t} loss_it / (B * L_max), L_max a constant generation budget
LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")(Aggregation("sequence", lambda mask, budget: mask / budget))


# ---- importance ratio level: log(rho) per token -------------------------------------------------------


@IMPORTANCE_LEVELS.register("token")
def _token_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # rho_it = pi_theta(o_it) / pi_old(o_it)
    return logprobs - old_logprobs


@IMPORTANCE_LEVELS.register("sequence")
def _sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # GSPO eq. (7): s_i = exp( (1/|o_i|) sum_t log(pi_theta(o_it) / pi_old(o_it)) ), the same on every token
    per_seq = _masked_sum(logprobs - old_logprobs, mask, -1) / mask.sum(-1).clamp(min=1)
    return per_seq.unsqueeze(-1).expand_as(logprobs)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.04,
    clip_low: float = 0.2,
    clip_high: Optional[float] = None,
    kl_estimator: str = "k3",
    aggregation: str = "seq_mean_token_mean",
    importance: str = "token",
    max_completion_tokens: Optional[int] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_units: Optional[float | torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss to minimise, and detached statistics named as TRL logs them.

    logprobs, old_logprobs, ref_logprobs, mask (binary): [B, T]; advantages: [B].
    is_weights: [B, T] truncated importance-sampling weights min(pi_old / pi_sampler, C); they multiply the
        clipped surrogate of each token and nothing else (as TRL's `importance_sampling_ratio`): not the KL
        term, not the mask, not the statistics.
    num_units: N of the aggregation (sequences or tokens, LOSS_AGGREGATIONS[aggregation].unit) when this batch
        is a part of a larger one (a micro-batch, a rank's share); default: this batch's own count.
    max_completion_tokens: Dr. GRPO's constant L_max (default: T).
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} "
            f"and mask {tuple(mask.shape)} must have the same [B, T] shape"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    if is_weights is not None and is_weights.shape != logprobs.shape:
        raise ValueError(f"is_weights {tuple(is_weights.shape)} must have the [B, T] shape {tuple(logprobs.shape)}")
    aggregate = LOSS_AGGREGATIONS.get(aggregation)
    log_ratio_fn = IMPORTANCE_LEVELS.get(importance)
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)  # A_i on every token of o_i

    ratio = torch.exp(log_ratio_fn(logprobs, old_logprobs.detach(), mask))
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    # TIS: w_it * surrogate_it (w from the frozen pi_old and the sampler: no gradient through it)
    weighted_surrogate = surrogate if is_weights is None else surrogate * is_weights.detach().to(surrogate.dtype)
    per_token_loss = -weighted_surrogate

    if ref_logprobs is not None:
        kl = kl_divergence(logprobs, ref_logprobs.detach(), estimator=kl_estimator)
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl
    else:
        kl = None

    # loss = sum_{i,t} w_it * loss_it / N
    budget = max_completion_tokens if max_completion_tokens is not None else logprobs.shape[-1]
    count = aggregate.count(mask) if num_units is None else torch.as_tensor(num_units, dtype=logprobs.dtype)
    loss = (per_token_loss * aggregate.token_weights(mask, budget)).sum() / count.clamp(min=1)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)

        def token_mean(x: torch.Tensor) -> float:
            return float(_masked_sum(x.to(mask.dtype), mask) / n_tokens)

        # Where the clip is active (the gradient through rho is cut): the region TRL reports.
        is_low = (ratio < 1.0 - clip_low) & (adv < 0)
        is_high = (ratio > 1.0 + clip_high) & (adv > 0)
        stats = {
            "kl": token_mean(kl) if kl is not None else 0.0,
            "clip_ratio_low": token_mean(is_low),
            "clip_ratio_high": token_mean(is_high),
            "clip_ratio": token_mean(is_low | is_high),
            "ratio_mean": token_mean(ratio),
            "ratio_max": float(ratio.masked_fill(mask == 0, -torch.inf).max()) if mask.any() else 1.0,
            "surrogate": token_mean(surrogate),
            "loss": float(loss.detach()),
            "num_tokens": float(mask.sum()),
        }
    return loss, stats
