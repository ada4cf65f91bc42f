"""Prompt sources: synthetic arithmetic word problems (deterministic from a seed), GSM8K-format JSONL, and
any JSONL/Parquet with configurable question and answer columns. Rows follow the PROMPTS contract."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pandas as pd

from grpo.rewards import gsm8k_ground_truth

ANSWER_INSTRUCTION = "Give the final answer on the last line as: #### <number>"

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Max", "Nora", "Omar"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "stamps", "shells", "cards"]
# (phrase for one step, operator); {n} is the operand, {item} the thing counted
_STEPS = {
    "+": ["{name} gets {n} more {item}.", "A friend gives {name} {n} {item}.", "{name} finds {n} more {item}."],
    "-": ["{name} gives away {n} {item}.", "{name} loses {n} {item}.", "{name} uses {n} {item}."],
    "*": ["Then the number of {item} becomes {n} times as many."],
}


def prompt_id(data_source: str, question: str, ground_truth: str) -> str:
    """Stable id from the source and the content (not the row position)."""
    return hashlib.sha256(f"{data_source}\x1f{question}\x1f{ground_truth}".encode()).hexdigest()[:16]


def synthetic_problem(rng: random.Random, min_operand: int, max_operand: int, num_operands: int,
                      operations: tuple[str, ...]) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(min_operand, max_operand)
    sentences = [f"{name} has {total} {item}."]
    for _ in range(num_operands - 1):
        op = rng.choice(operations)
        n = rng.randint(min_operand, max_operand)
        if op == "-" and n > total:  # keep counts of things non-negative
            op = "+"
        if op == "*":
            n = rng.randint(2, 4)
        total = {"+": total + n, "-": total - n, "*": total * n}[op]
        sentences.append(rng.choice(_STEPS[op]).format(name=name, n=n, item=item))
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), total


def synthetic_rows(seed: int, num_train: int, num_eval: int, min_operand: int, max_operand: int,
                   num_operands: int, operations: tuple[str, ...]) -> list[dict]:
    """Train and eval problems from separate streams; eval questions never appear in train."""
    rows, seen = [], set()
    for split, count in (("eval", num_eval), ("train", num_train)):
        rng = random.Random(f"{seed}-{split}")
        made, attempts = 0, 0
        while made < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise ValueError(
                    f"prompts: cannot make {count} distinct {split} problems with operands in "
                    f"[{min_operand}, {max_operand}]; widen the range or ask for fewer"
                )
            question, answer = synthetic_problem(rng, min_operand, max_operand, num_operands, operations)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"split": split, "data_source": "synthetic_arithmetic", "question": question,
                         "ground_truth": str(answer), "metadata": json.dumps({"operations": list(operations)})})
            made += 1
    return rows


def read_records(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompts file not found (prompts.path)")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    raise ValueError(f"{path}: unsupported prompts file type {path.suffix!r}; expected .jsonl or .parquet")


def file_rows(path: str | Path, question_column: str, answer_column: str, seed: int, num_train: int,
              num_eval: int, data_source: str) -> list[dict]:
    """Rows from a JSONL/Parquet file: shuffled with the seed, the first num_eval held out for eval."""
    path = Path(path)
    df = read_records(path)
    if df.empty:
        raise ValueError(f"{path}: the prompts file has no rows")
    for key, column in (("prompts.question_column", question_column), ("prompts.answer_column", answer_column)):
        if column not in df.columns:
            raise ValueError(f"{path}: column {column!r} not found ({key}); columns: {', '.join(map(str, df.columns))}")
    if len(df) < 2:
        raise ValueError(f"{path}: needs at least 2 rows (one train, one eval), has {len(df)}")
    order = list(range(len(df)))
    random.Random(seed).shuffle(order)
    n_eval = min(num_eval, len(df) - 1)
    rows = []
    for rank, i in enumerate(order[: n_eval + num_train]):
        question, answer = df[question_column].iloc[i], df[answer_column].iloc[i]
        if question is None or answer is None or str(question).strip() == "":
            raise ValueError(f"{path}: row {i} has an empty {question_column!r} or {answer_column!r}")
        answer = str(answer)
        ground_truth = gsm8k_ground_truth(answer) if "####" in answer else answer.strip()
        rows.append({"split": "eval" if rank < n_eval else "train", "data_source": data_source,
                     "question": str(question), "ground_truth": ground_truth,
                     "metadata": json.dumps({"row": int(i), "source_file": path.name})})
    return rows


def render_prompt(tokenizer, question: str, system_prompt: str = "") -> str:
    """The question as the model expects it: its chat template, or a plain Q/A frame if it has none."""
    user = f"{question}\n{ANSWER_INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {user}\nAnswer:"


def iteration_batch(prompt_ids: list[str], seed: int, iteration: int, size: int) -> list[str]:
    """Iteration k's prompts: consecutive slices of one seeded permutation (epochs of the train split), so
    the batch depends only on (seed, k) and no prompt repeats before every prompt has been used."""
    order = sorted(prompt_ids)
    random.Random(f"{seed}/prompt-order").shuffle(order)
    start = (iteration - 1) * size
    return [order[(start + i) % len(order)] for i in range(size)]
