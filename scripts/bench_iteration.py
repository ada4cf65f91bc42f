"""One GRPO iteration of ours against TRL's GRPOTrainer on identical work, side by side in one invocation.

    python scripts/bench_iteration.py                          # the embedded default, 7 iterations each
    python scripts/bench_iteration.py --gsm8k --iterations 3   # GSM8K: 1000 train prompts, 192 new tokens
    python scripts/bench_iteration.py --skip-trl               # ours only, with the per-stage breakdown

Ours: a clean clone of this repository's HEAD (committed code only), the workload's params applied, the
README's plain `dvc repro` (its stages in the worker the first of them starts, pipeline/worker/; --no-worker:
GRPO_WORKER=off, every stage in its own process), the setup (`dvc repro evaluate-base`: model, prompts, base
evaluation, and the worker's start) untimed, then `dvc repro update@N` timed: seconds per iteration = its wall
time / N, everything included (stage process starts, model loads, checkpoint writes, DVC).
TRL: `GRPOTrainer` from the same checkpoint 0, on the same prompts in the same order (the ones our rollouts
used, chat template applied), with our reward functions and weights, G completions each, the same new-token
limit, temperature, top_p, beta, clip epsilon, learning rate and warm-up, the same optimizer steps per
generation (per_device_train_batch_size = optim.micro_batch_size, gradient_accumulation_steps =
minibatch / micro, generation_batch_size = prompts x G), the loss_type of our loss.aggregation ("dapo" for
token_mean: token losses summed over a token count, TRL's the generation batch's count / steps per generation,
ours the minibatch's; "grpo" for seq_mean_token_mean), bf16
autocast on fp32 weights: seconds per generation = trainer.train()'s wall time / N (its one-time start-up,
imports and model loads, is printed apart). Both trained models are scored by our evaluate stage on the same
held-out problems.

TRL runs in its own Python (--trl-python, default this one) so that it stays out of the main environment:

    python -m venv --system-site-packages .venv-trl && .venv-trl/bin/pip install "trl==1.16.0"
    python scripts/bench_iteration.py --trl-python .venv-trl/bin/python

Prints a table and writes everything it measured to <workdir>/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k" / "test.jsonl"
TRL_VERSION = "1.16.0"

# loss.aggregation -> TRL's loss_type that normalises the same way
TRL_LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}

# our per-iteration metrics -> the breakdown's rows (seconds summed over the iteration's stages)
BREAKDOWN = {
    "process start and imports": ["time/generate_startup_seconds", "time/score_startup_seconds",
                                  "time/advantages_startup_seconds", "time/update_startup_seconds"],
    "model load (generate, update)": ["time/generate_load_seconds", "time/update_load_seconds"],
    "generation": ["time/generate_seconds"],
    "scoring": ["time/score_seconds"],
    "log-prob passes (reference, pi_old)": ["time/update_logprob_seconds"],
    "optimizer steps (forward, backward, AdamW)": ["time/update_steps_seconds"],
    "checkpoint write": ["time/update_save_seconds"],
}


def workload_overrides(gsm8k: bool, iterations: int) -> dict:
    overrides = {"train.iterations": {str(k): k - 1 for k in range(1, iterations + 1)}, "eval.every": iterations}
    if gsm8k:
        if not GSM8K.exists():
            sys.exit(f"error: --gsm8k needs {GSM8K}")
        overrides.update({"prompts.source": "gsm8k", "prompts.path": str(GSM8K), "prompts.num_train": 1000,
                          "rollout.max_new_tokens": 192, "eval.max_new_tokens": 192})
    return overrides


def sh(cmd: list[str], cwd: Path, log: Path, env: dict | None = None) -> float:
    """Run cmd, its output appended to log; its wall time. Exits with the log's tail when it fails."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.call(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"error: {' '.join(cmd)} failed ({code}) in {cwd}; the end of {log}:\n{tail}")
    return time.perf_counter() - start


