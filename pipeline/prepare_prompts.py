"""Stage prepare-prompts: train and held-out eval prompts (PROMPTS contract), rendered with the model's
chat template.

    python -m pipeline.prepare_prompts --params params.yaml --model data/models/base --out data/prompts.parquet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
from transformers import AutoTokenizer

from grpo.config import load_params
from grpo.contracts import PROMPTS, write_table
from grpo.prompts import file_rows, prompt_id, render_prompt, synthetic_rows
from pipeline.stage import run, stage

GSM8K_COLUMNS = ("question", "answer")


def _file_source(params) -> tuple[str, str, str]:
    """(question column, answer column, data_source name) for a file-backed prompts source."""
    p = params.prompts
    if p.path is None:
        raise ValueError(f"prompts.path = null is not allowed when prompts.source is {p.source!r}; expected a file path")
    if p.source == "gsm8k":
        return (*GSM8K_COLUMNS, "gsm8k")
    return p.question_column, p.answer_column, Path(p.path).stem


def build_rows(params) -> list[dict]:
    p = params.prompts
    if p.source == "synthetic":
        return synthetic_rows(params.train.seed, p.num_train, p.num_eval, p.min_operand, p.max_operand,
                              p.num_operands, p.operations)
    question, answer, source = _file_source(params)
    return file_rows(p.path, question, answer, params.train.seed, p.num_train, p.num_eval, source)


def check_source(params) -> None:
    """Raise the error prepare-prompts would raise, without a tokenizer (for check-inputs)."""
    if params.prompts.source != "synthetic":
        build_rows(params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="data/models/base", help="directory with the tokenizer")
    parser.add_argument("--out", default="data/prompts.parquet")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    reads = [args.model] + ([params.prompts.path] if params.prompts.path else [])
    with stage("prepare-prompts", reads=reads, writes=[args.out]) as log:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        rows = build_rows(params)
        for row in rows:
            row["prompt_id"] = prompt_id(row["data_source"], row["question"], row["ground_truth"])
            row["prompt"] = render_prompt(tokenizer, row["question"], params.prompts.system_prompt)
        write_table(pa.Table.from_pylist(rows), args.out, PROMPTS)
        log.update(train=sum(r["split"] == "train" for r in rows), eval=sum(r["split"] == "eval" for r in rows))


if __name__ == "__main__":
    run(main)
