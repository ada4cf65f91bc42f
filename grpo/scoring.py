"""Offline reward scoring: every weighted reward function on every completion, combined by weight.

    reward = sum_k weight_k * reward_k(sample)

A function that raises scores 0 for that completion, and the error is kept in `reward_error` (never
silently dropped): the rollout stays inspectable and the run goes on.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from grpo.rewards import REWARD_FUNCTIONS, RewardSettings, Sample


def score_completions(samples: Sequence[Sample], weights: Mapping[str, float],
                      settings: RewardSettings) -> dict[str, list]:
    """Columns reward_<name> (one per weighted function), reward and reward_error."""
    functions = {name: REWARD_FUNCTIONS.get(name) for name in weights}
    columns: dict[str, list] = {f"reward_{name}": [] for name in functions}
    columns["reward"], columns["reward_error"] = [], []
    for sample in samples:
        total, errors = 0.0, []
        for name, fn in functions.items():
            try:
                value = float(fn(sample, settings))
            except Exception as e:  # a reward bug must not kill the run; it is recorded per row
                value = 0.0
                errors.append(f"{name}: {type(e).__name__}: {e}")
            columns[f"reward_{name}"].append(value)
            total += weights[name] * value
        columns["reward"].append(total)
        columns["reward_error"].append("; ".join(errors) if errors else None)
    return columns


def reward_settings(params) -> RewardSettings:
    """The reward functions' settings from the typed params (grpo.config.Params)."""
    return RewardSettings(strict_answer=params.reward.strict_answer,
                          max_completion_tokens=params.rollout.max_new_tokens,
                          overlong_buffer=params.reward.overlong_buffer)


def samples_from_table(table) -> list[Sample]:
    """Samples from a rollouts table (pyarrow or pandas) with the ROLLOUTS columns."""
    columns = {name: (table[name].to_pylist() if hasattr(table[name], "to_pylist") else list(table[name]))
               for name in ("completion", "ground_truth", "completion_tokens", "finish_reason")}
    return [Sample(*row) for row in zip(columns["completion"], columns["ground_truth"], columns["completion_tokens"],
                                        columns["finish_reason"], strict=True)]