def run_ours(work: Path, overrides: dict, iterations: int, use_worker: bool) -> dict:
    ours = work / "ours"
    log = work / "ours.log"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(ours)], check=True)
    (work / "overrides.yaml").write_text(json.dumps(overrides))  # JSON is YAML
    sh([sys.executable, "scripts/apply_params.py", str(work / "overrides.yaml")], ours, log)
    # the README's plain `dvc repro`: its first worker stage (evaluate-base, in the setup) starts the worker
    env = dict(os.environ) if use_worker else dict(os.environ, GRPO_WORKER="off")
    try:
        print(f"ours: setup (dvc repro evaluate-base) in {ours}", flush=True)
        setup = sh(["dvc", "repro", "evaluate-base"], ours, log, env)
        print(f"ours: {iterations} iterations (dvc repro update@{iterations})"
              f"{'' if use_worker else ', GRPO_WORKER=off'} ...", flush=True)
        seconds = sh(["dvc", "repro", f"update@{iterations}"], ours, log, env)
        sh(["dvc", "repro", f"evaluate@{iterations}"], ours, log, env)
    finally:
        if use_worker:
            subprocess.run([sys.executable, "-m", "pipeline.worker", "--stop"], cwd=ours, capture_output=True)
    per_iteration = []
    for k in range(1, iterations + 1):
        merged = {}
        for name in ("generate", "score", "advantages", "update"):
            merged.update(json.loads((ours / f"data/metrics/{k}/{name}.json").read_text()))
        per_iteration.append(merged)
    breakdown = {row: sum(sum(m.get(key, 0.0) for key in keys) for m in per_iteration) / iterations
                 for row, keys in BREAKDOWN.items()}
    breakdown["DVC, file I/O and the rest"] = seconds / iterations - sum(breakdown.values())
    tokens = {name: sum(m[f"tokens/{name}_per_second"] for m in per_iteration) / iterations
              for name in ("generate", "update")}
    lengths = [m["completions/mean_length"] for m in per_iteration]
    return {"workspace": str(ours), "worker": use_worker,
            "completion_mean_length": sum(lengths) / iterations,
            "setup_seconds": setup, "seconds": seconds,
            "seconds_per_iteration": seconds / iterations, "breakdown_per_iteration": breakdown,
            "tokens_per_second": tokens,
            "accuracy_base": _accuracy(ours / "data/metrics/0/evaluate.json"),
            "accuracy_trained": _accuracy(ours / f"data/metrics/{iterations}/evaluate.json")}


def _accuracy(path: Path) -> float:
    return json.loads(path.read_text())["eval/accuracy"]


def run_trl(work: Path, trl_python: str, iterations: int) -> dict:
    """TRL's GRPOTrainer in trl_python (the --trl-worker mode of this script) on our workspace's checkpoint 0
    and prompts; then our evaluate stage on the model it trained."""
    ours = work / "ours"
    log = work / "trl.log"
    out = work / "trl-model"
    result_file = work / "trl.json"
    print(f"TRL: {iterations} generations (GRPOTrainer, {trl_python}) ...", flush=True)
    sh([trl_python, str(Path(__file__).resolve()), "--trl-worker", str(ours), "--iterations", str(iterations),
        "--out", str(out), "--result", str(result_file)], ours, log)
    result = json.loads(result_file.read_text())
    # checkpoint.json, as our stages expect of a checkpoint folder
    (out / "checkpoint.json").write_text(json.dumps({"checkpoint_id": f"trl-{iterations}", "iteration": iterations,
                                                     "parent": "base", "global_step": result["optimizer_steps"]}))
    sh([sys.executable, "-m", "pipeline.evaluate", "--params", "params.yaml", "--iteration", str(iterations),
        "--policy", str(out), "--prompts", "data/prompts.parquet", "--out", str(work / "trl-eval.parquet"),
        "--metrics", str(work / "trl-eval.json")], ours, log)
    result["accuracy_trained"] = _accuracy(work / "trl-eval.json")
    return result


def trl_worker(workspace: Path, iterations: int, out: Path, result_file: Path) -> None:
    """Runs in TRL's Python, in our workspace (after our run): the same prompts, rewards and settings."""
    began = time.perf_counter()
    sys.path.insert(0, str(workspace))
    import pandas as pd
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpo.config import load_params
    from grpo.environments.rewards import Sample
    from grpo.environments.scoring import reward_settings, score_completions

    params = load_params(workspace / "params.yaml")
    r, o, loss = params.rollout, params.optim, params.loss
    # the prompts our iterations used, in order: one row per group
    rows = []
    for k in range(1, iterations + 1):
        rollouts = pd.read_parquet(workspace / f"data/rollouts/{k}.parquet")
        groups = rollouts.drop_duplicates("group_id", keep="first")
        rows += groups[["prompt", "ground_truth"]].to_dict("records")
    settings = reward_settings(params)
    eos_ids = None

    def make_reward(name: str):
        def reward(prompts, completions, completion_ids, ground_truth, **_):
            samples = [Sample(text, truth, len(ids), "stop" if ids and ids[-1] in eos_ids else "length")
                       for text, ids, truth in zip(completions, completion_ids, ground_truth)]
            return score_completions(samples, {name: 1.0}, settings)[f"reward_{name}"]

        reward.__name__ = name
        return reward

    names = list(params.reward.weights)
    steps_per_generation = (r.prompts_per_iteration * r.group_size) // o.micro_batch_size
    config = GRPOConfig(
        output_dir=str(out.parent / "trl-output"), report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=True, bf16=o.bf16, seed=params.train.seed, model_init_kwargs={"dtype": "float32"},
        per_device_train_batch_size=o.micro_batch_size, gradient_accumulation_steps=o.minibatch_size // o.micro_batch_size,
        generation_batch_size=r.prompts_per_iteration * r.group_size, num_generations=r.group_size,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
        beta=loss.beta, epsilon=loss.clip_low, loss_type=TRL_LOSS_TYPES[loss.aggregation], scale_rewards=params.advantage.scale, num_iterations=o.epochs,
        learning_rate=o.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, shuffle_dataset=False,
        max_steps=iterations * steps_per_generation // (o.minibatch_size // o.micro_batch_size) * o.epochs,
        reward_weights=[params.reward.weights[n] for n in names], dataloader_num_workers=0,
    )
    from grpo.models.lora import peft_config  # the same adapter as ours (model.lora), or full fine-tuning (null)

    lora = None if params.model.lora is None else peft_config(params.model.lora)
    trainer = GRPOTrainer(model=str(workspace / "data/checkpoints/0"), reward_funcs=[make_reward(n) for n in names],
                          args=config, train_dataset=Dataset.from_list(rows), peft_config=lora)
    tokenizer = trainer.processing_class
    eos_ids = {tokenizer.eos_token_id, *([] if tokenizer.pad_token_id is None else [tokenizer.pad_token_id])}
    startup = time.perf_counter() - began
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    result_file.write_text(json.dumps({
        "trl_version": trl.__version__, "startup_seconds": startup, "seconds": seconds,
        "seconds_per_iteration": seconds / iterations, "optimizer_steps": trainer.state.global_step,
        "prompts": len(rows), "completion_mean_length": _mean_logged(trainer.state.log_history,
                                                                     "completions/mean_length")}))


