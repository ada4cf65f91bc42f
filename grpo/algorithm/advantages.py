"""Group-relative advantages (GRPO's replacement for a critic).

For a prompt q with a group of G completions and rewards r_1..r_G (outcome supervision: the same value
on every token of o_i):

    A_i = (r_i - mean(r)) / (std(r) + eps)          DeepSeekMath eq. (4), std unbiased (n-1) as TRL/verl

Scale variants (ADVANTAGE_SCALES):
    group  std over the prompt's own group (DeepSeekMath; this function's default)
    batch  std over the whole batch; the mean stays per group  (TRL scale_rewards="batch"; params.yaml's default)
    none   A_i = r_i - mean(r), no std division                  (Dr. GRPO)

A group whose rewards are all equal, or a group of one, carries no signal and gets advantage 0 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from grpo.registry import Registry

ADVANTAGE_SCALES: Registry = Registry("advantage scale")


@dataclass
class GroupStats:
    """Per-sample views of per-group statistics (each tensor is [N], broadcast from its group)."""

    index: torch.Tensor  # [N] group number 0..num_groups-1, in order of first appearance
    size: torch.Tensor  # [N] members in the sample's group
    mean: torch.Tensor  # [N] group mean reward
    std: torch.Tensor  # [N] group unbiased std (0 for a group of one)
    degenerate: torch.Tensor  # [N] bool: all rewards in the group equal, or a group of one


def group_index(group_ids: Sequence[Hashable], device: torch.device | str = "cpu") -> torch.Tensor:
    """Map hashable group ids to 0..K-1 in order of first appearance."""
    numbering: dict[Hashable, int] = {}
    return torch.tensor([numbering.setdefault(g, len(numbering)) for g in group_ids], dtype=torch.long, device=device)


def group_stats(rewards: torch.Tensor, group_ids: Sequence[Hashable]) -> GroupStats:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if len(group_ids) != rewards.numel():
        raise ValueError(f"group_ids has {len(group_ids)} entries but rewards has {rewards.numel()}")
    index = group_index(group_ids, rewards.device)  # every tensor below lives on the rewards' device
    num_groups = len(set(group_ids))

    def per_group_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)[index]

    size = per_group_sum(torch.ones_like(rewards))
    mean = per_group_sum(rewards) / size
    # unbiased: sum (r - mean)^2 / (n - 1); a group of one has no spread
    sq_dev = per_group_sum((rewards - mean) ** 2)
    std = torch.where(size > 1, sq_dev / (size - 1).clamp(min=1), torch.zeros_like(sq_dev)).sqrt()
    r_max = rewards.new_full((num_groups,), -torch.inf).scatter_reduce_(0, index, rewards, "amax")[index]
    r_min = rewards.new_full((num_groups,), torch.inf).scatter_reduce_(0, index, rewards, "amin")[index]
    degenerate = (r_max == r_min) | (size < 2)
    return GroupStats(index=index, size=size, mean=mean, std=std, degenerate=degenerate)


@ADVANTAGE_SCALES.register("group")
def _scale_group(rewards: torch.Tensor, stats: GroupStats, eps: float) -> torch.Tensor:
    # A_i = (r_i - mean_group) / (std_group + eps)
    return (rewards - stats.mean) / (stats.std + eps)


@ADVANTAGE_SCALES.register("batch")
def _scale_batch(rewards: torch.Tensor, stats: GroupStats, eps: float) -> torch.Tensor:
    # A_i = (r_i - mean_group) / (std_batch + eps)
    batch_std = rewards.std(unbiased=True) if rewards.numel() > 1 else rewards.new_zeros(())
    return (rewards - stats.mean) / (batch_std + eps)


@ADVANTAGE_SCALES.register("none")
def _scale_none(rewards: torch.Tensor, stats: GroupStats, eps: float) -> torch.Tensor:
    # Dr. GRPO: A_i = r_i - mean_group
    return rewards - stats.mean


def group_advantages(
    rewards: torch.Tensor, group_ids: Sequence[Hashable], *, scale: str = "batch", eps: float = 1e-4
) -> torch.Tensor:
    """Advantage of each completion relative to its group. Returns a [N] tensor in rewards' dtype, on rewards'
    device."""
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    scale_fn = ADVANTAGE_SCALES.get(scale)
    stats = group_stats(rewards, group_ids)
    advantages = scale_fn(rewards, stats, eps)
    # No signal in a constant group or a group of one: exactly 0, not a rounding residue / eps.
    return torch.where(stats.degenerate, torch.zeros_like(advantages), advantages)
