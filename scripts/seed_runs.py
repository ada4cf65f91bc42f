"""The default run (or an example's overrides) for several seeds and thread counts: does it learn on every one?

    python scripts/seed_runs.py                                   # seeds 0 1 2 x OMP_NUM_THREADS 1 2: six runs
    python scripts/seed_runs.py --seeds 0 --threads 2 --overrides examples/full_finetune.yaml
    python scripts/seed_runs.py --seeds 0 --threads 2 --overrides examples/multistep.yaml

Each run: a clean clone of this repository's HEAD (committed code only) in --workdir, the overrides and
train.seed applied (scripts/apply_params.py), then the README's `dvc repro` timed (the worker it starts included),
with OMP_NUM_THREADS set. One-thread runs go two at a time (a core each); runs with more threads one at a time. A
run already finished in --workdir (its <run>.json) is read, not run again.

Prints, for each run, the held-out metrics of checkpoint 0 and of the last checkpoint (eval/accuracy_strict: the
last '#### N' is right; eval/accuracy_lenient; eval/format_rate: a last line '#### N'; eval/copied_answer_rate:
a wrong answer that is a number of the question), the wall time and the last checkpoint's size, then the mean
and the spread (min .. max) of each; writes all of it to <workdir>/seed_runs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_iteration import ROOT, sh  # noqa: E402

METRICS = ["eval/accuracy_strict", "eval/accuracy_lenient", "eval/format_rate", "eval/copied_answer_rate"]


def run_one(work: Path, overrides: Path | None, seed: int, threads: int) -> dict:
    name = f"seed{seed}-threads{threads}"
    clone, log, done = work / name, work / f"{name}.log", work / f"{name}.json"
    if done.exists():  # finished by an earlier invocation with this --workdir
        print(f"{name}: done before ({done})", flush=True)
        return json.loads(done.read_text())
    if clone.exists():  # an unfinished earlier attempt
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    if overrides is not None:
        sh([sys.executable, "scripts/apply_params.py", str(overrides.resolve())], clone, log)
    (work / f"{name}.seed.yaml").write_text(f"train.seed: {seed}\n")
    sh([sys.executable, "scripts/apply_params.py", str(work / f"{name}.seed.yaml")], clone, log)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        print(f"{name}: dvc repro in {clone} ...", flush=True)
        seconds = sh(["dvc", "repro"], clone, log, env=env)
    finally:  # its worker's memory back at once, not after the idle timeout
        subprocess.run([sys.executable, "-m", "pipeline.worker", "--stop"], cwd=clone, env=env, capture_output=True)
    evals = sorted(int(p.parent.name) for p in (clone / "data/metrics").glob("*/evaluate.json"))
    last = evals[-1]
    read = lambda k: json.loads((clone / f"data/metrics/{k}/evaluate.json").read_text())  # noqa: E731
    size = sum(f.stat().st_size for f in (clone / f"data/checkpoints/{last}").rglob("*") if f.is_file())
    result = {"run": name, "seed": seed, "threads": threads, "seconds": seconds, "last_checkpoint": last,
              "checkpoint_bytes": size, "base": {m: read(0).get(m) for m in METRICS},
              "trained": {m: read(last).get(m) for m in METRICS}}
    done.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: done in {seconds:.0f} s", flush=True)
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f} .. {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--overrides", type=Path, help="a params overrides file, e.g. examples/full_finetune.yaml")
    parser.add_argument("--workdir", type=Path, help="where the clones go (default: a new temporary folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="seed-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"seed runs of {commit.strip()} in {work}", flush=True)
    started = time.perf_counter()
    runs = [(seed, threads) for threads in sorted(args.threads) for seed in args.seeds]
    results = []
    single = [r for r in runs if r[1] == 1]
    with ThreadPoolExecutor(max_workers=2) as pool:  # one-thread runs: a core each
        results += list(pool.map(lambda r: run_one(work, args.overrides, *r), single))
    results += [run_one(work, args.overrides, *r) for r in runs if r[1] != 1]
    (work / "seed_runs.json").write_text(json.dumps({"commit": commit.strip(), "overrides": str(args.overrides),
                                                     "runs": results}, indent=2) + "\n")
    short = {"eval/accuracy_strict": "strict", "eval/accuracy_lenient": "lenient", "eval/format_rate": "format",
             "eval/copied_answer_rate": "copied"}
    print(f"\n{'run':<18}" + "".join(f"{short[m]:>16}" for m in METRICS) + f"{'wall s':>9}{'ckpt MB':>9}")
    for r in results:
        cells = "".join(f"{r['base'][m]:>7.3f} -> {r['trained'][m]:<5.3f}" for m in METRICS)
        print(f"{r['run']:<18}{cells}{r['seconds']:>9.0f}{r['checkpoint_bytes'] / 1e6:>9.1f}")
    print("\nmean (min .. max) over the runs, after training:")
    for m in METRICS:
        gains = [r["trained"][m] - r["base"][m] for r in results]
        print(f"  {m:<26} {spread([r['trained'][m] for r in results])}   change {spread(gains)}")
    print(f"  {'wall seconds':<26} {spread([r['seconds'] for r in results])}")
    print(f"(all runs: {time.perf_counter() - started:.0f} s; {work / 'seed_runs.json'})")


if __name__ == "__main__":
    main()
