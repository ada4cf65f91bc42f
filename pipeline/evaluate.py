"""Stage evaluate@k: greedy accuracy of checkpoint k on the held-out eval split.

    python -m pipeline.evaluate --iteration 0 --policy data/checkpoints/0 --prompts data/prompts.parquet \
        --out data/eval/0.parquet --metrics data/metrics/0/evaluate.json

What is measured follows the held-out tasks' ground truth: grpo/environments/evaluation.py (eval/accuracy,
eval/accuracy_strict, eval/format_rate for answers; eval/pass_rate for code tasks; the verifiers' scores for
reasoning-gym), plus eval/truncated_ratio and eval/mean_length.
"""

from __future__ import annotations

from pipeline.worker.client import delegate

if __name__ == "__main__":
    delegate("pipeline.evaluate")  # a running worker (pipeline/worker/) runs the stage and this exits; else it runs here

import time

import pandas as pd

from grpo.backends import SamplingSpec, backend_options, make_backend, select_backend
from grpo.config import load_params
from grpo.contracts import PROMPTS, read_table
from grpo.environments.evaluation import HELD_OUT_SCORERS
from grpo.environments.rewards import Sample
from grpo.environments.scoring import ground_truth_kind
from grpo.errors import InputError
from grpo.models.atomic import atomic_write, write_json
from grpo.models.cache import CheckpointCache
from grpo.models.loading import checkpoint_info
from pipeline.stage import iteration_parser, run, stage


def main(argv: list[str] | None = None, *, cache: CheckpointCache | None = None) -> None:
    """`cache`: a long-lived worker's checkpoints in memory (pipeline/worker/); None in a stage process."""
    args = iteration_parser(__doc__, policy="checkpoint to evaluate", prompts="prompts Parquet").parse_args(argv)
    params = load_params(args.params)
    k, e = args.iteration, params.eval
    with stage(f"evaluate@{k}", reads=[args.prompts, args.policy], writes=[args.out, args.metrics]) as log:
        if k % e.every:
            # only every eval.every-th checkpoint is evaluated (the base always): record the skip, no numbers
            atomic_write(args.out, lambda tmp: pd.DataFrame({"iteration": pd.Series([], dtype="int64")}).to_parquet(tmp))
            write_json(args.metrics, {"iteration": k, "eval/skipped": True})
            log.update(skipped=f"eval.every={e.every}")
            return
        prompts = read_table(args.prompts, PROMPTS).to_pandas()
        held_out = prompts[prompts["split"] == "eval"].sort_values("prompt_id")
        if held_out.empty:
            raise InputError(f"{args.prompts}: no rows with split 'eval'")
        kinds = sorted({ground_truth_kind(truth) for truth in held_out["ground_truth"]})
        if len(kinds) > 1:
            raise InputError(f"{args.prompts}: the held-out ground truths mix kinds {kinds}; expected one")
        name = select_backend(params.rollout.backend)
        options = backend_options(params, name) | ({"prompts_per_batch": e.batch_size} if name == "hf" else {})
        backend = make_backend(name, args.policy, cache=cache, **options)
        try:
            start = time.perf_counter()
            groups = backend.generate(held_out["prompt"].tolist(), SamplingSpec(1, 0.0, 1.0, e.max_new_tokens),
                                      [0] * len(held_out))
            seconds = time.perf_counter() - start
        finally:
            backend.close()
        completions = [g.completions[0] for g in groups]
        samples = [Sample(c.text, truth, len(c.token_ids), c.finish_reason)
                   for c, truth in zip(completions, held_out["ground_truth"])]
        results = pd.DataFrame({
            "iteration": k, "prompt_id": held_out["prompt_id"].to_numpy(), "question": held_out["question"].to_numpy(),
            "ground_truth": held_out["ground_truth"].to_numpy(), "metadata": held_out["metadata"].to_numpy(),
            "completion": [c.text for c in completions], "completion_tokens": [len(c.token_ids) for c in completions],
            "finish_reason": [c.finish_reason for c in completions],
        })
        columns, metrics = HELD_OUT_SCORERS.get(kinds[0])(samples, held_out["question"].tolist(), params)
        for name, values in columns.items():
            results[name] = values
        results["checkpoint_id"] = checkpoint_info(args.policy)["checkpoint_id"]
        atomic_write(args.out, lambda tmp: results.to_parquet(tmp, index=False))
        metrics = {
            "iteration": k, **metrics,
            "eval/truncated_ratio": float((results["finish_reason"] == "length").mean()),
            "eval/mean_length": float(results["completion_tokens"].mean()), "eval/num_problems": int(len(results)),
            "time/evaluate_seconds": seconds,
        }
        write_json(args.metrics, metrics)
        headline = "eval/pass_rate" if "eval/pass_rate" in metrics else "eval/accuracy"
        log.update(**{headline.split("/")[1]: f"{metrics[headline]:.3f}"}, problems=len(results))


if __name__ == "__main__":
    run(main)
