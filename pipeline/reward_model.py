"""Stage reward-model@k: the reward model (grpo/models/reward_model.py) trained on every rating so far,
data/ratings/<j>.parquet for j <= k, for the rewards that call it (reward_model, or human with
reward.human.unrated: model).

    python -m pipeline.reward_model --params params.yaml --iteration 1 --base data/checkpoints/0 \
        --ratings data/ratings --out data/reward_models/1 --metrics data/metrics/1/reward_model.json

When no weighted reward calls it (the default), the stage writes the folder with only reward_model.json
{"trained": false, "reason": ...} and returns, importing no torch: it runs in every iteration.
"""

from __future__ import annotations

from pipeline.worker.client import delegate

if __name__ == "__main__":
    delegate("pipeline.reward_model")  # a running worker (pipeline/worker/) runs the stage and this exits; else here

import json
import time
from pathlib import Path

import pyarrow as pa

from grpo.config import load_params
from grpo.contracts import RATINGS, read_table
from grpo.environments.human import how_to_rate
from grpo.environments.scoring import needs_reward_model
from grpo.errors import InputError
from grpo.models.atomic import atomic_folder, write_json
from pipeline.stage import iteration_parser, run, stage

FEATURES_DIR = ".grpo/reward_model_features"  # features of rated completions, kept between runs of the stage
INFO = "reward_model.json"  # grpo.models.reward_model.INFO, named here so that the untrained path imports no torch


def read_ratings_so_far(ratings_dir: str | Path, iteration: int) -> tuple[pa.Table, list[Path]]:
    """Every rating of iterations 1..k (data/ratings/<j>.parquet, j <= k), as one RATINGS table."""
    files = sorted((p for p in Path(ratings_dir).glob("*.parquet") if p.stem.isdigit() and int(p.stem) <= iteration),
                   key=lambda p: int(p.stem))
    tables = [read_table(p, RATINGS, allow_empty=True) for p in files]
    return (pa.concat_tables(tables) if tables else RATINGS.schema.empty_table()), files


def main(argv: list[str] | None = None, *, cache=None) -> None:
    """`cache`: a long-lived worker's checkpoints in memory (pipeline/worker/), for the base checkpoint."""
    args = iteration_parser(__doc__, base="the base checkpoint (data/checkpoints/0): the frozen feature extractor",
                            ratings="folder of people's ratings, <j>.parquet").parse_args(argv)
    params = load_params(args.params)
    k = args.iteration
    with stage(f"reward-model@{k}", reads=[args.ratings, args.base], writes=[args.out, args.metrics]) as log:
        start = time.perf_counter()
        if not needs_reward_model(params.reward):
            reason = ("no weighted reward calls it (reward.weights has neither reward_model nor human with "
                      "reward.human.unrated: model)")
            with atomic_folder(args.out) as tmp:
                (tmp / INFO).write_text(json.dumps({"trained": False, "reason": reason}, indent=2) + "\n")
            write_json(args.metrics, {"iteration": k, "reward_model/trained": 0,
                                      "time/reward_model_seconds": time.perf_counter() - start,
                                      "time/reward_model_startup_seconds": log.startup_seconds})
            log.update(trained="no", reason="no weighted reward calls it")
            return
        ratings, files = read_ratings_so_far(args.ratings, k)
        if ratings.num_rows == 0:
            found = f"{len(files)} file(s), all empty" if files else "no <j>.parquet"
            raise InputError(f"{args.ratings}: no ratings of iterations 1..{k} ({found}), and the reward model "
                             f"learns from them; {how_to_rate(k)}")
        from grpo.models import reward_model

        config = params.reward.reward_model
        tensors, report = reward_model.train(args.base, ratings, config, seed=params.train.seed, cache=cache,
                                             device=params.train.device, features_dir=FEATURES_DIR)
        with atomic_folder(args.out) as tmp:
            reward_model.save(tmp, args.base, tensors, report, config, params.train.seed)
        metrics = {f"reward_model/{name}": value for name, value in report.items()
                   if value is not None and not name.endswith("seconds")}
        metrics.update({"iteration": k, "reward_model/trained": 1,
                        "time/reward_model_seconds": time.perf_counter() - start,
                        "time/reward_model_features_seconds": report["feature_seconds"],
                        "time/reward_model_startup_seconds": log.startup_seconds})
        write_json(args.metrics, metrics)
        accuracy = report["heldout_pairwise_accuracy"]
        log.update(ratings=report["ratings"], pairs=report["pairs_train"],
                   heldout_accuracy="-" if accuracy is None else f"{accuracy:.3f}")


if __name__ == "__main__":
    run(main)
