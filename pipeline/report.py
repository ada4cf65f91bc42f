"""Stage report: every iteration's metrics in one table (data/report/history.csv, what `dvc plots show`
draws) and PNG plots of reward, eval accuracy, KL, completion length and throughput (generated and trained
tokens per second) against iteration.

Each plot draws those of its columns that the metrics have: the reward plot the task reward of the run
(correctness, code_tests or reasoning_gym), the held-out plot eval/accuracy (answers, reasoning-gym),
eval/accuracy_strict (answers) and eval/pass_rate (code tasks).

    python -m pipeline.report --metrics-dir data/metrics --out data/report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from grpo.errors import InputError
from grpo.models.atomic import atomic_write
from pipeline.stage import run, stage

TASK_REWARDS = ["rewards/correctness/mean", "rewards/code_tests/mean", "rewards/reasoning_gym/mean"]
PLOTS = {  # file name -> (columns, title)
    "reward.png": (["reward", *TASK_REWARDS], "training reward"),
    "eval_accuracy.png": (["eval/accuracy", "eval/accuracy_strict", "eval/pass_rate"],
                          "held-out greedy accuracy / pass rate"),
    "kl.png": (["kl"], "KL to the reference"),
    "completion_length.png": (["completions/mean_length"], "mean completion length (tokens)"),
    "throughput.png": (["tokens/generate_per_second", "tokens/update_per_second"], "tokens per second"),
}


def collect(metrics_dir: Path) -> pd.DataFrame:
    rows: dict[int, dict] = {}
    for path in sorted(metrics_dir.glob("*/*.json")):
        k = int(path.parent.name)
        rows.setdefault(k, {"iteration": k}).update(json.loads(path.read_text()))
    return pd.DataFrame(sorted(rows.values(), key=lambda r: r["iteration"]))


def draw(history: pd.DataFrame, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (columns, title) in PLOTS.items():
        present = [c for c in columns if c in history]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for column in present:
            data = history[["iteration", column]].dropna()
            ax.plot(data["iteration"], data[column], marker="o", label=column)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(present) > 1:
            ax.legend()
        fig.tight_layout()
        atomic_write(out_dir / name, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
        written.append(name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics-dir", default="data/metrics")
    parser.add_argument("--out", default="data/report")
    args = parser.parse_args(argv)
    out = Path(args.out)
    with stage("report", reads=[args.metrics_dir], writes=[args.out]) as log:
        history = collect(Path(args.metrics_dir))
        if history.empty:
            raise InputError(f"{args.metrics_dir}: no metrics files (*/<stage>.json) to report")
        atomic_write(out / "history.csv", lambda tmp: history.to_csv(tmp, index=False))
        log.update(iterations=len(history), plots=len(draw(history, out)))


if __name__ == "__main__":
    run(main)
