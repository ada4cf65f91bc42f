"""grpo.algorithm.packing: shared-prefix packing gives the log-probs and the gradients of the repeated-prompt computation
(float64, a tiny Llama with large weights so that a wrong mask or position shows), with sdpa and eager attention;
minibatches of whole groups."""

from __future__ import annotations

import pytest
import torch

from grpo.models.loading import load_checkpoint
from grpo.algorithm.packing import by_prompt, collate, pack
from grpo.algorithm.trainer import Rollouts, forward_logprobs, grpo_update, pack_multiple
from tests.project import update_config

F64 = torch.float64


def _groups(seed: int = 0, vocab: int = 1000):
    """Three groups (prompts of 3, 7 and 5 tokens) of 4, 3 and 2 completions of 1..6 tokens, interleaved."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, vocab, (n,), generator=g).tolist() for n in (3, 7, 5)]
    members = [0, 1, 0, 2, 1, 0, 2, 1, 0]
    prompt_ids = [prompts[m] for m in members]
    completion_ids = [torch.randint(10, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                      for _ in members]
    return prompt_ids, completion_ids


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model64(request, peaked_tiny_model_dir):
    model, _ = load_checkpoint(peaked_tiny_model_dir, dtype=F64)
    model.set_attn_implementation(request.param)
    return model


def test_pack_computes_each_prompt_once():
    prompt_ids, completion_ids = _groups()
    batch = pack(prompt_ids, completion_ids, pad_id=0)
    assert batch.input_ids.shape[0] == 3  # one row per distinct prompt
    longest = max(sum(len(c) for p, c in zip(prompt_ids, completion_ids) if p == q) for q in prompt_ids)
    assert batch.input_ids.shape[1] == 7 + longest
    assert batch.completion_mask.sum() == sum(map(len, completion_ids))


def _each_alone(model, prompt_ids, completion_ids, weights):
    """The repeated-prompt computation: every completion in its own forward with its prompt (no padding),
    its log-probs [B, L] and entropies, and the gradient of sum(weights * logp) summed over completions."""
    model.zero_grad(set_to_none=True)
    width = weights.shape[1]
    logps, entropies = torch.zeros(len(completion_ids), width, dtype=F64), torch.zeros(len(completion_ids), width, dtype=F64)
    for b, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        logp, entropy = forward_logprobs(model, collate([prompt], [completion], pad_id=0), temperature=0.7,
                                         with_entropy=True)
        (logp[0] * weights[b, : len(completion)]).sum().backward()
        logps[b, : len(completion)], entropies[b, : len(completion)] = logp[0].detach(), entropy[0]
    return logps, entropies, torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("multiple", [1, pack_multiple("cuda")])  # rows as the CPU packs them, and as CUDA does
def test_packed_logprobs_and_gradients_equal_the_repeated_prompt_ones(model64, multiple):
    prompt_ids, completion_ids = _groups()
    batch = pack(prompt_ids, completion_ids, pad_id=0, multiple=multiple)
    assert batch.input_ids.shape[1] % multiple == 0
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    weights = weights * batch.completion_mask
    logp_rep, ent_rep, grad_rep = _each_alone(model64, prompt_ids, completion_ids, weights)

    model64.zero_grad(set_to_none=True)
    logp, entropy = forward_logprobs(model64, batch, temperature=0.7, with_entropy=True)
    (logp * weights).sum().backward()
    grad_pack = torch.cat([p.grad.reshape(-1) for p in model64.parameters()])
    mask = batch.completion_mask.bool()
    assert logp_rep.abs().sum() > 1.0 and grad_rep.abs().max() > 1e-3
    # transformers computes RMSNorm, RoPE and eager attention's softmax in float32 even for a float64 model: the
    # layouts agree to float32 rounding (a token seeing a wrong key or position is off by ~0.1 to 10 here)
    torch.testing.assert_close(logp[mask], logp_rep[mask], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy[mask], ent_rep[mask], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_pack, grad_rep, rtol=0, atol=1e-4 * float(grad_rep.abs().max()))


def test_a_completion_does_not_see_the_other_completions_of_its_prompt(model64):
    """Changing one completion's tokens leaves the others' log-probs as they were."""
    prompt_ids, completion_ids = _groups()
    with torch.no_grad():
        before, _ = forward_logprobs(model64, pack(prompt_ids, completion_ids, 0), temperature=1.0)
        changed = [list(c) for c in completion_ids]
        changed[0] = [11] * len(changed[0])
        after, _ = forward_logprobs(model64, pack(prompt_ids, changed, 0), temperature=1.0)
    assert not torch.equal(before[0], after[0])
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=1e-12)


def test_group_shuffle_gives_minibatches_of_whole_groups(model64):
    prompt_ids, completion_ids = _groups()
    prompt_ids, completion_ids = prompt_ids * 2, completion_ids * 2  # 6 groups' worth, 2 per prompt
    rollouts = Rollouts(prompt_ids, completion_ids, torch.linspace(-1, 1, len(prompt_ids), dtype=F64))
    seen = []

    class Recording(torch.nn.Module):  # the model, noting the distinct prompts of every training micro-batch
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            if torch.is_grad_enabled():
                seen.append(kwargs["input_ids"].shape[0])
            return self.inner(**kwargs)

    policy = Recording(model64)
    cfg = update_config(epochs=1, minibatch_size=6, micro_batch_size=6, max_grad_norm=1e9, bf16=False,
                        warmup_steps=0, beta=0.0, clip_low=0.2, shuffle="groups")
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    grpo_update(policy, None, optimizer, rollouts, cfg)
    # 18 completions of 3 prompts (8, 6, 4 of them): minibatches of 6 hold at most 2 prompts each
    assert len(seen) == 3 and max(seen) <= 2
    groups = by_prompt(range(len(prompt_ids)), prompt_ids)
    assert sorted(map(len, groups)) == [4, 6, 8]
