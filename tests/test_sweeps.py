"""Sweeps the DVC way, on the tiny model: `dvc exp run -S` in the workspace, a queued sweep run by
`dvc queue start`, and `dvc exp show` listing every experiment with its parameters and eval accuracy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.project import ROOT, env, make_project, small_params

pytestmark = pytest.mark.slow

# experiments are git commits: DVC's workers commit them with this identity, whatever the machine's git config
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "sweep test", "GIT_AUTHOR_EMAIL": "sweep@example.invalid",
                "GIT_COMMITTER_NAME": "sweep test", "GIT_COMMITTER_EMAIL": "sweep@example.invalid"}
EVAL = "data/metrics/1/evaluate.json"
UPDATE = "data/metrics/1/update.json"
FINAL_STATES = ("Success", "Failed")


def run(project: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in the project (`dvc ...`, `git ...`) with the tests' environment and a git identity."""
    result = subprocess.run(list(args), cwd=project, env=dict(env(), **GIT_IDENTITY), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_queue(project: Path) -> None:
    """`dvc queue start`, its output to a file: the worker it leaves behind inherits its stdout, so reading
    that from a pipe would wait for the worker to end."""
    log = project.parent / "queue-start.log"
    with open(log, "w") as out:
        result = subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=project, env=dict(env(), **GIT_IDENTITY),
                                stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert result.returncode == 0, log.read_text()
    assert "Started '1' new experiments task queue worker" in log.read_text(), log.read_text()


def processes_in(project: Path) -> list[int]:
    """PIDs of the processes whose working directory is inside the project: DVC's queue workers, the
    experiments they run (in .dvc/tmp/exps/...) and those experiments' stages."""
    root = str(project.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            pids.append(int(entry.name))
    return pids


def wait_for_no_processes(project: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_in(project)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def queue_states(project: Path) -> dict[str, str]:
    """Experiment name -> Queued | Running | Success | Failed, from `dvc queue status`."""
    states = {}
    for line in run(project, "dvc", "queue", "status").stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[-1] in ("Queued", "Running", "Unknown") + FINAL_STATES:
            states[fields[1]] = fields[-1]
    return states


def experiments(project: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its data (params, metrics), for the experiments of HEAD."""
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for exp_range in baseline.get("experiments") or []:
            for exp in exp_range["revs"]:
                found[exp["name"]] = exp["data"]
    return found


def param(data: dict, dotted: str):
    node = data["params"]["params.yaml"]["data"]
    for key in dotted.split("."):
        node = node[key]
    return node


def metric(data: dict, path: str, name: str):
    return data["metrics"][path]["data"][name]


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "project", small_params(tiny_model_dir, iterations=1))
    # the checkout's .gitignore: stages' __pycache__ stays out of the experiments' commits
    (project / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    # experiments are commits on top of a baseline commit; no `dvc repro` first: an experiment runs the
    # pipeline from scratch, and the run-cache makes later ones skip what an earlier one already ran
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", "baseline")
    yield project
    # however the test ended: no queue worker, experiment or stage left running
    run(project, "dvc", "queue", "stop", "--kill", check=False, timeout=120)
    for pid in wait_for_no_processes(project, timeout=60):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_queued_sweep_and_workspace_experiment_are_listed_with_their_params_and_eval_accuracy(project):
    started = time.monotonic()
    # one command queues a sweep: one experiment per comma-separated value (named lr-1, lr-2)
    rates = {"lr-1": 1e-3, "lr-2": 1e-2}
    out = run(project, "dvc", "exp", "run", "--queue", "-n", "lr", "-S", "optim.learning_rate=1e-3,1e-2").stdout
    assert "Queued experiment 'lr-1'" in out and "Queued experiment 'lr-2'" in out, out
    assert queue_states(project) == {"lr-1": "Queued", "lr-2": "Queued"}

    start_queue(project)
    deadline = time.monotonic() + 900
    # a task between the queue and a worker may be missing from the status for a moment: wait for both
    while not (set(states := queue_states(project)) == set(rates) and set(states.values()) <= set(FINAL_STATES)):
        assert time.monotonic() < deadline, f"the queue did not finish in 900 s: {states}"
        time.sleep(5)
    logs = {name: run(project, "dvc", "queue", "logs", name, check=False).stdout for name in rates}
    assert states == {"lr-1": "Success", "lr-2": "Success"}, f"{states}\n" + "\n".join(logs.values())
    queued_seconds = time.monotonic() - started

    # an experiment in the workspace runs at once
    out = run(project, "dvc", "exp", "run", "-n", "beta0", "-S", "loss.beta=0.0").stdout
    assert "Ran experiment(s): beta0" in out, out

    shown = experiments(project)
    assert set(shown) == {"lr-1", "lr-2", "beta0"}, sorted(shown)
    for name, data in shown.items():
        beta, rate = (0.0, 1e-3) if name == "beta0" else (0.04, rates[name])
        assert param(data, "loss.beta") == beta and param(data, "optim.learning_rate") == rate, name
        assert 0.0 <= metric(data, EVAL, "eval/accuracy") <= 1.0, name
        # the update really ran with the experiment's learning rate (no warm-up in the small params)
        assert metric(data, UPDATE, "learning_rate") == pytest.approx(rate), name
    # each queued experiment trained its own checkpoint
    assert metric(shown["lr-1"], UPDATE, "loss") != metric(shown["lr-2"], UPDATE, "loss") or \
        metric(shown["lr-1"], UPDATE, "grad_norm") != metric(shown["lr-2"], UPDATE, "grad_norm")

    # the table, cut down to the columns that differ
    table = run(project, "dvc", "exp", "show", "--csv", "--only-changed").stdout
    header = table.splitlines()[0].split(",")
    assert "optim.learning_rate" in header and "loss.beta" in header, header
    assert any(col.endswith("eval/accuracy") for col in header), header
    # ... or to the interesting ones (metrics in several files are named <file>:<metric>)
    table = run(project, "dvc", "exp", "show", "--csv", "--drop", ".*", "--keep",
                "Experiment|optim.learning_rate|loss.beta|.*:eval/accuracy$").stdout
    rows = [line.split(",") for line in table.splitlines()]
    assert rows[0] == ["Experiment", "data/metrics/0/evaluate.json:eval/accuracy", f"{EVAL}:eval/accuracy",
                       "loss.beta", "optim.learning_rate"], rows[0]
    by_name = {row[0]: row[3:] for row in rows[1:] if row[0]}
    assert by_name == {"lr-1": ["0.04", "0.001"], "lr-2": ["0.04", "0.01"], "beta0": ["0.0", "0.001"]}, table

    # the runs' plots side by side: the eval accuracy curve (iterations 0 and 1) of each
    out_dir = project.parent / "plots"
    run(project, "dvc", "plots", "diff", "lr-1", "lr-2", "--targets", "eval_accuracy", "-o", str(out_dir))
    html = (out_dir / "index.html").read_text()
    assert html.count('"rev": "lr-1"') == 2 and html.count('"rev": "lr-2"') == 2

    # the workers leave once the queue is stopped
    run(project, "dvc", "queue", "stop")
    assert wait_for_no_processes(project, timeout=60) == []
    print(f"queued sweep {queued_seconds:.0f} s, whole test {time.monotonic() - started:.0f} s")
