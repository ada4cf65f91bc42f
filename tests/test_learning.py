"""The sign and scale of the whole loop: generate -> score -> advantages -> update, on a toy reward that a
tiny random model can learn, raises the reward."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from grpo.algorithm.advantages import group_advantages
from grpo.backends import SamplingSpec
from grpo.backends.hf import HFBackend
from grpo.backends.batches import request_seed
from grpo.algorithm.metrics import reward_metrics
from grpo.models.loading import load_checkpoint
from grpo.environments.rewards import REWARD_FUNCTIONS, RewardSettings, Sample
from grpo.environments.scoring import score_completions
from grpo.algorithm.trainer import Rollouts, grpo_update
from tests.project import reward_settings, update_config

pytestmark = pytest.mark.slow

VOWELS = "aeiouAEIOU"


def starts_with_vowel(sample: Sample, settings: RewardSettings) -> float:
    """Toy reward: the completion's first letter is a vowel (~1 in 4 for the peaked tiny model)."""
    letters = [ch for ch in sample.completion if ch.isalpha()]
    return 1.0 if letters and letters[0] in VOWELS else 0.0


if "toy_vowel" not in REWARD_FUNCTIONS:
    REWARD_FUNCTIONS.register("toy_vowel")(starts_with_vowel)


def test_grpo_loop_raises_a_learnable_reward(peaked_tiny_model_dir):
    tiny_model_dir = peaked_tiny_model_dir
    torch.manual_seed(0)
    policy, tokenizer = load_checkpoint(tiny_model_dir)
    reference, _ = load_checkpoint(tiny_model_dir)
    reference.requires_grad_(False)
    backend = HFBackend(str(tiny_model_dir), model=policy, tokenizer=tokenizer, prompts_per_batch=8, dtype="float32")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    prompts = [f"Question {i}: say something." for i in range(8)]
    sampling = SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_new_tokens=3)
    cfg = update_config(epochs=1, minibatch_size=32, micro_batch_size=16, max_grad_norm=1.0, bf16=False,
                        learning_rate=3e-3, warmup_steps=0, pad_id=tokenizer.pad_token_id, beta=0.0, clip_low=0.2,
                        aggregation="seq_mean_token_mean")
    rewards_per_iteration = []
    for k in range(1, 9):
        policy.eval()
        groups = backend.generate(prompts, sampling, [request_seed(0, k, p) for p in prompts], progress=False)
        flat = [(i, c) for i, g in enumerate(groups) for c in g.completions]
        samples = [Sample(c.text, "", len(c.token_ids), c.finish_reason) for _, c in flat]
        scores = score_completions(samples, {"toy_vowel": 1.0}, reward_settings(strict_answer=True, max_completion_tokens=3, overlong_buffer=1))
        rewards = torch.tensor(scores["reward"], dtype=torch.float64)
        rewards_per_iteration.append(float(rewards.mean()))
        adv = group_advantages(rewards, [i for i, _ in flat], scale="group")
        policy.train()
        rollouts = Rollouts([groups[i].prompt_token_ids for i, _ in flat], [c.token_ids for _, c in flat], adv,
                            [c.logprobs for _, c in flat])
        metrics = grpo_update(policy, reference, optimizer, rollouts, cfg).metrics
        assert metrics["optimizer_steps"] == 2
        # the HF sampler and the trainer agree on the sampled tokens' log-probs (same model, float32)
        assert metrics["sampling/logp_diff_max"] < 1e-3
    table = pd.DataFrame({"group_id": [i for i, _ in flat], "reward": scores["reward"],
                          "reward_toy_vowel": scores["reward_toy_vowel"], "reward_error": scores["reward_error"]})
    assert reward_metrics(table, ["toy_vowel"])["reward"] == pytest.approx(rewards_per_iteration[-1])
    first, last = sum(rewards_per_iteration[:2]) / 2, sum(rewards_per_iteration[-2:]) / 2
    assert last > first + 0.25, rewards_per_iteration
