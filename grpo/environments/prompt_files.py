"""Prompts files (prompts.source gsm8k or file): every row read and validated, duplicates dropped.

1. read_prompt_file validates every row. A JSONL line must be UTF-8 and one JSON object; the question must be
   a non-empty string; the answer a non-empty string or a number (int/float, not bool: 3 -> "3", 2.5 -> "2.5",
   an integral float 3.0 -> "3"). With source gsm8k the answer must end in a final line `#### N` (N a number:
   digits, optionally a minus sign, thousands commas 1,000 and decimals); with source file it may be a bare
   value or end in `#### N`. Every bad row is reported in one InputError that names the file, the 1-based
   line (JSONL: the physical line in the file; blank lines are allowed and skipped) or row (Parquet), the
   column and what is wrong, so a user fixes them all in one go (the listing stops after MAX_LISTED).
   With prompts.tests_column (source file: coding tasks) the ground truth comes from that column instead of
   the answer column: a JSON object {"test": "def check(candidate): ...", "entry_point": "name"[, "prompt":
   "..."]} (grpo.environments.code_tasks), given as an object (a JSONL object, a Parquet struct) or as a string holding
   one; it is checked as the code_tests reward reads it, and stored as JSON. The question column is what the
   model is asked (e.g. "Write a function add(a, b) that returns a + b."); the prompt names the entry point.
2. Duplicate questions (equal after stripping and collapsing whitespace): when they have the same ground
   truth, the first occurrence is kept and the others are dropped (PromptFile.duplicates, which the stages
   log); when their ground truths differ, that is an error naming both lines.
3. split_rows shuffles the rows with the seed and holds out the first num_eval for eval. grpo.environments.prompts drops
   the prompts too long for the model before the split, so a question is never in both train and eval (nor
   do two rows share a prompt_id), and num_train / num_eval count only usable prompts.
"""

from __future__ import annotations

import codecs
import json
import math
import random
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from grpo.environments.answers import MARKER, ground_truth_number
from grpo.environments.code_tasks import parse_ground_truth as parse_code_task
from grpo.errors import InputError

GSM8K_COLUMNS = ("question", "answer")  # the columns prompts.source gsm8k reads
MAX_LISTED = 20  # bad rows listed in one error; the rest are counted
SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class PromptFile:
    """The valid rows of a prompts file, duplicates dropped, in file order."""

    path: Path
    unit: str  # "line" (JSONL: physical line in the file) or "row" (Parquet), both 1-based
    data_source: str
    rows: list[dict] = field(default_factory=list)  # {"row": n, "question": str, "ground_truth": str}
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (dropped line/row, the earlier one it repeats)

    def duplicates_note(self) -> str:
        """'dropped 2 duplicate questions (lines 5, 9: ...)', or '' when none was dropped."""
        if not self.duplicates:
            return ""
        listed = ", ".join(str(n) for n, _ in self.duplicates[:MAX_LISTED])
        more = f" and {len(self.duplicates) - MAX_LISTED} more" if len(self.duplicates) > MAX_LISTED else ""
        plural = "s" if len(self.duplicates) > 1 else ""
        return (f"{self.path}: dropped {len(self.duplicates)} duplicate question{plural} ({self.unit}{plural} "
                f"{listed}{more}: same question and answer as an earlier {self.unit}, which is kept)")


@dataclass
class _Problems:
    """What is wrong with a file: file-level problems and (row, text) problems, reported together."""

    path: Path
    unit: str
    file_level: list[str] = field(default_factory=list)
    rows: list[tuple[int, str]] = field(default_factory=list)

    def add(self, n: int, text: str, column: str | None = None) -> None:
        self.rows.append((n, f"{self.unit} {n}, column {column!r}: {text}" if column else f"{self.unit} {n}: {text}"))

    def raise_if_any(self) -> None:
        texts = self.file_level + [text for _, text in sorted(self.rows, key=lambda r: r[0])]
        if not texts:
            return
        if len(texts) == 1:
            raise InputError(f"{self.path}: {texts[0]}")
        bad = len({n for n, _ in self.rows})
        if self.file_level:
            header = f"{self.path}: {len(texts)} problems:"
        elif bad == len(texts):
            header = f"{self.path}: {bad} bad {self.unit}s:"
        else:
            header = f"{self.path}: {bad} bad {self.unit}{'s' if bad > 1 else ''} ({len(texts)} problems):"
        listed = [f"  {t}" for t in texts[:MAX_LISTED]]
        if len(texts) > MAX_LISTED:
            listed.append(f"  ... and {len(texts) - MAX_LISTED} more")
        raise InputError("\n".join([header, *listed]))


def _short(value, limit: int = 60) -> str:
    """A value as it would read in the file (JSON), cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value) -> str:
    """'a list ([1, 2])', 'a boolean (true)', ..."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, (int, float, Decimal)):
        kind = "a number"
    elif isinstance(value, (list, tuple)):
        kind = "a list"
    elif isinstance(value, dict):
        kind = "an object"
    elif isinstance(value, str):
        kind = "a string"
    else:
        kind = f"a {type(value).__name__}"
    return f"{kind} ({_short(value)})"


