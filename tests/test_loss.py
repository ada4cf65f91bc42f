import pytest
import torch

from grpo import group_advantages, kl_divergence, policy_loss
from grpo.algorithm.kl import K3_MAX

F64 = torch.float64


def _random_batch(b=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(b, t, generator=g, dtype=F64) * 3
    old = logprobs + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ref = logprobs + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    return logprobs, old, ref, mask, adv


# --------------------------------------------------------------------------------------- clipping gradient


@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.2), (0.2, 0.28)])
def test_surrogate_gradient_is_zero_exactly_where_ppo_clips(clip_low, clip_high):
    ratios = torch.tensor([0.5, 0.79, 0.85, 1.0, 1.15, 1.25, 1.35, 2.0], dtype=F64)
    for a in (1.0, -1.0):
        logprobs = ratios.log().clone().requires_grad_(True)
        old = torch.zeros_like(ratios)
        # one token per sequence, so each token's gradient is its own; beta = 0 isolates the surrogate
        loss, _ = policy_loss(logprobs[:, None], old[:, None], torch.full((8,), a, dtype=F64),
                              torch.ones(8, 1, dtype=F64), clip_low=clip_low, clip_high=clip_high,
                              aggregation="token_mean")
        (grad,) = torch.autograd.grad(loss, logprobs)
        if a > 0:
            clipped = ratios > 1 + clip_high
        else:
            clipped = ratios < 1 - clip_low
        assert torch.all(grad[clipped] == 0), (a, grad)
        assert torch.all(grad[~clipped] != 0), (a, grad)
        # where not clipped: d(-rho*A)/dlogp = -rho*A / N
        torch.testing.assert_close(grad[~clipped], -ratios[~clipped] * a / 8)


