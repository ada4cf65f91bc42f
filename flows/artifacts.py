"""The Prefect artifacts of a GRPO flow run, read from the stages' output files (never recomputed):

    grpo-iteration-<k>-metrics      table: every metric of data/metrics/<k>/*.json, by stage
    grpo-iteration-<k>-completions  markdown: best and worst completion of the groups with the widest reward spread
    grpo-progress                   progress: iterations done out of the run's iterations
    grpo-history                    table: the headline metrics of every iteration (data/report/history.csv)

The row and markdown builders are plain functions of the workspace; the publish_* functions create the
artifacts and must run inside a flow run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

# the metrics shown in the history table (data/report/history.csv has every metric)
HISTORY_COLUMNS = ["iteration", "reward", "reward_std", "frac_reward_zero_std", "rewards/correctness/mean",
                   "eval/accuracy", "kl", "loss", "grad_norm", "entropy", "clip_ratio/region_mean",
                   "completions/mean_length"]
SAMPLE_GROUPS = 3  # groups shown in the completions sample of an iteration
SAMPLE_CHARS = 300  # completion text shown per cell


# ------------------------------------------------------------------------------------------------- rows


def _number(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def iteration_metrics_rows(workspace: Path, k: str) -> list[dict]:
    """One row per metric of iteration k: its stage, name and value (data/metrics/<k>/<stage>.json)."""
    rows = []
    for path in sorted((Path(workspace) / "data/metrics" / k).glob("*.json")):
        for name, value in sorted(json.loads(path.read_text()).items()):
            if name != "iteration":
                rows.append({"stage": path.stem, "metric": name, "value": _number(value)})
    return rows


def _cell(text: Any, limit: int = SAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())  # one line per table cell
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("<", "&lt;") or "(empty)"


def completions_markdown(workspace: Path, k: str, groups: int = SAMPLE_GROUPS) -> str:
    """The best and worst completion of a few prompt groups of iteration k, with rewards and advantages."""
    import pandas as pd

    ws = Path(workspace)
    df = pd.read_parquet(ws / "data/advantages" / f"{k}.parquet",
                         columns=["prompt_id", "group_id", "completion", "reward", "advantage", "ground_truth",
                                  "group_reward_mean", "group_reward_std", "finish_reason", "completion_tokens"])
    questions: dict[str, str] = {}
    prompts_path = ws / "data/prompts.parquet"
    if prompts_path.exists():
        prompts = pd.read_parquet(prompts_path, columns=["prompt_id", "question"])
        questions = dict(zip(prompts["prompt_id"], prompts["question"]))
    # most informative groups first: the largest reward spread, then a stable order
    order = (df.groupby("group_id", sort=True)["reward"].std(ddof=0).fillna(0.0)
             .sort_values(ascending=False, kind="stable").index[:groups])
    lines = [f"## Iteration {k}: sample completions",
             "",
             f"{len(df)} completions in {df['group_id'].nunique()} groups; mean reward {df['reward'].mean():.3f}. "
             f"The {len(order)} groups with the largest reward spread, best and worst completion of each "
             f"(advantage = (reward - group mean) / (group std + eps)).", ""]
    for i, group_id in enumerate(order, 1):
        g = df[df["group_id"] == group_id].sort_values(["reward", "advantage"], ascending=False, kind="stable")
        first = g.iloc[0]
        question = questions.get(first["prompt_id"], first["prompt_id"])
        lines += [f"### Group {i}: {_cell(question, 200)}",
                  "",
                  f"answer **{_cell(first['ground_truth'], 50)}**, {len(g)} completions, group reward mean "
                  f"{first['group_reward_mean']:.3f}, std {first['group_reward_std']:.3f}",
                  "",
                  "| | reward | advantage | tokens | finish | completion |",
                  "|---|---:|---:|---:|---|---|"]
        for label, row in (("best", g.iloc[0]), ("worst", g.iloc[-1])):
            lines.append(f"| {label} | {row['reward']:.3f} | {row['advantage']:+.3f} | {int(row['completion_tokens'])} "
                         f"| {row['finish_reason']} | {_cell(row['completion'])} |")
        lines.append("")
    return "\n".join(lines)


def history_rows(workspace: Path) -> list[dict]:
    """The headline metrics of every iteration so far (data/report/history.csv, written by the report stage)."""
    import pandas as pd

    path = Path(workspace) / "data/report/history.csv"
    if not path.exists():
        return []
    history = pd.read_csv(path)
    columns = [c for c in HISTORY_COLUMNS if c in history]
    return [{c: _number(v.item() if hasattr(v, "item") else v) for c, v in row.items()}
            for row in history[columns].to_dict(orient="records")]


# ---------------------------------------------------------------------------------------------- publish


def publish_iteration(workspace: Path, k: str) -> None:
    """Iteration k's metrics table and completions sample (each only when its files exist)."""
    rows = iteration_metrics_rows(workspace, k)
    if rows:
        create_table_artifact(rows, key=f"grpo-iteration-{k}-metrics",
                              description=f"Iteration {k}: every metric of data/metrics/{k}/*.json")
    if (Path(workspace) / "data/advantages" / f"{k}.parquet").exists():
        create_markdown_artifact(completions_markdown(workspace, k), key=f"grpo-iteration-{k}-completions",
                                 description=f"Iteration {k}: best and worst completions of some groups")


def start_progress(total: int) -> UUID:
    """The run's progress artifact, at 0 of `total` iterations."""
    return create_progress_artifact(0.0, key="grpo-progress", description=f"0 of {total} iterations done")


def publish_progress(progress: UUID, done: int, total: int, k: str) -> None:
    """`done` of `total` iterations are done, the last one iteration k."""
    update_progress_artifact(progress, 100.0 * done / total, description=f"{done} of {total} iterations done (iteration {k})")


def publish_history(workspace: Path) -> None:
    """The history table, once the report stage has written data/report/history.csv."""
    rows = history_rows(workspace)
    if rows:
        create_table_artifact(rows, key="grpo-history",
                              description="Every iteration so far (data/report/history.csv; iteration 0 is the base model)")