def _question_problem(value) -> str | None:
    expected = "expected a non-empty string"
    if value is None:
        return f"is null; {expected}"
    if not isinstance(value, str):
        return f"is {_describe(value)}; {expected}"
    if value == "":
        return f"is empty; {expected}"
    if not value.strip():
        return f"is blank (whitespace only); {expected}"
    return None


def parse_answer(value, gsm8k: bool = False) -> tuple[str | None, str | None]:
    """(ground truth, None) for a valid answer cell, or (None, what is wrong). See the module docstring."""
    expected = ("expected a GSM8K solution ending in a final line '#### N'" if gsm8k
                else "expected a non-empty string or a number")
    if value is None:
        return None, f"is null; {expected}"
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        return None, f"is {_describe(value)}; {expected}"
    if isinstance(value, (float, Decimal)):
        if not (math.isfinite(value) if isinstance(value, float) else value.is_finite()):
            return None, f"is {_describe(value)}; expected a finite number"
        text = str(int(value)) if value == int(value) else str(value)
    else:
        text = str(value)
    if not text.strip():
        return None, f"is {'empty' if text == '' else 'blank (whitespace only)'}; {expected}"
    if MARKER not in text:
        if gsm8k:
            return None, (f"has no final line '#### N' (GSM8K format: the solution, then '#### <number>'); "
                          f"it ends with {_short(text.strip()[-40:])}")
        return text.strip(), None
    before, after = text.rsplit(MARKER, 1)
    number = ground_truth_number(after)
    if number is None:
        got = f"by {_short(after.strip(), 40)}" if after.strip() else "by nothing"
        return None, f"'####' is followed {got}; expected '#### N' with N a number (like 42, -3, 1,000 or 2.5)"
    if gsm8k and before.rsplit("\n", 1)[-1].strip():
        return None, "'#### N' is not on a line of its own (GSM8K format: the solution, then a final line '#### N')"
    return number, None


def parse_tests(value) -> tuple[str | None, str | None]:
    """(the code task's ground truth as JSON, None) for a valid tests cell, or (None, what is wrong)."""
    expected = 'expected a JSON object {"test": ..., "entry_point": ...[, "prompt": ...]}'
    if value is None:
        return None, f"is null; {expected}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            return None, f"is a string that is not JSON ({e}); {expected}"
    if not isinstance(value, dict):
        return None, f"is {_describe(value)}; {expected}"
    if value.get("prompt") is None:  # a Parquet struct has every field, null where a row has none
        value = {k: v for k, v in value.items() if k != "prompt"}
    text = json.dumps(value, ensure_ascii=False)
    try:
        parse_code_task(text)
    except ValueError as e:
        return None, str(e)
    return text, None


