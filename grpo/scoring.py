"""Offline reward scoring: every registered reward function on every completion, combined by weight.

    reward = sum_k weight_k * reward_k(completion, ground_truth)

A function that raises scores 0 for that completion, and the error is kept in `reward_error` (never
silently dropped): the rollout stays inspectable and the run goes on.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from grpo.rewards import REWARD_FUNCTIONS


def score_completions(completions: Sequence[str], ground_truths: Sequence[str],
                      weights: Mapping[str, float]) -> dict[str, list]:
    """Columns reward_<name> (one per weighted function), reward and reward_error."""
    functions = {name: REWARD_FUNCTIONS.get(name) for name in weights}
    columns: dict[str, list] = {f"reward_{name}": [] for name in functions}
    columns["reward"], columns["reward_error"] = [], []
    for completion, truth in zip(completions, ground_truths, strict=True):
        total, errors = 0.0, []
        for name, fn in functions.items():
            try:
                value = float(fn(completion, truth))
            except Exception as e:  # a reward bug must not kill the run; it is recorded per row
                value = 0.0
                errors.append(f"{name}: {type(e).__name__}: {e}")
            columns[f"reward_{name}"].append(value)
            total += weights[name] * value
        columns["reward"].append(total)
        columns["reward_error"].append("; ".join(errors) if errors else None)
    return columns
