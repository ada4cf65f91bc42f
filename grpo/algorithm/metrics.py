"""Per-iteration metrics, named as TRL logs them, computed from the stage tables (pandas DataFrames)."""

from __future__ import annotations

import pandas as pd


def completion_metrics(rollouts: pd.DataFrame) -> dict[str, float]:
    lengths = rollouts["completion_tokens"]
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        # fraction of completions cut by max_new_tokens (no EOS)
        "completions/clipped_ratio": float((rollouts["finish_reason"] == "length").mean()),
        "num_completions": int(len(rollouts)),
        "num_prompts": int(rollouts["group_id"].nunique()),
    }


def reward_metrics(scored: pd.DataFrame, reward_names: list[str]) -> dict[str, float]:
    groups = scored.groupby("group_id", sort=False)["reward"]
    out = {
        "reward": float(scored["reward"].mean()),
        # TRL's reward_std: the mean over groups of the within-group std
        "reward_std": float(groups.std(ddof=1).fillna(0.0).mean()),
        "frac_reward_zero_std": float((groups.nunique() == 1).mean()),
        "reward_errors": int(scored["reward_error"].notna().sum()),
    }
    for name in reward_names:
        column = scored[f"reward_{name}"]
        out[f"rewards/{name}/mean"] = float(column.mean())
        out[f"rewards/{name}/std"] = float(column.std(ddof=1)) if len(column) > 1 else 0.0
    return out
