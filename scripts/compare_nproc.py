"""The update with optim.nproc_per_node 2 against 1, on the default params with optim.bf16 false.

    python scripts/compare_nproc.py            # ~20 min on a 2-core CPU; --workdir to keep the runs

Clones this repository twice into --workdir, runs `dvc repro update@1` in each (nproc_per_node 1 and 2), then
iteration 2's update under 2 ranks on the 1-process run's checkpoint 1 and rollouts (a full second iteration
would sample from the two slightly different checkpoints 1, and sampling turns float-rounding differences
into different completions). Prints, per comparison, the largest weight difference and its size relative to
the update, |w_2 - w_1| / |w_1 - w_before|.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def clone(workdir: Path, nproc: int) -> Path:
    dest = workdir / f"nproc{nproc}"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    params = (dest / "params.yaml").read_text()
    params = re.sub(r"(?m)^(  bf16:) true", r"\1 false", params)
    params = re.sub(r"(?m)^(  nproc_per_node:) 1", rf"\1 {nproc}", params)
    (dest / "params.yaml").write_text(params)
    return dest


def compare(label: str, before: Path, one: Path, two: Path) -> None:
    w0, w1, w2 = (load_file(p / "model.safetensors") for p in (before, one, two))
    diff = torch.cat([(w2[n].double() - w1[n].double()).flatten() for n in w1])
    update = torch.cat([(w1[n].double() - w0[n].double()).flatten() for n in w1])
    print(f"{label}: max |w(2 ranks) - w(1)| = {diff.abs().max():.2e}, |diff| / |update| = "
          f"{diff.norm() / update.norm():.2e}, largest update {update.abs().max():.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="compare-nproc-"))
    runs = {n: clone(workdir, n) for n in (1, 2)}
    for n, project in runs.items():
        subprocess.run(["dvc", "repro", "-q", "update@1"], cwd=project, check=True)
    one, two = runs[1], runs[2]
    compare("update@1", one / "data/checkpoints/0", one / "data/checkpoints/1", two / "data/checkpoints/1")
    subprocess.run(["dvc", "repro", "-q", "advantages@2"], cwd=one, check=True)
    subprocess.run(["dvc", "repro", "-q", "update@2"], cwd=one, check=True)
    out = workdir / "update2-nproc2"
    subprocess.run([sys.executable, "-m", "pipeline.update", "--params", "params.yaml", "--iteration", "2",
                    "--policy", str(one / "data/checkpoints/1"), "--reference", str(one / "data/checkpoints/0"),
                    "--advantages", str(one / "data/advantages/2.parquet"), "--out", str(out),
                    "--metrics", str(workdir / "update2-nproc2.json")], cwd=two, check=True)
    compare("update@2 (same checkpoint 1 and rollouts)", one / "data/checkpoints/1", one / "data/checkpoints/2", out)
    print(f"runs kept in {workdir}")


if __name__ == "__main__":
    main()
