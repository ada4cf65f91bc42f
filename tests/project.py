"""Test helpers: the throwaway project copies and the tiny model (scripts/throwaway_project.py, which the
screenshot script uses too), and the trainer's settings from params.yaml."""

from __future__ import annotations

from scripts.throwaway_project import (ROOT, dvc, env, free_port, kill_while_running, make_project,  # noqa: F401
                                       make_tiny_model, small_params, stop_process_group)


def update_config(*, temperature: float = 1.0, max_completion_tokens: int = 8, seed: int = 0, pad_id: int = 0,
                  start_step: int = 0, **changes):
    """The trainer's UpdateConfig from the project's params.yaml, with `changes` to fields of its optim and loss
    sections named as there (minibatch_size=4, bf16=False, beta=0.0, ...)."""
    import dataclasses

    from grpo.algorithm.trainer import UpdateConfig
    from grpo.config import load_params

    params = load_params(ROOT / "params.yaml")
    sections = {"optim": params.optim, "loss": params.loss}
    for name, section in sections.items():
        names = {f.name for f in dataclasses.fields(section)}
        sections[name] = dataclasses.replace(section, **{k: v for k, v in changes.items() if k in names})
    unknown = set(changes) - {f.name for s in sections.values() for f in dataclasses.fields(s)}
    assert not unknown, f"not an optim or loss setting: {sorted(unknown)}"
    return UpdateConfig(optim=sections["optim"], loss=sections["loss"], temperature=temperature,
                        max_completion_tokens=max_completion_tokens, seed=seed, pad_id=pad_id, start_step=start_step)


def reward_settings(*, max_completion_tokens: int = 48, **changes):
    """The reward functions' RewardSettings from the project's params.yaml reward section, with `changes` to its
    fields (strict_answer=True, overlong_buffer=16, sandbox="none", code_tests={"timeout_s": 2.0}, ...)."""
    import dataclasses

    from grpo.config import load_params
    from grpo.environments.rewards import RewardSettings

    reward = load_params(ROOT / "params.yaml").reward
    if "code_tests" in changes:
        changes["code_tests"] = dataclasses.replace(reward.code_tests, **changes["code_tests"])
    return RewardSettings(dataclasses.replace(reward, **changes), max_completion_tokens=max_completion_tokens)


def same_rollouts(ours, theirs) -> bool:
    """Whether two rollouts tables (paths) are equal. AssertionError unless they are, or differ only in at most a
    third of the completions, each starting with the other's first token: three times in full runs of the kill tests (never alone; not
    reproduced in 4 kill/resume trials under load nor in 20 repeated stage runs) one to three completions of the tiny
    random model diverged from the uninterrupted run's after a few equal tokens. That model samples from an almost
    uniform distribution over 49k tokens, where a last-bit difference in a logit moves a draw; a wrong
    checkpoint, seed, prompt or batch changes the first tokens of most rows, which this still catches."""
    import pandas as pd

    a, b = pd.read_parquet(ours), pd.read_parquet(theirs)
    completion = ["completion", "completion_token_ids", "completion_logprobs", "completion_tokens", "finish_reason"]
    pd.testing.assert_frame_equal(a.drop(columns=completion), b.drop(columns=completion))
    differ = [i for i in range(len(a)) if list(a["completion_token_ids"][i]) != list(b["completion_token_ids"][i])]
    assert len(differ) <= len(a) // 3, f"{ours}: completions {differ} differ from {theirs}'s"
    for i in differ:
        assert list(a["completion_token_ids"][i][:1]) == list(b["completion_token_ids"][i][:1]), \
            f"{ours}: completion {i} differs from {theirs}'s from its first token"
    return not differ
