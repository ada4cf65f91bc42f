"""Stage advantages@k: each completion's reward relative to its prompt group (grpo/algorithm/advantages.py):
A_i = (r_i - group mean) / (std + eps), the std over the batch (advantage.scale batch, the default), over the
group (group) or none (none: A_i = r_i - group mean).

    python -m pipeline.advantages --iteration 1 --scored data/scored/1.parquet --out data/advantages/1.parquet \
        --metrics data/metrics/1/advantages.json
"""

from __future__ import annotations

from pipeline.worker.client import delegate

if __name__ == "__main__":
    delegate("pipeline.advantages")  # a running worker (pipeline/worker/) runs the stage and this exits; else it runs here


import pyarrow as pa
import torch

from grpo.algorithm.advantages import group_advantages, group_stats
from grpo.config import load_params
from grpo.contracts import ADVANTAGES, SCORED, read_table, write_table
from grpo.models.atomic import write_json
from pipeline.stage import iteration_parser, run, stage


def main(argv: list[str] | None = None) -> None:
    args = iteration_parser(__doc__, scored="scored rollouts Parquet of iteration k").parse_args(argv)
    params = load_params(args.params)
    a = params.advantage
    with stage(f"advantages@{args.iteration}", reads=[args.scored], writes=[args.out, args.metrics]) as log:
        table = read_table(args.scored, SCORED)
        rewards = torch.tensor(table["reward"].to_pylist(), dtype=torch.float64)
        group_ids = table["group_id"].to_pylist()
        stats = group_stats(rewards, group_ids)
        advantages = group_advantages(rewards, group_ids, scale=a.scale, eps=a.eps)
        # DAPO dynamic sampling: a group with no reward spread teaches nothing; drop it from the update
        kept = ~stats.degenerate if a.dynamic_sampling else torch.ones_like(stats.degenerate)
        for name, values, dtype in (("group_reward_mean", stats.mean, pa.float64()),
                                    ("group_reward_std", stats.std, pa.float64()),
                                    ("advantage", advantages, pa.float64()), ("kept", kept, pa.bool_())):
            table = table.append_column(pa.field(name, dtype, nullable=False), pa.array(values.tolist(), dtype))
        write_table(table, args.out, ADVANTAGES)
        metrics = {
            "iteration": args.iteration,
            "advantages/mean": float(advantages.mean()),
            "advantages/abs_mean": float(advantages.abs().mean()),
            "advantages/max": float(advantages.max()),
            "advantages/min": float(advantages.min()),
            "frac_groups_dropped": float(1 - kept.float().mean()),
            "num_kept": int(kept.sum()),
            "time/advantages_startup_seconds": log.startup_seconds,
        }
        write_json(args.metrics, metrics)
        log.update(kept=f"{int(kept.sum())}/{len(kept)}")


if __name__ == "__main__":
    run(main)