def test_clip_stats():
    ratios = torch.tensor([[0.5, 1.0, 1.5, 1.0]], dtype=F64).repeat(2, 1)
    mask = torch.ones(2, 4, dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    _, stats = policy_loss(ratios.log(), torch.zeros_like(ratios), adv, mask, clip_low=0.2)
    # row A>0: 1.5 is clipped high; row A<0: 0.5 is clipped low -> 1 of 8 tokens each
    assert stats["clip_ratio_high"] == pytest.approx(1 / 8)
    assert stats["clip_ratio_low"] == pytest.approx(1 / 8)
    assert stats["clip_ratio"] == pytest.approx(2 / 8)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert set(stats) >= {"kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio", "ratio_mean"}


# --------------------------------------------------------------------------------------------------- KL


def test_k3_is_non_negative_and_zero_only_where_equal():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(2000, generator=g, dtype=F64) * 20
    ref = -torch.rand(2000, generator=g, dtype=F64) * 20
    ref[:100] = logp[:100]
    kl = kl_divergence(logp, ref, estimator="k3")
    assert torch.all(kl[:100] == 0)
    assert torch.all(kl[100:] > 0)
    # tiny differences: still strictly positive, ~ d^2 / 2
    d = torch.tensor([1e-6, -1e-6, 1e-3], dtype=F64)
    torch.testing.assert_close(kl_divergence(torch.zeros(3, dtype=F64), d), d**2 / 2, rtol=1e-3, atol=0)
    # a token the policy pushed far below the reference: exp(30) would swamp the batch; clamped as verl's low_var_kl
    assert float(kl_divergence(torch.tensor([-30.0]), torch.tensor([0.0]))) == K3_MAX


def test_kl_estimators_match_their_formulas():
    logp, _, ref, _, _ = _random_batch()
    torch.testing.assert_close(kl_divergence(logp, ref, estimator="k1"), logp - ref)
    torch.testing.assert_close(kl_divergence(logp, ref, estimator="k2"), 0.5 * (logp - ref) ** 2)
    torch.testing.assert_close(kl_divergence(logp, ref, estimator="k3"), torch.exp(ref - logp) - (ref - logp) - 1)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_divergence(logp, ref, estimator="k4")


def test_k3_expectation_is_the_true_kl():
    # E_{x~p}[k3] = KL(p || q) for categorical p, q
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    expected_k3 = (p * kl_divergence(p.log(), q.log(), estimator="k3")).sum()
    torch.testing.assert_close(expected_k3, (p * (p / q).log()).sum())


# ------------------------------------------------------------------------- aggregation and GSPO, directly


def _direct_per_token(logp, old, ref, mask, adv, beta, clip_low, clip_high, ratio):
    per_token = torch.empty_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = float(ratio[i, t])
            a = float(adv[i])
            surrogate = min(r * a, min(max(r, 1 - clip_low), 1 + clip_high) * a)
            d = float(ref[i, t] - logp[i, t])
            per_token[i, t] = -surrogate + beta * (torch.exp(torch.tensor(d, dtype=F64)) - d - 1)
    return per_token


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_aggregations_and_importance_levels_against_direct_recomputation(seed, importance, aggregation):
    logp, old, ref, mask, adv = _random_batch(seed=seed)
    beta, clip_low, clip_high = 0.04, 0.2, 0.28
    b, t = logp.shape
    if importance == "token":
        ratio = torch.exp(logp - old)
    else:  # GSPO: s_i = exp(mean_t (logp - old)) over the completion's own tokens
        ratio = torch.empty_like(logp)
        for i in range(b):
            n = int(mask[i].sum())
            ratio[i, :] = torch.exp((logp[i, :n] - old[i, :n]).mean())
    per_token = _direct_per_token(logp, old, ref, mask, adv, beta, clip_low, clip_high, ratio)
    lengths = mask.sum(-1)
    if aggregation == "seq_mean_token_mean":
        expected = sum(per_token[i, : int(lengths[i])].sum() / lengths[i] for i in range(b)) / b
    elif aggregation == "token_mean":
        expected = sum(per_token[i, : int(lengths[i])].sum() for i in range(b)) / lengths.sum()
    else:
        expected = sum(per_token[i, : int(lengths[i])].sum() for i in range(b)) / (b * 32)
    loss, _ = policy_loss(logp, old, adv, mask, ref_logprobs=ref, beta=beta, clip_low=clip_low, clip_high=clip_high,
                          aggregation=aggregation, importance=importance, max_completion_tokens=32)
    torch.testing.assert_close(loss, torch.as_tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


def test_gspo_ratio_gradient_flows_through_the_sequence_mean():
    logp, old, _, mask, adv = _random_batch(b=2, t=4)
    logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, importance="sequence", clip_low=0.99, clip_high=100.0)
    (grad,) = torch.autograd.grad(loss, logp)
    # every unmasked token of a sequence gets the same gradient under a sequence-level ratio (unless clipped)
    for i in range(2):
        n = int(mask[i].sum())
        # clip range (0.01, 101): nothing is clipped, so every token of the sequence has the same non-zero gradient
        assert torch.allclose(grad[i, :n], grad[i, :1].expand(n))
        assert torch.all(grad[i, :n] != 0)
        assert torch.all(grad[i, n:] == 0)


def test_unknown_aggregation_and_importance():
    logp, old, _, mask, adv = _random_batch()
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        policy_loss(logp, old, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="unknown importance ratio level 'seq'"):
        policy_loss(logp, old, adv, mask, importance="seq")


# ---------------------------------------------------------- mu = 1: the loss is beta*KL, the gradient is not 0


def test_one_epoch_loss_equals_beta_kl_but_policy_gradient_is_nonzero():
    g = torch.Generator().manual_seed(3)
    groups, group_size, t = 4, 4, 7
    b = groups * group_size
    rewards = torch.rand(b, generator=g, dtype=F64)
    adv = group_advantages(rewards, [i // group_size for i in range(b)], scale="group")
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(F64)
    logp = (-torch.rand(b, t, generator=g, dtype=F64) * 3).requires_grad_(True)
    ref = logp.detach() + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    beta = 0.04

    loss, stats = policy_loss(logp, logp.detach(), adv, mask, ref_logprobs=ref, beta=beta)

    # ratio == 1 everywhere, so the surrogate is A_i on each token; seq_mean_token_mean turns that into
    # mean_i A_i, which is 0 because advantages sum to zero within every group.
    kl = kl_divergence(logp.detach(), ref)
    aggregated_kl = ((kl * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), beta * aggregated_kl, rtol=1e-10, atol=1e-12)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clip_ratio"] == 0.0

    # ...but the policy-gradient term is alive: with beta = 0 the loss value is ~0 and the gradient is not
    loss_pg, _ = policy_loss(logp, logp.detach(), adv, mask, ref_logprobs=ref, beta=0.0)
    assert abs(float(loss_pg.detach())) < 1e-12
    (grad,) = torch.autograd.grad(loss_pg, logp)
    assert grad.abs().max() > 1e-3
    # and it is exactly -A_i / (B |o_i|) on each completion token
    expected = -(adv[:, None] / (b * mask.sum(-1, keepdim=True))) * mask
    torch.testing.assert_close(grad, expected)
