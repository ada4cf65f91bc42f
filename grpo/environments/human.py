"""Human evaluators: people's ratings of iteration k's completions as the reward `human`.

    data/ratings/<k>.parquet    one row per rated completion (grpo.contracts.RATINGS): its key (iteration,
                                group_id, sample_index), the rating on reward.human's scale, who rated and
                                when, an optional comment, and the prompt and completion rated

    reward_human = (rating - min_rating) / (max_rating - min_rating)      in [0, 1]

A person rates the first reward.human.groups_per_iteration groups of data/rollouts/<k>.parquet (the prompts of
an iteration are already a random draw), all completions of a group, so that GRPO's group-relative advantages
compare ratings of one person's one sitting. They rate in the Prefect UI (flows/rate_flow.py), in a terminal
(`python -m pipeline.rate --iteration k`) or in a CSV they fill (`python -m pipeline.rate --iteration k
--template` writes one, `--import` reads it back); all three write the table through `save_ratings`.

A completion left unrated never scores a silent 0: scoring stops with one line saying how many completions
of which iteration await ratings and how to rate them, unless reward.human.unrated is `model`, where the
reward model (grpo/models/reward_model.py, trained on every rating so far) scores them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import pyarrow as pa

from grpo.config import HumanConfig
from grpo.contracts import RATINGS, read_table, write_table
from grpo.errors import InputError

Key = tuple[str, int]  # (group_id, sample_index): one completion of an iteration

CSV_COLUMNS = ["group_id", "sample_index", "rating", "comment", "prompt", "completion"]


def ratings_path(ratings_dir: str | Path, iteration: int) -> Path:
    return Path(ratings_dir) / f"{iteration}.parquet"


def how_to_rate(iteration: int) -> str:
    return (f"rate them in the Prefect UI (python -m flows.rate_flow --iteration {iteration}), in a terminal "
            f"(python -m pipeline.rate --iteration {iteration}) or from a CSV (python -m pipeline.rate --iteration "
            f"{iteration} --template ratings.csv, fill in the rating column, then --import ratings.csv)")


@dataclass(frozen=True)
class IterationRatings:
    """What the `human` reward reads: iteration k's ratings, mapped to [0, 1], by completion key."""

    iteration: int
    source: str  # the ratings file
    values: Mapping[Key, float] = field(default_factory=dict)

    def awaiting(self, unrated: list[Key], total: int) -> str:
        groups = len({group for group, _ in unrated})
        return (f"{self.source}: {len(unrated)} of {total} completions of iteration {self.iteration} ({groups} groups) "
                f"await ratings; {how_to_rate(self.iteration)}; or set reward.human.unrated: model to let the reward "
                "model score them")


def normalized(rating: int, human: HumanConfig) -> float:
    """reward_human = (rating - min_rating) / (max_rating - min_rating)."""
    return (rating - human.min_rating) / (human.max_rating - human.min_rating)


def groups_to_rate(rollouts: pa.Table, human: HumanConfig) -> list[str]:
    """The groups a person rates this iteration: the first groups_per_iteration of the rollouts table."""
    return list(dict.fromkeys(rollouts["group_id"].to_pylist()))[: human.groups_per_iteration]


def completion_keys(table: pa.Table) -> list[Key]:
    """(group_id, sample_index) of every row of a rollouts or ratings table, in order."""
    return list(zip(table["group_id"].to_pylist(), table["sample_index"].to_pylist()))


def by_completion(table: pa.Table, column: str) -> dict[Key, object]:
    """{(group_id, sample_index): the row's value of `column`}."""
    return dict(zip(completion_keys(table), table[column].to_pylist()))


def check_ratings(table: pa.Table, rollouts: pa.Table, iteration: int, human: HumanConfig, source: str) -> None:
    """Every row rates a completion of this iteration's rollouts (the same text), once, on the scale. InputError
    naming the file, the row (0-based, as pandas shows it) and the column."""
    completions = by_completion(rollouts, "completion")
    seen: dict[Key, int] = {}
    columns = {name: table[name].to_pylist() for name in ("iteration", "group_id", "sample_index", "rating", "completion")}
    for row in range(table.num_rows):
        key = (columns["group_id"][row], columns["sample_index"][row])
        where = f"{source}: row {row}"
        if columns["iteration"][row] != iteration:
            raise InputError(f"{where}, column 'iteration': {columns['iteration'][row]} is not iteration {iteration}")
        if key not in completions:
            raise InputError(f"{where}, columns 'group_id', 'sample_index': {key[0]!r} sample {key[1]} is not a "
                             f"completion of iteration {iteration}")
        if key in seen:
            raise InputError(f"{where}, columns 'group_id', 'sample_index': {key[0]!r} sample {key[1]} is rated "
                             f"again (first in row {seen[key]})")
        if columns["completion"][row] != completions[key]:
            raise InputError(f"{where}, column 'completion': not the text of {key[0]!r} sample {key[1]} in the "
                             f"rollouts (were they generated again since it was rated?)")
        rating = columns["rating"][row]
        if not human.min_rating <= rating <= human.max_rating:
            raise InputError(f"{where}, column 'rating': {rating} is outside reward.human's scale "
                             f"{human.min_rating}..{human.max_rating}")
        seen[key] = row


