"""Stage prepare-prompts: train and held-out eval prompts (PROMPTS contract), rendered with the model's
chat template.

    python -m pipeline.prepare_prompts --params params.yaml --model data/checkpoints/0 --out data/prompts.parquet \
        --skipped data/prompts.skipped.jsonl

The rows are validated (grpo.environments.prompts.read_prompt_file: a bad row stops the stage with an error naming its
file, line or row and column), duplicate questions are dropped, and prompts too long for the model's context
(the prompt's tokens + max(rollout.max_new_tokens, eval.max_new_tokens) > max_position_embeddings, or
rollout.vllm.max_model_len when vLLM may run) are skipped before the train/eval split and listed in --skipped
(JSONL, one object per skipped row; empty when none was skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pyarrow as pa
from transformers import AutoTokenizer

from grpo.config import load_params
from grpo.contracts import PROMPTS, write_table
from grpo.models.atomic import write_text
from grpo.environments.prompts import build_prompt_rows, model_context, prompt_id
from pipeline.stage import run, stage


def write_skipped(path: str | Path, skipped: list[dict]) -> Path:
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in skipped)
    return write_text(path, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="data/checkpoints/0", help="directory with the tokenizer")
    parser.add_argument("--out", default="data/prompts.parquet")
    parser.add_argument("--skipped", default="data/prompts.skipped.jsonl",
                        help="JSONL of the rows skipped as too long for the model's context (always written)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    reads = [args.model] + ([params.prompts.path] if params.prompts.path else [])
    logger = logging.getLogger("pipeline")
    with stage("prepare-prompts", reads=reads, writes=[args.out, args.skipped]) as log:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        context = model_context(args.model, params.rollout.backend, params.rollout.vllm.max_model_len)
        max_new_tokens = max(params.rollout.max_new_tokens, params.eval.max_new_tokens)
        prepared = build_prompt_rows(params.prompts, params.train.seed, tokenizer, context=context,
                                     max_new_tokens=max_new_tokens)
        if prepared.source is not None and prepared.source.duplicates:
            logger.info("prepare-prompts: %s", prepared.source.duplicates_note())
        if prepared.skipped:
            logger.warning("prepare-prompts: skipped %d prompts longer than %d tokens (context %d - max_new_tokens "
                           "%d); listed in %s", len(prepared.skipped), context - max_new_tokens, context,
                           max_new_tokens, args.skipped)
        rows = prepared.rows
        for row in rows:
            row["prompt_id"] = prompt_id(row["data_source"], row["question"], row["ground_truth"])
        write_table(pa.Table.from_pylist(rows), args.out, PROMPTS)
        write_skipped(args.skipped, prepared.skipped)
        log.update(train=sum(r["split"] == "train" for r in rows), eval=sum(r["split"] == "eval" for r in rows),
                   duplicates_dropped=len(prepared.source.duplicates) if prepared.source else 0,
                   too_long_skipped=len(prepared.skipped))


if __name__ == "__main__":
    run(main)
