"""grpo.algorithm.trainer on a tiny model in float64: collation, micro-batch accumulation, the fixed pi_old, the
warm-up schedule across iterations, TIS semantics, and stopping on NaN/Inf."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo.contracts import ADVANTAGES, write_table
from grpo.errors import NonFiniteError
from grpo.algorithm.loss import LOSS_AGGREGATIONS, policy_loss
from grpo.models.loading import load_checkpoint
from grpo.algorithm.packing import collate
from grpo.algorithm.trainer import Rollouts, UpdateConfig, forward_logprobs, grpo_update
from tests.project import ROOT, update_config

F64 = torch.float64
AGGREGATIONS = LOSS_AGGREGATIONS.names()


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    model, tokenizer = load_checkpoint(tiny_model_dir, dtype=F64)
    return model, tokenizer


def _rollouts(n: int = 8, seed: int = 0, vocab: int = 1000, sampler_noise: float = 0.0, model=None) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(10, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    advantages = torch.randn(n, generator=g, dtype=F64)
    sampler = None
    if model is not None:  # the sampler's log-probs: the model's own, perturbed (sampler/trainer mismatch)
        with torch.no_grad():
            lp, _ = forward_logprobs(model, collate(prompts, completions, 0), temperature=1.0)
        sampler = [(lp[i, : len(c)] + sampler_noise * torch.randn(len(c), generator=g, dtype=F64)).tolist()
                   for i, c in enumerate(completions)]
    return Rollouts(prompts, completions, advantages, sampler)


def _cfg(**overrides) -> UpdateConfig:
    values = dict(epochs=1, minibatch_size=8, micro_batch_size=8, max_grad_norm=1e9, bf16=False, learning_rate=1.0,
                  warmup_steps=0, beta=0.04, clip_low=0.2, aggregation="seq_mean_token_mean")
    values.update(overrides)
    return update_config(**values)


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ------------------------------------------------------------------------------------------------ collate


def test_padded_batch_gives_the_logprobs_of_each_sequence_alone(model64):
    model, _ = model64
    r = _rollouts(n=6, seed=1)
    batch = collate(r.prompt_ids, r.completion_ids, pad_id=0)
    # left-padded prompts, right-padded completions; positions count real tokens only
    assert batch.position_ids[0, batch.attention_mask[0].bool()].tolist() == list(
        range(len(r.prompt_ids[0]) + len(r.completion_ids[0])))
    with torch.no_grad():
        together, _ = forward_logprobs(model, batch, temperature=0.7)
        for i in range(6):
            alone, _ = forward_logprobs(model, collate([r.prompt_ids[i]], [r.completion_ids[i]], pad_id=0),
                                        temperature=0.7)
            n = len(r.completion_ids[i])
            torch.testing.assert_close(together[i, :n], alone[0], rtol=0, atol=1e-10)
            assert batch.completion_mask[i].sum() == n


# --------------------------------------------------------------------------- micro-batch accumulation


@pytest.mark.parametrize("tis", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_losses_add_up_to_the_minibatch_gradient(aggregation, tis):
    """policy_loss on a minibatch == the sum of policy_loss on its micro-batches, each normalised by the
    minibatch's count: value and gradient (float64, 1e-6), for uneven micro-batches and lengths."""
    g = torch.Generator().manual_seed(7)
    b, t = 10, 9
    logp = (-torch.rand(b, t, generator=g, dtype=F64) * 3).requires_grad_(True)
    old = logp.detach() + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    ref = logp.detach() + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    weights = torch.rand(b, t, generator=g, dtype=F64) * 3 if tis else None
    kwargs = dict(beta=0.04, clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_completion_tokens=12)

    full, _ = policy_loss(logp, old, adv, mask, ref_logprobs=ref, is_weights=weights, **kwargs)
    (full_grad,) = torch.autograd.grad(full, logp)

    count = LOSS_AGGREGATIONS.get(aggregation).count(mask)
    total = 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 10)):  # uneven micro-batches
        part, _ = policy_loss(logp[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows],
                              is_weights=None if weights is None else weights[rows], num_units=count, **kwargs)
        total = total + part
    (micro_grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(micro_grad, full_grad, rtol=0, atol=1e-6)
    assert full_grad.abs().max() > 1e-3


@pytest.mark.parametrize("tis", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_the_trainer_step_does_not_depend_on_micro_batch_size(model64, aggregation, tis):
    """One optimizer step (SGD, lr 1: the weight change is the gradient) with micro-batches of 8, 3 and 1."""
    model, _ = model64
    rollouts = _rollouts(n=8, seed=2, model=model, sampler_noise=0.5)
    if not tis:
        rollouts.sampler_logprobs = None
    deltas = []
    for micro in (8, 3, 1):
        policy = _copy(model)
        before = [p.detach().clone() for p in policy.parameters()]
        cfg = _cfg(micro_batch_size=micro, tis=tis, tis_cap=2.0, beta=0.04, clip_low=0.2, aggregation=aggregation)
        result = grpo_update(policy, model, torch.optim.SGD(policy.parameters(), lr=1.0), rollouts, cfg)
        assert result.metrics["optimizer_steps"] == 1
        if tis:
            assert result.metrics["sampling/is_weight_max"] == pytest.approx(2.0)  # some weights hit the cap
            assert result.metrics["sampling/is_weight_min"] < 1.0
        deltas.append(torch.cat([(p.detach() - q).flatten() for p, q in zip(policy.parameters(), before)]))
    assert deltas[0].abs().max() > 1e-4
    for other in deltas[1:]:
        torch.testing.assert_close(other, deltas[0], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- TIS


def test_tis_weights_scale_the_surrogate_only():
    g = torch.Generator().manual_seed(3)
    b, t = 4, 5
    logp = (-torch.rand(b, t, generator=g, dtype=F64) * 3).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(b, t, generator=g, dtype=F64)
    ref = logp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    mask = torch.ones(b, t, dtype=F64)
    mask[0, 3:] = 0
    adv = torch.randn(b, generator=g, dtype=F64)
    c = 2.5
    kwargs = dict(ref_logprobs=ref, aggregation="seq_mean_token_mean")
    # beta = 0: a sequence whose weights are all c has c times the gradient (under seq_mean_token_mean too)
    plain, stats_plain = policy_loss(logp, old, adv, mask, beta=0.0, **kwargs)
    weighted, stats_weighted = policy_loss(logp, old, adv, mask, beta=0.0, is_weights=torch.full((b, t), c, dtype=F64),
                                           **kwargs)
    (g_plain,) = torch.autograd.grad(plain, logp)
    (g_weighted,) = torch.autograd.grad(weighted, logp)
    torch.testing.assert_close(g_weighted, c * g_plain)
    # the statistics are unweighted
    for name in ("kl", "clip_ratio", "ratio_mean", "surrogate"):
        assert stats_weighted[name] == stats_plain[name], name
    # no advantage, only KL: the weights change nothing
    zero = torch.zeros(b, dtype=F64)
    kl_only, _ = policy_loss(logp, old, zero, mask, beta=0.04, **kwargs)
    kl_weighted, _ = policy_loss(logp, old, zero, mask, beta=0.04, is_weights=torch.full((b, t), c, dtype=F64), **kwargs)
    torch.testing.assert_close(torch.autograd.grad(kl_weighted, logp)[0], torch.autograd.grad(kl_only, logp)[0])
    # GSPO: the sequence ratio is the plain mean log-ratio, not a weighted one
    _, s1 = policy_loss(logp, old, adv, mask, beta=0.0, importance="sequence", **kwargs)
    _, s2 = policy_loss(logp, old, adv, mask, beta=0.0, importance="sequence",
                        is_weights=torch.rand(b, t, generator=g, dtype=F64), **kwargs)
    assert s1["ratio_mean"] == s2["ratio_mean"]


# ------------------------------------------------------------------------------- pi_old and the schedule


def test_pi_old_is_fixed_across_the_minibatch_steps_of_an_iteration(model64):
    model, _ = model64
    policy = _copy(model)
    rollouts = _rollouts(n=8, seed=4)
    cfg = _cfg(minibatch_size=4, micro_batch_size=2, learning_rate=1e-2, max_grad_norm=1.0)
    result = grpo_update(policy, model, torch.optim.AdamW(policy.parameters(), lr=1e-2), rollouts, cfg)
    first, second = result.steps
    # step 1 runs with the weights that sampled: ratio 1 on every token; step 2 with moved weights against
    # the same pi_old: the ratio leaves 1 (it would stay 1 if pi_old were re-detached per step)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-9)
    assert abs(second["ratio_mean"] - 1.0) > 1e-4, second


def test_warm_up_continues_across_iterations(model64):
    model, _ = model64
    policy = _copy(model)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    seen = []
    start = 0
    for iteration in (1, 2, 3):  # two optimizer steps per iteration, warm-up over 5 steps of the run
        cfg = _cfg(minibatch_size=4, micro_batch_size=4, learning_rate=1e-3, warmup_steps=5, start_step=start,
                   seed=iteration)
        result = grpo_update(policy, model, optimizer, _rollouts(n=8, seed=iteration), cfg)
        seen += [s["learning_rate"] for s in result.steps]
        start += result.metrics["optimizer_steps"]
    expected = [1e-3 * min(1.0, k / 5) for k in range(1, 7)]
    assert seen == pytest.approx(expected), seen


# ------------------------------------------------------------------------------------------- NaN / Inf


def test_a_nan_loss_stops_the_update_before_any_step(model64):
    model, _ = model64
    policy = _copy(model)
    before = [p.detach().clone() for p in policy.parameters()]
    rollouts = _rollouts(n=8, seed=5)
    rollouts.advantages[3] = float("nan")
    with pytest.raises(NonFiniteError, match="update step 1: loss is nan"):
        grpo_update(policy, model, torch.optim.SGD(policy.parameters(), lr=1.0), rollouts, _cfg())
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), before))


