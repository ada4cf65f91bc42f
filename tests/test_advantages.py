import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo import group_advantages

F64 = torch.float64


def test_seed_worked_example_uses_unbiased_std():
    # rewards 1.0, 0.8, 0.0, 0.0 in one group: mean 0.45, deviations 0.55, 0.35, -0.45, -0.45,
    # unbiased variance 0.83 / 3, std 0.525991...
    rewards = torch.tensor([1.0, 0.8, 0.0, 0.0], dtype=F64)
    adv = group_advantages(rewards, ["q"] * 4, eps=0.0)
    std = math.sqrt(0.83 / 3)
    expected = torch.tensor([0.55 / std, 0.35 / std, -0.45 / std, -0.45 / std], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(adv, torch.tensor([1.0456, 0.6654, -0.8555, -0.8555], dtype=F64), rtol=0, atol=1e-4)
    # The seed's table reads +1.5, +0.5, -1.0, -1.0. That is not this formula with either std (n-1 gives
    # the values above, n gives 1.207, 0.768, -0.988, -0.988): its entries are illustrative roundings that
    # keep only the signs and the zero sum. Its 1.5 : 0.5 ratio would need 0.55 : 0.35 deviations to be 3:1.
    assert not torch.allclose(adv, torch.tensor([1.5, 0.5, -1.0, -1.0], dtype=F64), atol=0.1)
    # with the default eps = 1e-4 the values shrink by the factor std / (std + eps)
    torch.testing.assert_close(group_advantages(rewards, ["q"] * 4), expected * std / (std + 1e-4))


def test_equal_rewards_and_singletons_give_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 3.0, 1.0, 0.0], dtype=F64)
    groups = ["a", "a", "a", "b", "c", "d", "d"]
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, groups, scale=scale)
        assert adv[:5].tolist() == [0.0] * 5, scale  # constant group "a", singletons "b" and "c"
        assert adv[5] > 0 > adv[6]


def test_batch_scale_uses_group_mean_and_batch_std():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25], dtype=F64)
    groups = [0, 0, 1, 1]
    adv = group_advantages(rewards, groups, scale="batch", eps=1e-4)
    batch_std = rewards.std(unbiased=True)
    expected = torch.tensor([0.5, -0.5, 0.125, -0.125], dtype=F64) / (batch_std + 1e-4)
    torch.testing.assert_close(adv, expected)


def test_none_scale_is_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0], dtype=F64)
    adv = group_advantages(rewards, [0, 0, 0, 1, 1], scale="none")
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 1.0], dtype=F64))


def test_unknown_scale_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown advantage scale 'grp'.*batch, group, none"):
        group_advantages(torch.zeros(2), [0, 0], scale="grp")
    with pytest.raises(ValueError, match="group_ids has 3"):
        group_advantages(torch.zeros(2), [0, 0, 1])


rewards_st = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=8)
groups_st = st.lists(rewards_st, min_size=1, max_size=5)


def _flatten(groups):
    rewards = torch.tensor([r for g in groups for r in g], dtype=F64)
    ids = [i for i, g in enumerate(groups) for _ in g]
    return rewards, ids


@settings(max_examples=200, deadline=None)
@given(groups=groups_st, scale=st.sampled_from(["group", "batch", "none"]))
def test_advantages_sum_to_zero_within_each_group(groups, scale):
    rewards, ids = _flatten(groups)
    adv = group_advantages(rewards, ids, scale=scale)
    for g in set(ids):
        members = [i for i, x in enumerate(ids) if x == g]
        assert abs(float(adv[members].sum())) <= 1e-9 * max(1.0, float(adv[members].abs().max()))


@settings(max_examples=200, deadline=None)
@given(groups=groups_st, shift=st.floats(-100, 100, allow_nan=False), which=st.integers(0, 4),
       scale=st.sampled_from(["group", "none"]))
def test_shifting_one_groups_rewards_leaves_its_advantages_unchanged(groups, shift, which, scale):
    rewards, ids = _flatten(groups)
    which %= len(groups)
    shifted = rewards + torch.tensor([shift if g == which else 0.0 for g in ids], dtype=F64)
    torch.testing.assert_close(group_advantages(shifted, ids, scale=scale),
                               group_advantages(rewards, ids, scale=scale), rtol=1e-6, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(groups=groups_st, factor=st.floats(0.01, 100), which=st.integers(0, 4))
def test_group_scale_is_invariant_to_scaling_a_groups_rewards(groups, factor, which):
    rewards, ids = _flatten(groups)
    which %= len(groups)
    scaled = rewards * torch.tensor([factor if g == which else 1.0 for g in ids], dtype=F64)
    # eps = 0: the +eps in the denominator is the only thing that is not scale-free
    torch.testing.assert_close(group_advantages(scaled, ids, scale="group", eps=0.0),
                               group_advantages(rewards, ids, scale="group", eps=0.0),
                               rtol=1e-6, atol=1e-6)
