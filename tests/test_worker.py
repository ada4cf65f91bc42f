"""pipeline/worker/: a plain `dvc repro` starts a long-lived worker that runs its stages, writes what the stages
write on their own (GRPO_WORKER=off; so DVC's cache holds either way), loads checkpoints from memory and exits
when idle; a killed stage process stops its stage in the worker without leaving output behind."""

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


def worker_log(project: Path) -> str:
    log = project / ".grpo/worker.log"
    return log.read_text() if log.exists() else ""


def worker_pids(project: Path) -> list[int]:
    """The workers started in this project, by the pid each printed when it started."""
    return [int(line.split("(pid ")[1].split(",")[0].rstrip(")")) for line in worker_log(project).splitlines()
            if line.startswith("worker: serving")]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_worker(project: Path) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.worker", "--stop"], cwd=project, env=env(), timeout=60)
    for pid in worker_pids(project):
        deadline = time.time() + 60
        while alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


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
    dvc(project, "repro", extra_env={"GRPO_WORKER": "off"})  # every stage in its own process
    assert not (project / ".grpo").exists()
    return project


def test_plain_repro_starts_a_worker_that_writes_what_the_stages_write_alone_and_leaves_when_idle(
        cold_project, tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "warm", small_params(tiny_model_dir, iterations=2))
    try:
        dvc(project, "repro", extra_env={"GRPO_WORKER_IDLE_SECONDS": "30"})  # no second command
        log = worker_log(project)
        assert len(worker_pids(project)) == 1, log  # one worker served the whole run
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
        # nothing left running after the idle timeout
        pid = worker_pids(project)[0]
        deadline = time.time() + 30 + 60
        while alive(pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not alive(pid), "the worker outlived its idle timeout"
        assert "worker: no stage for 30 s; exiting" in worker_log(project)
        assert not (project / ".grpo/worker.sock").exists()
    finally:
        stop_worker(project)


def test_a_killed_stage_process_stops_the_stage_in_the_worker(tmp_path, tiny_model_dir):
    # many passes over the rollouts: the update still runs when the kill comes
    project = make_project(tmp_path / "killed", small_params(tiny_model_dir, iterations=2, optim={"epochs": 20}))
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
        stop_worker(project)
    log = worker_log(project)
    assert "pipeline.update --params params.yaml --iteration 2 " in log and "cancelled" in log, log
    assert not list((project / "data").rglob("*.tmp")), "temporaries of the cancelled update are left"
    assert (project / "data/checkpoints/2/model.safetensors").exists()
    assert dvc(project, "status").stdout.strip().endswith("Data and pipelines are up to date.")


def test_another_environment_gets_a_fresh_worker_and_off_runs_the_stage_alone(tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "env", small_params(tiny_model_dir, iterations=1))
    try:
        dvc(project, "repro", "generate@1")
        result = dvc(project, "repro", "score@1", extra_env={"OMP_NUM_THREADS": "1"})
        assert "environment (CUDA_*, OMP_*, HF_*, ...) differs from the worker's; it stops" in result.stderr
        first, second = worker_pids(project)  # the first left, the second runs with OMP_NUM_THREADS=1
        assert not alive(first) and alive(second)
        assert worker_log(project).count("pipeline.score --params") == 1
        dvc(project, "repro", "advantages@1", extra_env={"GRPO_WORKER": "off"})
        assert "pipeline.advantages" not in worker_log(project)
        assert (project / "data/advantages/1.parquet").exists()
    finally:
        stop_worker(project)


def test_an_exiting_worker_leaves_the_socket_of_the_worker_started_after_it(tmp_path, tiny_model_dir):
    """A stage that finds the worker exiting starts the next one at once; the exiting one's clean-up must not
    remove the next one's socket (its stage would wait for a socket that never comes, then run alone)."""
    import socket

    project = make_project(tmp_path / "p", small_params(tiny_model_dir, iterations=1))
    sock = project / ".grpo/worker.sock"
    first = subprocess.Popen([sys.executable, "-m", "pipeline.worker", "--idle-timeout", "3"], cwd=project, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not sock.exists():
        assert time.time() < deadline and first.poll() is None, "the worker did not start"
        time.sleep(0.1)
    # what the next worker does while the first is still there: a new socket file at the same path
    sock.unlink()
    nxt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    nxt.bind(str(sock))
    nxt.listen()
    assert first.wait(timeout=120) == 0  # idle: it exits
    assert sock.exists(), "the exiting worker removed the socket of the worker started after it"
    nxt.close()