def _mean_logged(history: list[dict], key: str) -> float | None:
    """The mean of a metric over TRL's logged steps (None when TRL did not log it)."""
    values = [entry[key] for entry in history if key in entry]
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=7)
    parser.add_argument("--gsm8k", action="store_true", help="the GSM8K workload (1000 train prompts, 192 new tokens)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--trl-python", default=sys.executable)
    parser.add_argument("--no-worker", action="store_true",
                        help="every stage in its own process, GRPO_WORKER=off (default: the worker dvc repro starts)")
    parser.add_argument("--workdir", help="where the runs go (default: a new temporary folder, kept)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(Path(args.trl_worker), args.iterations, Path(args.out), Path(args.result))
    if not args.skip_trl:
        check = subprocess.run([args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
        if check.returncode:
            sys.exit(f"error: {args.trl_python} cannot import trl; install it apart from the main environment:\n"
                     f"  python -m venv --system-site-packages .venv-trl && .venv-trl/bin/pip install trl=={TRL_VERSION}\n"
                     "  then pass --trl-python .venv-trl/bin/python (or --skip-trl)")
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        print("note: uncommitted changes are not benchmarked (ours runs a clone of HEAD)", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-iteration-")).resolve()
    if work.exists() and any(work.iterdir()):
        sys.exit(f"error: --workdir {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    n = args.iterations
    results = {"workload": "gsm8k" if args.gsm8k else "default", "iterations": n,
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip(), "cpus": os.cpu_count()}
    results["ours"] = run_ours(work, workload_overrides(args.gsm8k, n), n, use_worker=not args.no_worker)
    if not args.skip_trl:
        results["trl"] = run_trl(work, args.trl_python, n)
    (work / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"\nall measurements: {work / 'bench.json'}")


def report(results: dict) -> None:
    ours, trl = results["ours"], results.get("trl")
    print(f"\nworkload {results['workload']}, {results['iterations']} iterations each, commit {results['commit']}, "
          f"{results['cpus']} CPUs")
    print(f"{'':34}{'s / iteration':>14}{'held-out accuracy':>22}")
    name = "ours (dvc repro)" if ours["worker"] else "ours (dvc repro, GRPO_WORKER=off)"
    print(f"{name:34}{ours['seconds_per_iteration']:>14.1f}"
          f"{ours['accuracy_base']:>13.3f} -> {ours['accuracy_trained']:.3f}")
    if trl:
        print(f"{'TRL ' + trl['trl_version'] + ' GRPOTrainer':34}{trl['seconds_per_iteration']:>14.1f}"
              f"{ours['accuracy_base']:>13.3f} -> {trl['accuracy_trained']:.3f}")
        print(f"ratio ours / TRL: {ours['seconds_per_iteration'] / trl['seconds_per_iteration']:.2f}"
              f"   (TRL's one-time start-up, not counted: {trl['startup_seconds']:.1f} s)")
    if ours["worker"]:
        print("ours: the worker's one-time start-up is in the untimed setup, as TRL's is")
    if trl and trl.get("completion_mean_length"):
        # the same work means completions of about the same length: a run that collapsed to short answers
        # does less of it, and its ratio says nothing
        a, b = ours["completion_mean_length"], trl["completion_mean_length"]
        print(f"mean completion length: ours {a:.1f} tokens, TRL {b:.1f}"
              + ("" if abs(a - b) <= 0.25 * max(a, b) else "   WARNING: not the same amount of work (> 25% apart)"))
    print("\nours, seconds per iteration:")
    for row, seconds in ours["breakdown_per_iteration"].items():
        print(f"  {row:44}{seconds:8.1f}")
    print(f"  {'total':44}{ours['seconds_per_iteration']:8.1f}")
    print(f"throughput: generation {ours['tokens_per_second']['generate']:.0f} tokens/s, "
          f"update {ours['tokens_per_second']['update']:.0f} tokens/s")


if __name__ == "__main__":
    main()
