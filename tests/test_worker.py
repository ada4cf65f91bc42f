"""pipeline/worker/: `dvc repro` with its stages run by a long-lived worker writes what the stages write on
their own (so DVC's cache holds either way), loads checkpoints from memory, and a killed stage process stops
its stage in the worker without leaving output behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.project import dvc, env, make_project, small_params

pytestmark = pytest.mark.slow


def start_worker(project: Path) -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-m", "pipeline.worker"], cwd=project, env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (project / ".grpo/worker.sock").exists():
        assert worker.poll() is None and time.time() < deadline, worker.stdout.read() if worker.poll() else "no socket"
        time.sleep(0.1)
    return worker


def stop_worker(project: Path, worker: subprocess.Popen) -> str:
    subprocess.run([sys.executable, "-m", "pipeline.worker", "--stop"], cwd=project, env=env(), timeout=60)
    try:
        out, _ = worker.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        out, _ = worker.communicate()
    return out


def locked_outputs(project: Path) -> dict:
    """{output path: md5} from dvc.lock, without the metrics (timings) and the report built from them."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])
            if "metrics" not in o["path"] and "report" not in o["path"]}


def same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def cold_project(tmp_path_factory, tiny_model_dir) -> Path:
    project = make_project(tmp_path_factory.mktemp("cold") / "project", small_params(tiny_model_dir, iterations=2))
    dvc(project, "repro")
    return project


def test_repro_through_the_worker_writes_what_the_stages_write_alone(cold_project, tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "warm", small_params(tiny_model_dir, iterations=2))
    worker = start_worker(project)
    try:
        dvc(project, "repro")
    finally:
        log = stop_worker(project, worker)
    served = [line for line in log.splitlines() if line.startswith("worker: pipeline.")]
    for k in (1, 2):
        for name in ("generate", "score", "advantages", "update"):
            assert any(f"pipeline.{name} " in line and f"--iteration {k} " in line and "exit 0" in line
                       for line in served), (name, k, log)
    # iteration 2 reads checkpoint 1, which iteration 1's update left in memory, and the base (read before)
    update2 = next(line for line in served if "pipeline.update " in line and "--iteration 2 " in line)
    assert "3 loads from memory" in update2, update2  # policy, AdamW state, reference
    assert locked_outputs(project) == locked_outputs(cold_project)  # checkpoints included: the same bytes
    for k in (1, 2):
        same_checkpoint(project / f"data/checkpoints/{k}", cold_project / f"data/checkpoints/{k}")
    assert dvc(project, "status").stdout.strip().endswith("Data and pipelines are up to date.")


def test_a_killed_stage_process_stops_the_stage_in_the_worker(tmp_path, tiny_model_dir):
    # many passes over the rollouts: the update still runs when the kill comes
    project = make_project(tmp_path / "killed", small_params(tiny_model_dir, iterations=2, optim={"epochs": 20}))
    worker = start_worker(project)
    try:
        dvc(project, "repro", "advantages@2")
        proc = subprocess.Popen(["dvc", "repro", "update@2"], cwd=project, env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        seen = b""
        while b"update@2:" not in seen:  # the worker's progress bar, relayed: the update is at work
            chunk = proc.stdout.read1(4096)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        dvc(project, "repro")  # resumes with no manual step, through the worker
    finally:
        log = stop_worker(project, worker)
    assert "pipeline.update --params params.yaml --iteration 2 " in log and "cancelled" in log, log
    assert not list((project / "data").rglob("*.tmp")), "temporaries of the cancelled update are left"
    assert (project / "data/checkpoints/2/model.safetensors").exists()
    assert dvc(project, "status").stdout.strip().endswith("Data and pipelines are up to date.")


def test_the_worker_declines_another_environment_and_the_stage_runs_alone(tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "env", small_params(tiny_model_dir, iterations=1))
    worker = start_worker(project)
    try:
        result = subprocess.run(["dvc", "repro", "generate@1"], cwd=project, env=dict(env(), OMP_NUM_THREADS="1"),
                                capture_output=True, text=True, timeout=600)
    finally:
        log = stop_worker(project, worker)
    assert result.returncode == 0, result.stderr
    assert "worker: its environment" in result.stdout + result.stderr
    assert (project / "data/rollouts/1.parquet").exists()
    assert "pipeline.generate" not in log
