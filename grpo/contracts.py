"""Parquet contracts between stages (one row per prompt or per completion), as pyarrow schemas.

    read_table(path, ROLLOUTS)   -> validated pyarrow.Table; ContractError names the file and the column
    write_table(table, path, ROLLOUTS)  validates, then writes atomically (grpo.models.atomic): a killed writer
                                        never leaves a file that looks complete
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grpo.errors import ContractError
from grpo.models.atomic import atomic_write


@dataclass(frozen=True)
class Contract:
    name: str
    schema: pa.Schema  # required columns; other columns are allowed and kept
    # column-name prefix -> type, for families of columns such as reward_<fn>
    prefixed: dict[str, pa.DataType] = field(default_factory=dict)
    checks: tuple[Callable[[pa.Table], str | None], ...] = ()  # row-level rules: message or None

    def column_names(self) -> list[str]:
        return self.schema.names


def _not_in(column: str, allowed: set[str]) -> Callable[[pa.Table], str | None]:
    def check(table: pa.Table) -> str | None:
        bad = set(pc.unique(table[column]).to_pylist()) - allowed
        return f"column '{column}' has values {sorted(map(str, bad))}; allowed: {sorted(allowed)}" if bad else None

    return check


def _same_lengths(*columns: str) -> Callable[[pa.Table], str | None]:
    def check(table: pa.Table) -> str | None:
        lengths = [pc.list_value_length(table[c]) for c in columns]
        for other, name in zip(lengths[1:], columns[1:]):
            if not pc.all(pc.equal(lengths[0], other)).as_py():
                return f"column '{name}' has a different length than '{columns[0]}' in some rows"
        return None

    return check


def _equals_length(count_column: str, list_column: str) -> Callable[[pa.Table], str | None]:
    def check(table: pa.Table) -> str | None:
        ok = pc.all(pc.equal(table[count_column].cast(pa.int64()), pc.list_value_length(table[list_column]))).as_py()
        return None if ok in (True, None) else f"column '{count_column}' differs from the length of '{list_column}' in some rows"

    return check


PROMPT_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),  # stable hash of source + content
    pa.field("split", pa.string(), nullable=False),  # train / eval
    pa.field("data_source", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=False),  # the raw problem text
    pa.field("prompt", pa.string(), nullable=False),  # rendered with the model's chat template
    pa.field("ground_truth", pa.string(), nullable=False),
    pa.field("metadata", pa.string(), nullable=True),  # free-form JSON
]

PROMPTS = Contract("prompts", pa.schema(PROMPT_FIELDS), checks=(_not_in("split", {"train", "eval"}),))

ROLLOUT_FIELDS = [
    pa.field("iteration", pa.int64(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int64(), nullable=False),  # 0..G-1 within the group
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int64()), nullable=False),
    pa.field("completion_token_ids", pa.list_(pa.int64()), nullable=False),
    pa.field("completion_logprobs", pa.list_(pa.float32()), nullable=False),  # the sampler's own log-probs
    pa.field("finish_reason", pa.string(), nullable=False),  # stop / length
    pa.field("completion_tokens", pa.int64(), nullable=False),
    pa.field("ground_truth", pa.string(), nullable=False),
    pa.field("data_source", pa.string(), nullable=False),
    pa.field("checkpoint_id", pa.string(), nullable=False),  # the checkpoint that sampled: "base", "iter-k"
    pa.field("backend", pa.string(), nullable=False),  # hf / vllm
    pa.field("temperature", pa.float64(), nullable=False),
    pa.field("top_p", pa.float64(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("metadata", pa.string(), nullable=True),  # the prompt's metadata JSON (task_id, generator, ...)
]
_ROLLOUT_CHECKS = (
    _not_in("finish_reason", {"stop", "length"}),
    _same_lengths("completion_token_ids", "completion_logprobs"),
    _equals_length("completion_tokens", "completion_token_ids"),
)
ROLLOUTS = Contract("rollouts", pa.schema(ROLLOUT_FIELDS), checks=_ROLLOUT_CHECKS)

SCORED_FIELDS = ROLLOUT_FIELDS + [
    pa.field("reward", pa.float64(), nullable=False),  # weighted sum of reward_<name>
    pa.field("reward_error", pa.string(), nullable=True),  # null when every function succeeded
]
SCORED = Contract("scored rollouts", pa.schema(SCORED_FIELDS), prefixed={"reward_": pa.float64()}, checks=_ROLLOUT_CHECKS)

ADVANTAGE_FIELDS = SCORED_FIELDS + [
    pa.field("group_reward_mean", pa.float64(), nullable=False),
    pa.field("group_reward_std", pa.float64(), nullable=False),
    pa.field("advantage", pa.float64(), nullable=False),
    pa.field("kept", pa.bool_(), nullable=False),  # False where dynamic sampling dropped the group
]
ADVANTAGES = Contract("advantages", pa.schema(ADVANTAGE_FIELDS), prefixed={"reward_": pa.float64()}, checks=_ROLLOUT_CHECKS)

# people's ratings of iteration k's completions (data/ratings/<k>.parquet; grpo/environments/human.py): the
# completion's key (iteration, group_id, sample_index), the rating on reward.human's scale, who and when; the
# prompt and completion rated are kept beside them, so the table reads on its own and trains the reward model
RATING_FIELDS = [
    pa.field("iteration", pa.int64(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int64(), nullable=False),
    pa.field("rating", pa.int64(), nullable=False),  # on reward.human's scale, min_rating..max_rating
    pa.field("rater", pa.string(), nullable=False),
    pa.field("rated_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("comment", pa.string(), nullable=True),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
]
RATINGS = Contract("ratings", pa.schema(RATING_FIELDS))

CONTRACTS = {c.name: c for c in (PROMPTS, ROLLOUTS, SCORED, ADVANTAGES, RATINGS)}


def validate(table: pa.Table, contract: Contract, source: str = "<table>") -> pa.Table:
    """Check columns, types and nulls; cast safe widenings (int32 -> int64, ...) to the contract's types."""
    where = f"{source} ({contract.name} contract)"
    for f in contract.schema:
        if f.name not in table.column_names:
            raise ContractError(f"{where}: missing column '{f.name}' ({f.type}); has {', '.join(table.column_names)}")
        column = table[f.name]
        if column.type != f.type:
            try:
                column = column.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ContractError(f"{where}: column '{f.name}' has type {table[f.name].type}, expected {f.type}") from None
            table = table.set_column(table.column_names.index(f.name), f.name, column)
        if not f.nullable and column.null_count:
            raise ContractError(f"{where}: column '{f.name}' has {column.null_count} null value(s)")
    for prefix, dtype in contract.prefixed.items():
        for name in table.column_names:
            if name.startswith(prefix) and name not in contract.schema.names and table[name].type != dtype:
                try:
                    table = table.set_column(table.column_names.index(name), name, table[name].cast(dtype, safe=True))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise ContractError(f"{where}: column '{name}' has type {table[name].type}, expected {dtype}") from None
    if table.num_rows:
        for check in contract.checks:
            message = check(table)
            if message:
                raise ContractError(f"{where}: {message}")
    return table


def read_table(path: str | Path, contract: Contract, *, allow_empty: bool = False) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise ContractError(f"{path}: file not found (expected {contract.name} Parquet)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ContractError(f"{path}: not a readable Parquet file ({e})") from None
    if not allow_empty and table.num_rows == 0:
        raise ContractError(f"{path} ({contract.name} contract): the file has no rows")
    return validate(table, contract, str(path))


def write_table(table: pa.Table, path: str | Path, contract: Contract) -> Path:
    """Validate against the contract (required columns first, in contract order), then write atomically."""
    table = validate(table, contract, str(path))
    ordered = contract.column_names() + [c for c in table.column_names if c not in contract.schema.names]
    table = table.select(ordered)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
