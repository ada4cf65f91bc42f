"""A GRPO run rewarded by people's ratings, with a simulated person: does the human environment teach what the
person rewards?

    python scripts/simulate_rater.py --workdir /tmp/simulated                  # examples/human_simulated.yaml
    python scripts/simulate_rater.py --workdir /tmp/simulated --flip 0.1 --max-tokens 40 --seed 0

In a clean clone of this repository's HEAD (committed code only), with examples/human_simulated.yaml applied
(reward `human` on a 0/1 scale, 4 of an iteration's 8 groups rated, the others scored by the reward model),
for each iteration k: `dvc repro generate@k` (and whatever it needs), then the simulated person rates the groups
a person would be shown (grpo.environments.human.groups_to_rate) through save_ratings, as the Prefect form and
`python -m pipeline.rate` do. The person's rule: 1 when the completion states the right answer as asked (the
strict correctness reward) in fewer than --max-tokens tokens, else 0; a --flip share of the ratings is
flipped (a seeded coin per completion). Then `dvc repro` runs the rest.

Prints the rule's pass rate on the held-out problems (greedy, data/eval/<k>.parquet) for checkpoint 0 and the
last; the reward model's pairwise accuracy on its own held-out rated groups (against the flipped ratings it
learns from, data/metrics/<k>/reward_model.json) and against the rule on the groups nobody rated (pairs of
completions the rule tells apart, scored by the reward model of the same iteration); writes it all to
<workdir>/simulate_rater.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_iteration import ROOT, sh  # noqa: E402


def rule(completion: str, ground_truth: str, tokens: int, max_tokens: int, settings) -> int:
    from grpo.environments.rewards import Sample, correctness

    return int(tokens < max_tokens and correctness(Sample(completion, ground_truth, tokens, "stop"), settings) == 1.0)


def rate_iteration(clone: Path, k: int, args, settings) -> dict:
    """The simulated person's ratings of iteration k's groups to rate, saved as a person's would be."""
    from grpo.config import load_params
    from grpo.contracts import ROLLOUTS, read_table
    from grpo.environments.human import groups_to_rate, save_ratings

    human = load_params(clone / "params.yaml").reward.human
    rollouts = read_table(clone / f"data/rollouts/{k}.parquet", ROLLOUTS)
    groups = set(groups_to_rate(rollouts, human))
    coin = random.Random(f"{args.seed}/{k}")
    ratings, flipped = {}, 0
    for row in rollouts.to_pylist():
        if row["group_id"] not in groups:
            continue
        rating = rule(row["completion"], row["ground_truth"], row["completion_tokens"], args.max_tokens, settings)
        if coin.random() < args.flip:
            rating, flipped = 1 - rating, flipped + 1
        ratings[row["group_id"], row["sample_index"]] = (rating, None)
    save_ratings(clone / "data/ratings", k, rollouts, human, ratings, rater="simulated")
    return {"rated": len(ratings), "positive": sum(r for r, _ in ratings.values()), "flipped": flipped}


def unrated_accuracy(clone: Path, k: int, args, settings) -> tuple[int, int]:
    """(pairs the reward model of iteration k orders as the rule does, pairs the rule tells apart) over the
    groups of iteration k that nobody rated."""
    from grpo.environments.human import groups_to_rate
    from grpo.config import load_params
    from grpo.contracts import SCORED, read_table

    human = load_params(clone / "params.yaml").reward.human
    scored = read_table(clone / f"data/scored/{k}.parquet", SCORED)
    rated = set(groups_to_rate(scored, human))
    by_group: dict[str, list[tuple[int, float]]] = {}
    for row in scored.to_pylist():
        if row["group_id"] in rated:
            continue
        truth = rule(row["completion"], row["ground_truth"], row["completion_tokens"], args.max_tokens, settings)
        by_group.setdefault(row["group_id"], []).append((truth, row["reward_human"]))  # the model's score there
    right = total = 0
    for members in by_group.values():
        for i, (ta, sa) in enumerate(members):
            for tb, sb in members[i + 1:]:
                if ta != tb:
                    total += 1
                    right += (sa - sb) * (ta - tb) > 0
    return right, total


def held_out_pass_rate(clone: Path, k: int, args, settings) -> float:
    import pandas as pd

    frame = pd.read_parquet(clone / f"data/eval/{k}.parquet")
    passes = [rule(c, t, n, args.max_tokens, settings)
              for c, t, n in zip(frame["completion"], frame["ground_truth"], frame["completion_tokens"])]
    return sum(passes) / len(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where the clone goes (default: a new temporary folder)")
    parser.add_argument("--overrides", type=Path, default=ROOT / "examples/human_simulated.yaml")
    parser.add_argument("--flip", type=float, default=0.1, help="share of the ratings flipped")
    parser.add_argument("--max-tokens", type=int, default=40, help="the rule: right, stated as asked, in fewer tokens")
    parser.add_argument("--seed", type=int, default=0, help="train.seed and the flips' seed")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="simulated-rater-"))
    work.mkdir(parents=True, exist_ok=True)
    clone, log = work / "clone", work / "run.log"
    if not clone.exists():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        sh([sys.executable, "scripts/apply_params.py", str(args.overrides.resolve())], clone, log)
        (work / "seed.yaml").write_text(f"train.seed: {args.seed}\n")
        sh([sys.executable, "scripts/apply_params.py", str(work / "seed.yaml")], clone, log)
    sys.path.insert(0, str(clone))
    os.chdir(clone)
    from grpo.config import load_params
    from grpo.environments.rewards import RewardSettings
    import dataclasses

    params = load_params("params.yaml")
    settings = RewardSettings(dataclasses.replace(params.reward, strict_answer=True), params.rollout.max_new_tokens)
    started = time.perf_counter()
    iterations = sorted(int(k) for k in params.train.iterations)
    rated = {}
    try:
        for k in iterations:
            print(f"iteration {k}: dvc repro generate@{k} ...", flush=True)
            sh(["dvc", "repro", f"generate@{k}"], clone, log)
            rated[k] = rate_iteration(clone, k, args, settings)
            print(f"iteration {k}: rated {rated[k]}", flush=True)
        sh(["dvc", "repro"], clone, log)
    finally:  # the worker's memory back at once
        subprocess.run([sys.executable, "-m", "pipeline.worker", "--stop"], cwd=clone, capture_output=True)
    seconds = time.perf_counter() - started
    last = iterations[-1]
    model_metrics = {k: json.loads((clone / f"data/metrics/{k}/reward_model.json").read_text()) for k in iterations}
    unrated = {k: unrated_accuracy(clone, k, args, settings) for k in iterations}
    right, total = sum(r for r, _ in unrated.values()), sum(t for _, t in unrated.values())
    heldout = [m.get("reward_model/heldout_pairwise_accuracy") for m in model_metrics.values()]
    result = {
        "overrides": str(args.overrides), "flip": args.flip, "max_tokens": args.max_tokens, "seed": args.seed,
        "seconds": seconds, "rated": rated,
        "rule_pass_rate_held_out": {"0": held_out_pass_rate(clone, 0, args, settings),
                                    str(last): held_out_pass_rate(clone, last, args, settings)},
        "reward_model_heldout_pairwise_accuracy": dict(zip(map(str, iterations), heldout)),
        "reward_model_accuracy_vs_rule_on_unrated_groups": {"right": right, "pairs": total,
                                                            "accuracy": right / total if total else None},
        "strict_accuracy": {str(k): json.loads((clone / f"data/metrics/{k}/evaluate.json").read_text())
                            .get("eval/accuracy_strict") for k in (0, last)},
    }
    (work / "simulate_rater.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