def _jsonl_records(path: Path, problems: _Problems) -> tuple[list[tuple[int, dict]], list[str], bool]:
    """((line, object) per valid JSON object line, column names in order of first appearance, any non-blank line)."""
    records, columns, nonblank = [], {}, False
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            nonblank = True
            problems.add(n, f"not valid UTF-8 ({e.reason}: byte {raw[e.start]:#04x} at byte {e.start + 1} of the "
                            "line); save the file as UTF-8")
            continue
        if not text.strip():
            continue
        nonblank = True
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.add(n, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.add(n, f"is {_describe(obj)}, not a JSON object")
            continue
        records.append((n, obj))
        columns.update(dict.fromkeys(obj))
    return records, [str(c) for c in columns], nonblank


def _parquet_records(path: Path, wanted: tuple[str, str]) -> tuple[list[tuple[int, dict]], list[str]]:
    """((row, {column: value}) for every row, the file's column names); only the wanted columns are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise InputError(f"{path}: not a readable Parquet file ({reason})") from None
    columns = [str(c) for c in table.column_names]
    values = {c: table.column(c).to_pylist() for c in dict.fromkeys(wanted) if c in columns}
    records = [(i + 1, {c: v[i] for c, v in values.items()}) for i in range(table.num_rows)]
    return records, columns


def read_prompt_file(path: str | Path, question_column: str, answer_column: str, *, gsm8k: bool = False,
                     data_source: str | None = None, tests_column: str | None = None) -> PromptFile:
    """Read and validate every row of a JSONL/Parquet prompts file and drop duplicate questions (see the
    module docstring). With tests_column the ground truth is that column's code tests, and answer_column is
    not read. Raises InputError listing every problem, each with its line/row and column."""
    if tests_column is not None:
        answer_column = tests_column
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: prompts file not found (prompts.path)")
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported prompts file type {path.suffix!r}; expected .jsonl (one JSON object "
                         f"per line) or .parquet")
    if not path.is_file():
        raise InputError(f"{path}: not a file; expected a JSONL or Parquet file (prompts.path)")
    unit = "line" if path.suffix == ".jsonl" else "row"
    problems = _Problems(path, unit)
    if unit == "line":
        records, columns, nonblank = _jsonl_records(path, problems)
    else:
        records, columns = _parquet_records(path, (question_column, answer_column))
        nonblank = bool(records)
    if not nonblank:
        raise InputError(f"{path}: the prompts file has no rows")

    keys = ((("prompts.source gsm8k reads 'question' and 'answer'",) * 2) if gsm8k
            else ("prompts.question_column", "prompts.tests_column" if tests_column else "prompts.answer_column"))
    present = {}
    for key, column in zip(keys, (question_column, answer_column)):
        present[column] = column in columns
        if records and not present[column]:
            problems.file_level.append(f"column {column!r} not found ({key}); columns: {', '.join(columns)}")

    valid = []
    for n, record in records:
        ok = True
        if present[question_column]:
            if question_column not in record:
                problems.add(n, "missing", question_column)
                ok = False
            elif (problem := _question_problem(record[question_column])) is not None:
                problems.add(n, problem, question_column)
                ok = False
        if present[answer_column]:
            if answer_column not in record:
                problems.add(n, "missing", answer_column)
                ok = False
            else:
                ground_truth, problem = (parse_tests(record[answer_column]) if tests_column
                                         else parse_answer(record[answer_column], gsm8k))
                if problem is not None:
                    problems.add(n, problem, answer_column)
                    ok = False
        if ok and all(present.values()):
            valid.append({"row": n, "question": record[question_column], "ground_truth": ground_truth})

    rows, duplicates, first = [], [], {}
    for row in valid:
        key = " ".join(row["question"].split())
        if key not in first:
            first[key] = row
            rows.append(row)
        elif first[key]["ground_truth"] == row["ground_truth"]:
            duplicates.append((row["row"], first[key]["row"]))
        else:
            kept = first[key]
            what, show = ("tests", _short) if tests_column else ("answer", repr)
            problems.add(row["row"], f"repeats the question of {unit} {kept['row']} with a different {what} "
                                     f"({show(row['ground_truth'])} here, {show(kept['ground_truth'])} on {unit} "
                                     f"{kept['row']})", question_column)
    problems.raise_if_any()
    if len(rows) < 2:
        dropped = f" after dropping {len(duplicates)} duplicates" if duplicates else ""
        raise InputError(f"{path}: needs at least 2 rows (one train, one eval), has {len(rows)}{dropped}")
    return PromptFile(path, unit, data_source or ("gsm8k" if gsm8k else path.stem), rows, duplicates)


def read_prompts_source(prompts) -> PromptFile | None:
    """The validated rows of params.prompts' file (source gsm8k or file); None for the sources without a file
    (synthetic, humaneval, reasoning_gym)."""
    if prompts.source not in ("gsm8k", "file"):
        return None
    if not prompts.path:
        raise InputError(f"prompts.path = null is not allowed when prompts.source is {prompts.source!r}; "
                         "expected a JSONL or Parquet path")
    if prompts.source == "gsm8k":
        return read_prompt_file(prompts.path, *GSM8K_COLUMNS, gsm8k=True)
    return read_prompt_file(prompts.path, prompts.question_column, prompts.answer_column,
                            tests_column=prompts.tests_column)


def split_rows(rows: list[dict], seed: int, num_train: int, num_eval: int, data_source: str, source_file: str,
               where: str | Path = "") -> list[dict]:
    """PROMPTS rows: `rows` shuffled with the seed, the first num_eval (at most all but one) held out for eval,
    the next num_train for train. A row's "prompt", when set (skip_too_long), is carried over; so is its
    "metadata" (JSON), else the metadata names its line/row and source_file."""
    if len(rows) < 2:
        raise InputError(f"{where}: needs at least 2 usable rows (one train, one eval), has {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(num_eval, len(rows) - 1)
    out = []
    for rank, i in enumerate(order[: n_eval + num_train]):
        row = rows[i]
        out.append({"split": "eval" if rank < n_eval else "train", "data_source": data_source,
                    "question": row["question"], "ground_truth": row["ground_truth"],
                    "metadata": row.get("metadata") or json.dumps({"row": int(row["row"]), "source_file": source_file}),
                    **({"prompt": row["prompt"]} if "prompt" in row else {})})
    return out


def file_rows(path: str | Path, question_column: str, answer_column: str, seed: int, num_train: int,
              num_eval: int, data_source: str, *, gsm8k: bool = False) -> list[dict]:
    """Rows from a JSONL/Parquet file, validated and deduplicated (read_prompt_file), then split with the seed
    (split_rows). No length check: build_prompt_rows adds it."""
    prompts = read_prompt_file(path, question_column, answer_column, gsm8k=gsm8k, data_source=data_source)
    return split_rows(prompts.rows, seed, num_train, num_eval, prompts.data_source, prompts.path.name, prompts.path)


