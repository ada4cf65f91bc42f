"""Stage evaluate@k: greedy accuracy of checkpoint k on the held-out eval split.

    python -m pipeline.evaluate --iteration 0 --policy data/checkpoints/0 --out data/eval/0.parquet
"""

from __future__ import annotations

import time

import pandas as pd

from grpo.errors import InputError
from grpo.config import load_params
from grpo.models import checkpoint_info
from grpo.contracts import PROMPTS, atomic_write, read_table
from grpo.backends import SamplingSpec, backend_options, make_backend, select_backend
from grpo.rewards import RewardSettings, Sample
from grpo.scoring import score_completions
from pipeline.stage import iteration_parser, run, stage, write_json


def main(argv: list[str] | None = None) -> None:
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
        name = select_backend(params.rollout.backend)
        options = backend_options(params, name) | ({"prompts_per_batch": e.batch_size} if name == "hf" else {})
        backend = make_backend(name, args.policy, **options)
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
        # accuracy as the training reward counts it (reward.strict_answer), and leniently for comparison
        settings = {strict: RewardSettings(strict, e.max_new_tokens, params.reward.overlong_buffer)
                    for strict in (True, False)}
        scores = {strict: score_completions(samples, {"correctness": 1.0, "format": 1.0}, settings[strict])
                  for strict in (True, False)}
        strict = params.reward.strict_answer
        results = pd.DataFrame({
            "iteration": k, "prompt_id": held_out["prompt_id"].to_numpy(), "question": held_out["question"].to_numpy(),
            "ground_truth": held_out["ground_truth"].to_numpy(), "completion": [c.text for c in completions],
            "completion_tokens": [len(c.token_ids) for c in completions],
            "finish_reason": [c.finish_reason for c in completions],
            "correct": [v == 1.0 for v in scores[strict]["reward_correctness"]],
            "correct_lenient": [v == 1.0 for v in scores[False]["reward_correctness"]],
            "format_ok": [v == 1.0 for v in scores[True]["reward_format"]],
            "checkpoint_id": checkpoint_info(args.policy)["checkpoint_id"],
        })
        atomic_write(args.out, lambda tmp: results.to_parquet(tmp, index=False))
        metrics = {
            "iteration": k, "eval/accuracy": float(results["correct"].mean()),
            "eval/accuracy_lenient": float(results["correct_lenient"].mean()),
            "eval/format_rate": float(results["format_ok"].mean()),
            "eval/truncated_ratio": float((results["finish_reason"] == "length").mean()),
            "eval/mean_length": float(results["completion_tokens"].mean()), "eval/num_problems": int(len(results)),
            "time/evaluate_seconds": seconds,
        }
        write_json(args.metrics, metrics)
        log.update(accuracy=f"{metrics['eval/accuracy']:.3f}", problems=len(results))


if __name__ == "__main__":
    run(main)
