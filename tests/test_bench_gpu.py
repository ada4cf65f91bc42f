"""scripts/bench_gpu.py on the CPU (--device cpu: the tiny model and workload): the update beside the plain
padded loop, the sampler beside model.generate, and an iteration's stage commands through the worker and
without it. The numbers are the bench's to print; here it runs, measures each part and says n/a for the MFU
and memory a CPU does not report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.project import ROOT, env

pytestmark = pytest.mark.slow


def test_bench_gpu_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    assert "bench_gpu: CPU" in printed and "ours/plain" in printed and "ours/generate" in printed, printed
    bench = json.loads(out.read_text())
    (update,) = bench["update"]
    assert update["model"] == "tiny" and update["completions"] == 16 and update["ratio"] > 0
    for run in ("plain", "ours"):
        assert update[run]["seconds"] > 0 and update[run]["completion_tokens_per_second"] > 0
        assert update[run]["mfu"] is None and update[run]["peak_memory_gib"] is None  # no peak known on a CPU
    sampler = bench["sampler"]
    assert sampler["ours"]["tokens"] > 0 and sampler["generate"]["tokens"] > 0 and sampler["ratio"] > 0
    seconds = bench["iteration"]["seconds"]
    for kind in ("warm@1", "warm@2", "off@2"):
        assert set(seconds[kind]) == {"generate", "score", "advantages", "update"}, seconds
        assert all(s > 0 for s in seconds[kind].values())
