"""Generation throughput of the rollout backends: vLLM vs transformers on the same prompts and group size.

    python scripts/bench_generation.py                                   # data/checkpoints/0, 8 prompts x G=8 x 48
    python scripts/bench_generation.py --model /tmp/base --prompts 16 --group-size 8 --max-new-tokens 64
    python scripts/bench_generation.py --backends vllm                   # one backend only

Each backend runs in its own subprocess (fresh interpreter: its imports, threads and memory are its own) and is
built with grpo.backends.make_backend, exactly as the generate stage builds it. Measured per backend:

    start     seconds to build the backend: imports + checkpoint load (+ vLLM engine start, its processes)
    generate  seconds of one backend.generate(prompts, SamplingSpec(n=G, ...), seeds) call
    tokens    completion tokens returned (EOS included; HF's padding after an EOS is not counted)

and tokens/s excluding the start (tokens / generate) and including it (tokens / (start + generate)), then the
ratios vLLM / HF of both. vLLM's close() time (engine shutdown) is printed too but is not in either figure.
Prompts are synthetic arithmetic problems (grpo.environments.prompts.synthetic_rows) rendered with the model's chat template.
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
sys.path.insert(0, str(ROOT))


def make_prompts(model: str, n: int, seed: int) -> tuple[list[str], list[int]]:
    from transformers import AutoTokenizer

    from grpo.backends.batches import request_seed
    from grpo.environments.prompts import prompt_id, render_prompt, synthetic_rows

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = synthetic_rows(seed, num_train=n, num_eval=0, min_operand=1, max_operand=20, num_operands=3,
                          operations=("+", "-"))
    prompts = [render_prompt(tokenizer, r["question"]) for r in rows]
    seeds = [request_seed(seed, 1, prompt_id(r["data_source"], r["question"], r["ground_truth"])) for r in rows]
    return prompts, seeds


def run_backend(args) -> dict:
    """One backend, in this process: build, generate once, close. Returns the measurements."""
    import torch

    from grpo.backends import SamplingSpec, make_backend

    if args.backend == "hf" and args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    prompts, seeds = make_prompts(args.model, args.prompts, args.seed)
    options = ({"dtype": args.dtype, "prompts_per_batch": args.hf_batch} if args.backend == "hf" else
               {"dtype": args.dtype, "max_model_len": args.max_model_len})
    spec = SamplingSpec(n=args.group_size, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    backend = make_backend(args.backend, args.model, **options)
    t1 = time.perf_counter()
    groups = backend.generate(prompts, spec, seeds, progress=args.verbose)
    t2 = time.perf_counter()
    threads = torch.get_num_threads()
    if args.backend == "vllm":  # the compute threads are the engine worker's, bound by vLLM to its cores
        threads = ",".join(_worker_threads(backend.engine_pids)) or "?"
    t2b = time.perf_counter()
    backend.close()
    t3 = time.perf_counter()
    completions = [c for g in groups for c in g.completions]
    return {"backend": args.backend, "start_s": t1 - t0, "generate_s": t2 - t1, "close_s": t3 - t2b,
            "tokens": sum(len(c.token_ids) for c in completions), "completions": len(completions),
            "stopped": sum(c.finish_reason == "stop" for c in completions),
            "prompt_tokens": sum(len(g.prompt_token_ids) for g in groups), "threads": threads}


def _worker_threads(pids: list[int]) -> list[str]:
    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if "Worker" in proc.name():
                found.append(f"{len(proc.cpu_affinity())} (cores {proc.cpu_affinity()})")
        except (psutil.Error, OSError):
            pass
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/checkpoints/0", help="checkpoint directory (prepare-model output)")
    parser.add_argument("--prompts", type=int, default=8, help="number of synthetic prompts")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="both backends (HF: autocast dtype; vLLM: model dtype)")
    parser.add_argument("--hf-batch", type=int, default=8, help="HFBackend prompts_per_batch")
    parser.add_argument("--hf-threads", type=int, default=0,
                        help="torch threads for HF (0: torch's default, one per core). vLLM's CPU worker binds "
                             "its own: all cores but one, which it reserves for its scheduler")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM max_model_len")
    parser.add_argument("--backends", default="hf,vllm", help="comma-separated, run in this order")
    parser.add_argument("--verbose", action="store_true", help="show the subprocesses' logs and progress bars")
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # internal: run one backend in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.backend:
        Path(args.result).write_text(json.dumps(run_backend(args)))
        return

    if not Path(args.model).is_dir():
        sys.exit(f"{args.model}: no such model directory (run `python -m pipeline.prepare_model --out {args.model}`)")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else ""
    results = {}
    forward = [a for a in (argv if argv is not None else sys.argv[1:])]
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *forward, "--backend", name, "--result", str(result)]
            print(f"running {name} ...", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, text=True, **({} if args.verbose else {"capture_output": True}))
            if proc.returncode != 0 or not result.exists():
                tail = "" if args.verbose else (proc.stdout + proc.stderr)[-4000:]
                sys.exit(f"{name}: benchmark subprocess failed (exit {proc.returncode})\n{tail}")
            results[name] = json.loads(result.read_text())

    print(f"\nmodel {args.model}: {args.prompts} prompts x G={args.group_size} completions x <= {args.max_new_tokens} "
          f"new tokens, temperature {args.temperature}, top_p {args.top_p}, dtype {args.dtype}, {os.cpu_count()} CPUs")
    print("compute threads: " + ", ".join(f"{n} {r['threads']}" for n, r in results.items())
          + (f"; machine load average before the run {load}" if load else ""))
    header = f"{'backend':8} {'start s':>8} {'generate s':>11} {'close s':>8} {'tokens':>7} {'stopped':>8} " \
             f"{'tok/s excl. start':>18} {'tok/s incl. start':>18}"
    print(header)
    for name, r in results.items():
        r["tps_excl"] = r["tokens"] / r["generate_s"]
        r["tps_incl"] = r["tokens"] / (r["start_s"] + r["generate_s"])
        print(f"{name:8} {r['start_s']:8.1f} {r['generate_s']:11.1f} {r['close_s']:8.1f} {r['tokens']:7d} "
              f"{r['stopped']:>4}/{r['completions']:<3} {r['tps_excl']:18.1f} {r['tps_incl']:18.1f}")
    if "hf" in results and "vllm" in results:
        v, h = results["vllm"], results["hf"]
        print(f"ratio vLLM/HF tokens/s: {v['tps_excl'] / h['tps_excl']:.2f}x excluding start, "
              f"{v['tps_incl'] / h['tps_incl']:.2f}x including start")


if __name__ == "__main__":  # required: vLLM starts its engine processes with multiprocessing
    main()
