"""Stage score@k: every weighted reward function on every completion (offline; no model needed).

    python -m pipeline.score --iteration 1 --rollouts data/rollouts/1.parquet --ratings data/ratings \
        --reward-model data/reward_models/1 --out data/scored/1.parquet --metrics data/metrics/1/score.json

With human weighted, iteration k's ratings (data/ratings/<k>.parquet) are read and checked against the rollouts;
completions left unrated stop the stage with a line saying how to rate them, or (reward.human.unrated: model)
get the reward model's score. The reward model is loaded only when a weighted reward calls it.

With code_tests weighted, the programs run in the sandbox, as many at once as the machine has cores; a
sandbox that cannot run (reward.sandbox bwrap without a working bwrap) stops the stage before any scoring.
"""

from __future__ import annotations

from pipeline.worker.client import delegate

if __name__ == "__main__":
    delegate("pipeline.score")  # a running worker (pipeline/worker/) runs the stage and this exits; else it runs here

import time

import pyarrow as pa

from grpo.config import load_params
from grpo.contracts import ROLLOUTS, SCORED, read_table, write_table
from grpo.errors import ConfigError
from grpo.algorithm.metrics import reward_metrics
from grpo.environments.human import iteration_ratings
from grpo.environments.scoring import (check_reward_requirements, needs_reward_model, reward_settings,
                                       samples_from_table, score_completions)
from grpo.models.atomic import write_json
from pipeline.stage import iteration_parser, run, stage


def main(argv: list[str] | None = None, *, cache=None) -> None:
    """`cache`: a long-lived worker's checkpoints in memory (pipeline/worker/), for the reward model's base."""
    parser = iteration_parser(__doc__, rollouts="rollouts Parquet of iteration k")
    parser.add_argument("--ratings", default="data/ratings", help="folder of people's ratings, <k>.parquet (reward human)")
    parser.add_argument("--reward-model", help="reward model folder of iteration k (reward-model@k), where a reward uses it")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with stage(f"score@{args.iteration}", reads=[args.rollouts], writes=[args.out, args.metrics]) as log:
        start = time.perf_counter()
        check_reward_requirements(params.reward)
        table = read_table(args.rollouts, ROLLOUTS)
        weights = params.reward.weights
        ratings = iteration_ratings(args.ratings, args.iteration, table, params.reward.human) if "human" in weights else None
        scorer = None
        if needs_reward_model(params.reward):
            if args.reward_model is None:
                raise ConfigError(f"score@{args.iteration}: reward.weights or reward.human.unrated use the reward "
                                  "model; pass its folder with --reward-model data/reward_models/<k>")
            from grpo.models.reward_model import load_scorer

            scorer = load_scorer(args.reward_model, cache=cache)
        settings = reward_settings(params, ratings=ratings, reward_model=scorer)
        seconds: dict[str, float] = {}
        columns = score_completions(samples_from_table(table), weights, settings, seconds=seconds)
        for name, values in columns.items():
            dtype = pa.string() if name == "reward_error" else pa.float64()
            table = table.append_column(pa.field(name, dtype, nullable=name == "reward_error"), pa.array(values, dtype))
        write_table(table, args.out, SCORED)
        metrics = reward_metrics(table.to_pandas(), list(weights))
        for name, s in seconds.items():
            metrics[f"time/reward_{name}_seconds"] = s
        if "code_tests" in seconds:  # one program per completion, run in parallel
            metrics["code_tests/programs_per_second"] = table.num_rows / max(seconds["code_tests"], 1e-9)
        if ratings is not None:
            metrics["human/rated"] = len(ratings.values)
        metrics.update({"iteration": args.iteration, "time/score_seconds": time.perf_counter() - start,
                        "time/score_startup_seconds": log.startup_seconds})
        write_json(args.metrics, metrics)
        extra = ({"programs_per_s": f"{metrics['code_tests/programs_per_second']:.1f}"}
                 if "code_tests" in seconds else {})
        log.update(reward=f"{metrics['reward']:.3f}", errors=metrics["reward_errors"], **extra)


if __name__ == "__main__":
    run(main)