def test_an_infinite_gradient_stops_the_update(model64):
    model, _ = model64
    policy = _copy(model)
    before = [p.detach().clone() for p in policy.parameters()]
    next(policy.parameters()).register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match="gradient norm is (inf|nan)"):
        grpo_update(policy, model, torch.optim.SGD(policy.parameters(), lr=1.0), _rollouts(n=8, seed=6), _cfg())
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), before))


def test_the_update_stage_writes_no_checkpoint_on_a_nan_loss(tmp_path, tiny_model_dir):
    """pipeline.update on rollouts whose advantages hold a NaN: one error line, exit 2, no checkpoint."""
    import shutil

    policy_dir = tmp_path / "checkpoints/0"
    shutil.copytree(tiny_model_dir, policy_dir)
    (policy_dir / "checkpoint.json").write_text(json.dumps({"checkpoint_id": "base", "iteration": 0}))
    r = _rollouts(n=4, seed=8)
    rows = []
    for i in range(4):
        rows.append({"iteration": 1, "prompt_id": "p", "group_id": "1-p", "sample_index": i, "prompt": "q",
                     "completion": "a", "prompt_token_ids": r.prompt_ids[i], "completion_token_ids": r.completion_ids[i],
                     "completion_logprobs": [-1.0] * len(r.completion_ids[i]), "finish_reason": "stop",
                     "completion_tokens": len(r.completion_ids[i]), "ground_truth": "1", "data_source": "t",
                     "checkpoint_id": "base", "backend": "hf", "temperature": 0.7, "top_p": 1.0, "seed": 0, "reward": 1.0,
                     "reward_error": None, "group_reward_mean": 0.5, "group_reward_std": 0.5,
                     "advantage": float("nan") if i == 2 else 1.0, "kept": True})
    advantages = tmp_path / "advantages.parquet"
    write_table(pa.Table.from_pylist(rows, schema=ADVANTAGES.schema), advantages, ADVANTAGES)
    out = tmp_path / "checkpoints/1"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.update", "--params", str(ROOT / "params.yaml"), "--iteration", "1",
         "--policy", str(policy_dir), "--reference", str(policy_dir), "--advantages", str(advantages),
         "--out", str(out), "--metrics", str(tmp_path / "update.json")],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "error: update step 1: loss is nan" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list(out.parent.glob(".1.*.tmp"))
    assert not (tmp_path / "update.json").exists()


