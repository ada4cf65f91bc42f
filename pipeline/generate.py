"""Stage generate@k: G completions for each of iteration k's train prompts, sampled from checkpoint k-1.

    python -m pipeline.generate --iteration 1 --policy data/checkpoints/0 --prompts data/prompts.parquet \
        --out data/rollouts/1.parquet --metrics data/metrics/1/generate.json
"""

from __future__ import annotations

from pipeline.worker.client import delegate

if __name__ == "__main__":
    delegate("pipeline.generate")  # a running worker (pipeline/worker/) runs the stage and this exits; else it runs here

import time

import pandas as pd
import pyarrow as pa

from grpo.errors import InputError
from grpo.config import load_params
from grpo.models.cache import CheckpointCache
from grpo.models.loading import checkpoint_info
from grpo.contracts import PROMPTS, ROLLOUTS, read_table, write_table
from grpo.backends import SamplingSpec, backend_options, make_backend, select_backend
from grpo.backends.batches import iteration_batch, request_seed
from grpo.algorithm.metrics import completion_metrics
from grpo.models.atomic import write_json
from pipeline.stage import iteration_parser, run, stage


def main(argv: list[str] | None = None, *, cache: CheckpointCache | None = None) -> None:
    """`cache`: a long-lived worker's checkpoints in memory (pipeline/worker/); None in a stage process."""
    args = iteration_parser(__doc__, policy="checkpoint directory of iteration k-1",
                            prompts="prompts Parquet").parse_args(argv)
    params = load_params(args.params)
    k, r = args.iteration, params.rollout
    with stage(f"generate@{k}", reads=[args.prompts, args.policy], writes=[args.out, args.metrics]) as log:
        prompts = read_table(args.prompts, PROMPTS).to_pandas()
        train = prompts[prompts["split"] == "train"].set_index("prompt_id")
        if train.empty:
            raise InputError(f"{args.prompts}: no rows with split 'train'")
        batch = train.loc[iteration_batch(train.index.tolist(), params.train.seed, k, r.prompts_per_iteration)]
        seeds = [request_seed(params.train.seed, k, pid) for pid in batch.index]
        checkpoint_id = checkpoint_info(args.policy)["checkpoint_id"]
        name = select_backend(r.backend)
        loading = time.perf_counter()
        backend = make_backend(name, args.policy, cache=cache, **backend_options(params, name))
        load_seconds = time.perf_counter() - loading
        try:
            start = time.perf_counter()
            groups = backend.generate(batch["prompt"].tolist(),
                                      SamplingSpec(r.group_size, r.temperature, r.top_p, r.max_new_tokens), seeds)
            seconds = time.perf_counter() - start
        finally:
            backend.close()
        rows = []
        for (pid, prompt), seed, group in zip(batch.iterrows(), seeds, groups):
            for j, c in enumerate(group.completions):
                rows.append({
                    "iteration": k, "prompt_id": pid, "group_id": f"{k}-{pid}", "sample_index": j,
                    "prompt": prompt["prompt"], "completion": c.text, "prompt_token_ids": group.prompt_token_ids,
                    "completion_token_ids": c.token_ids, "completion_logprobs": c.logprobs,
                    "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids),
                    "ground_truth": prompt["ground_truth"], "data_source": prompt["data_source"],
                    "checkpoint_id": checkpoint_id, "backend": name, "temperature": r.temperature, "top_p": r.top_p,
                    "seed": seed, "metadata": prompt["metadata"],
                })
        write_table(pa.Table.from_pylist(rows, schema=ROLLOUTS.schema), args.out, ROLLOUTS)
        metrics = completion_metrics(pd.DataFrame(rows))
        tokens = int(sum(row["completion_tokens"] for row in rows))
        metrics.update({"iteration": k, "time/generate_seconds": seconds, "time/generate_load_seconds": load_seconds,
                        "time/generate_startup_seconds": log.startup_seconds, "tokens/generated": tokens,
                        "tokens/generate_per_second": tokens / max(seconds, 1e-9)})
        write_json(args.metrics, metrics)
        log.update(backend=name, completions=len(rows), tokens=tokens, tokens_per_s=f"{tokens / seconds:.0f}")


if __name__ == "__main__":
    run(main)
