"""Rate iteration k's completions without the Prefect UI: in a terminal, one completion at a time, or from a CSV.

    python -m pipeline.rate --iteration 1                             # asks for each completion's rating
    python -m pipeline.rate --iteration 1 --template ratings.csv      # the completions to rate, rating column empty
    python -m pipeline.rate --iteration 1 --import ratings.csv        # the filled CSV -> data/ratings/1.parquet
    python -m pipeline.rate --iteration 1 --status                    # how many are rated, how many await

The groups to rate are the first reward.human.groups_per_iteration of data/rollouts/<k>.parquet (the Prefect
form shows the same ones). Ratings go to data/ratings/<k>.parquet (grpo.environments.human.save_ratings: checked
against the rollouts, written atomically, earlier ratings of other completions kept); in the terminal after
each group, so quitting loses at most the group at hand. Then `dvc repro` scores the iteration.
"""

from __future__ import annotations

import argparse
import getpass

from grpo.config import load_params
from grpo.contracts import ROLLOUTS, read_table
from grpo.environments.human import (completion_keys, groups_to_rate, iteration_ratings, read_csv_ratings, save_ratings,
                                     write_template)
from pipeline.stage import run


def ask(question: str, human) -> tuple[int, str | None] | str:
    """A rating (and comment) typed at the prompt, or "skip" / "quit"."""
    while True:
        try:
            answer = input(question).strip().lower()
        except EOFError:  # the input ended: keep what is rated
            return "quit"
        if answer in ("s", "skip"):
            return "skip"
        if answer in ("q", "quit"):
            return "quit"
        try:
            rating = int(answer)
        except ValueError:
            rating = None
        if rating is not None and human.min_rating <= rating <= human.max_rating:
            comment = input("  comment (optional, Enter to leave empty): ").strip()
            return rating, comment or None
        print(f"  a whole number {human.min_rating}..{human.max_rating}, s to skip, q to save and quit")


def rate_in_terminal(args, rollouts, human, rater: str) -> int:
    rated = iteration_ratings(args.ratings, args.iteration, rollouts, human).values
    rows = rollouts.select(["group_id", "sample_index", "prompt", "completion"]).to_pylist()
    groups = groups_to_rate(rollouts, human)
    total = 0
    print(f"iteration {args.iteration}: {len(groups)} groups to rate, {human.min_rating} (worst) .. "
          f"{human.max_rating} (best); s skips a completion, q saves and quits")
    for n, group in enumerate(groups, 1):
        todo = [r for r in rows if r["group_id"] == group and (group, r["sample_index"]) not in rated]
        if not todo:
            continue
        print(f"\n=== group {n}/{len(groups)} ({group}) ===\n--- prompt ---\n{todo[0]['prompt']}")
        ratings = {}
        quit_now = False
        for r in todo:
            print(f"\n--- completion {r['sample_index']} ---\n{r['completion']}\n")
            answer = ask(f"rating {human.min_rating}-{human.max_rating}: ", human)
            if answer == "quit":
                quit_now = True
                break
            if answer != "skip":
                ratings[group, r["sample_index"]] = answer
        if ratings:
            path = save_ratings(args.ratings, args.iteration, rollouts, human, ratings, rater)
            total += len(ratings)
            print(f"saved {len(ratings)} rating(s) to {path}")
        if quit_now:
            break
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rollouts", help="rollouts Parquet of iteration k (default data/rollouts/<k>.parquet)")
    parser.add_argument("--ratings", default="data/ratings", help="folder of the ratings, <k>.parquet")
    parser.add_argument("--rater", default=None, help="who rates (default: the login name)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--template", metavar="CSV", help="write the completions to rate as a CSV to fill in")
    what.add_argument("--import", dest="import_csv", metavar="CSV", help="read a filled CSV's ratings")
    what.add_argument("--status", action="store_true", help="how many completions are rated, how many await")
    args = parser.parse_args(argv)
    human = load_params(args.params).reward.human
    rollouts = read_table(args.rollouts or f"data/rollouts/{args.iteration}.parquet", ROLLOUTS)
    rater = args.rater or getpass.getuser()
    if args.template:
        n = write_template(args.template, rollouts, human)
        print(f"wrote {n} completions to {args.template}: fill in the rating column ({human.min_rating}..{human.max_rating}),"
              f" then python -m pipeline.rate --iteration {args.iteration} --import {args.template}")
    elif args.import_csv:
        ratings = read_csv_ratings(args.import_csv, human)
        path = save_ratings(args.ratings, args.iteration, rollouts, human, ratings, rater)
        print(f"imported {len(ratings)} rating(s) from {args.import_csv} into {path}")
    elif args.status:
        values = iteration_ratings(args.ratings, args.iteration, rollouts, human).values
        groups = set(groups_to_rate(rollouts, human))
        todo = sum(1 for key in completion_keys(rollouts) if key[0] in groups and key not in values)
        mean = sum(values.values()) / len(values) if values else float("nan")
        print(f"iteration {args.iteration}: {len(values)} rated (mean reward_human {mean:.3f}), {todo} of the "
              f"{len(groups)} groups to rate await ratings, {rollouts.num_rows} completions in all")
    else:
        rate_in_terminal(args, rollouts, human, rater)


if __name__ == "__main__":
    run(main)