def read_ratings(ratings_dir: str | Path, iteration: int, rollouts: pa.Table, human: HumanConfig) -> pa.Table:
    """Iteration k's ratings, validated against the contract and the rollouts; no file: no ratings yet."""
    path = ratings_path(ratings_dir, iteration)
    if not path.exists():
        return RATINGS.schema.empty_table()
    table = read_table(path, RATINGS, allow_empty=True)
    check_ratings(table, rollouts, iteration, human, str(path))
    return table


def iteration_ratings(ratings_dir: str | Path, iteration: int, rollouts: pa.Table, human: HumanConfig) -> IterationRatings:
    table = read_ratings(ratings_dir, iteration, rollouts, human)
    values = {key: normalized(rating, human) for key, rating in by_completion(table, "rating").items()}
    return IterationRatings(iteration, str(ratings_path(ratings_dir, iteration)), values)


def save_ratings(ratings_dir: str | Path, iteration: int, rollouts: pa.Table, human: HumanConfig,
                 ratings: Mapping[Key, tuple[int, str | None]], rater: str, rated_at: datetime | None = None) -> Path:
    """Add `ratings` ({key: (rating, comment)}) to iteration k's file, replacing earlier ratings of the same
    completions; validated, then written atomically (a killed writer leaves the earlier file). One writer at a
    time (a lock file beside it, which .dvcignore leaves out of the folder's hash): a form submitted while
    someone rates in a terminal keeps both people's ratings."""
    from filelock import FileLock

    path = ratings_path(ratings_dir, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{iteration}.lock")):
        return _merge_ratings(path, iteration, rollouts, human, ratings, rater, rated_at or datetime.now(timezone.utc))


def _merge_ratings(path: Path, iteration: int, rollouts: pa.Table, human: HumanConfig,
                   ratings: Mapping[Key, tuple[int, str | None]], rater: str, rated_at: datetime) -> Path:
    prompts, completions = by_completion(rollouts, "prompt"), by_completion(rollouts, "completion")
    missing = [key for key in ratings if key not in completions]
    if missing:
        raise InputError(f"{missing[0][0]!r} sample {missing[0][1]} is not a completion of iteration {iteration}")
    earlier = read_ratings(path.parent, iteration, rollouts, human).to_pylist()
    rows = [row for row in earlier if (row["group_id"], row["sample_index"]) not in ratings]
    for (group, index), (rating, comment) in ratings.items():
        rows.append({"iteration": iteration, "group_id": group, "sample_index": index, "rating": rating,
                     "rater": rater, "rated_at": rated_at, "comment": comment or None,
                     "prompt": prompts[group, index], "completion": completions[group, index]})
    table = pa.Table.from_pylist(rows, schema=RATINGS.schema)
    check_ratings(table, rollouts, iteration, human, str(path))
    return write_table(table, path, RATINGS)


def write_template(path: str | Path, rollouts: pa.Table, human: HumanConfig) -> int:
    """A CSV of the completions to rate (CSV_COLUMNS, the rating column empty); the number of rows."""
    groups = set(groups_to_rate(rollouts, human))
    rows = [r for r in rollouts.select(["group_id", "sample_index", "prompt", "completion"]).to_pylist()
            if r["group_id"] in groups]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "rating": "", "comment": ""})
    return len(rows)


def read_csv_ratings(path: str | Path, human: HumanConfig) -> dict[Key, tuple[int, str | None]]:
    """{key: (rating, comment)} from a filled CSV (group_id, sample_index, rating[, comment]; other columns are
    ignored); rows with an empty rating are skipped. InputError naming the file, the line and the column."""
    out: dict[Key, tuple[int, str | None]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"group_id", "sample_index", "rating"} - set(reader.fieldnames or [])
        if needed:
            raise InputError(f"{path}: missing column(s) {', '.join(sorted(needed))}; expected {', '.join(CSV_COLUMNS)}")
        for row in reader:
            line = reader.line_num
            if not (row["rating"] or "").strip():
                continue
            try:
                rating = int(row["rating"])
            except ValueError:
                raise InputError(f"{path}: line {line}, column 'rating': {row['rating']!r} is not an integer "
                                 f"{human.min_rating}..{human.max_rating}") from None
            if not human.min_rating <= rating <= human.max_rating:
                raise InputError(f"{path}: line {line}, column 'rating': {rating} is outside reward.human's scale "
                                 f"{human.min_rating}..{human.max_rating}")
            try:
                key = (row["group_id"], int(row["sample_index"]))
            except ValueError:
                raise InputError(f"{path}: line {line}, column 'sample_index': {row['sample_index']!r} is not an "
                                 "integer") from None
            if key in out:
                raise InputError(f"{path}: line {line}: {key[0]!r} sample {key[1]} is rated twice")
            out[key] = (rating, (row.get("comment") or "").strip() or None)
    return out