# ------------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_gives_the_same_update(model64):
    """optim.gradient_checkpointing recomputes the activations in the backward pass: the same step (float64)."""
    model, _ = model64
    rollouts = _rollouts(n=8, seed=9)
    cfg = _cfg(minibatch_size=4, micro_batch_size=2, learning_rate=1e-2, max_grad_norm=1.0)
    weights = []
    for checkpointing in (False, True):
        policy = _copy(model).train()
        if checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        grpo_update(policy, model, torch.optim.AdamW(policy.parameters(), lr=1e-2), rollouts, cfg)
        weights.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    assert policy.is_gradient_checkpointing
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-12)
    assert (weights[0] - torch.cat([p.detach().flatten() for p in model.parameters()])).abs().max() > 1e-3


# ------------------------------------------------------------------------------- mixed precision


class _WeightCasts(TorchDispatchMode):
    """Counts the bf16 copies made of the given tensors (by storage)."""

    def __init__(self, tensors):
        super().__init__()
        self.pointers = {t.data_ptr() for t in tensors}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                and args[0].data_ptr() in self.pointers):
            self.count += 1
        return func(*args, **kwargs)


def test_bf16_casts_each_weight_once_per_optimizer_step(tiny_model_dir):
    """optim.bf16: the fp32 master weights are cast to bf16 once a step, not once a micro-batch; the gradients
    and the AdamW state stay fp32."""
    policy, _ = load_checkpoint(tiny_model_dir)
    policy.train()
    matrices = [p for p in policy.parameters() if p.dim() == 2]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    cfg = _cfg(bf16=True, minibatch_size=8, micro_batch_size=2, learning_rate=1e-4, beta=0.0)  # 4 micro-batches
    with _WeightCasts(matrices) as casts:
        grpo_update(policy, None, optimizer, _rollouts(n=8), cfg)
    assert casts.count == len(matrices)  # one step of 4 micro-batches: one cast each
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in matrices)
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
