"""Prefect flows that run the DVC stages, against a real Prefect server on a free loopback port, on a tiny
model: one task run per stage, artifacts, DVC skipping fresh stages, retries of crashes (not of user errors),
deployments, ephemeral mode. The server and its API's helpers are in tests/prefect_server.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from filelock import FileLock

from flows.grpo_flow import (DVC_LOCK, StageCrash, StageUserError, stage_exit_status, stage_failure, stage_names,
                             stream_command)
from tests.prefect_server import FLOW_RUN_TIMEOUT, STATE_TIMEOUT, Server, messages, prefect_env
from tests.project import ROOT, dvc, env, make_project, small_params, stop_process_group

pytestmark = pytest.mark.slow

# the flow's own last log lines: they come after every task's (one process sends its logs in order)
FLOW_DONE = "were fresh (DVC skipped them)"
FLOW_FAILED = "Encountered exception during execution"

# Prefect 3.7.7's server scheduler inserts scheduled runs with a statement SQLAlchemy 2.1 rejects ("Can't evaluate
# bulk DML statement"): with it, a deployment's schedule never creates runs. SQLAlchemy 2.0.x works.
SQLALCHEMY_2_1 = tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)
SCHEDULER_BUG = (f"SQLAlchemy {sqlalchemy.__version__}: Prefect 3.7.7's scheduler cannot insert scheduled runs "
                 "('Can't evaluate bulk DML statement'); install sqlalchemy>=2.0,<2.1")


def run_flow(project: Path, environment: dict, *args: str, timeout: float = FLOW_RUN_TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.grpo_flow", "--retry-delay", "1", *args]
    try:
        return subprocess.run(cmd, cwd=project, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        raise AssertionError(f"{' '.join(cmd[1:])} did not finish within {timeout:.0f}s:\n{out[-4000:]}") from None


def run_flow_on_server(server: Server, project: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the flow in a subprocess against the server; return the process and the new flow run."""
    before = server.local_flow_run_ids()
    result = run_flow(project, server.env, *args)
    new = server.local_flow_run_ids() - before
    assert len(new) == 1, f"expected one new flow run, got {len(new)}:\n{result.stdout}{result.stderr}"
    # the process has ended: its flow run is already in its final state
    return result, server.wait(new.pop(), timeout=120)


# the order of a flow run's tasks, read from dvc.yaml: each stage after the stages whose outputs it reads
TWO_ITERATIONS = ["check-inputs", "prepare-model", "prepare-prompts", "evaluate-base",
                  "generate@1", "reward-model@1", "score@1", "advantages@1", "update@1", "evaluate@1",
                  "generate@2", "reward-model@2", "score@2", "advantages@2", "update@2", "evaluate@2", "report"]


def test_the_stage_list_is_read_from_dvc_yaml_in_dependency_order(tmp_path):
    assert stage_names(["1", "2"]) == TWO_ITERATIONS
    assert stage_names([]) == ["check-inputs", "prepare-model", "prepare-prompts", "evaluate-base", "report"]
    # a workspace's own dvc.yaml, stages listed in another order: still each after what it depends on
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    order = ["report", "update", "evaluate-base", "prepare-prompts", "score", "reward-model", "generate", "evaluate",
             "advantages", "check-inputs", "prepare-model"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {name: stages[name] for name in order}}))
    shuffled = stage_names(["1", "2"], tmp_path)
    assert sorted(shuffled) == sorted(TWO_ITERATIONS)
    assert shuffled.index("generate@1") < shuffled.index("score@1") < shuffled.index("advantages@1") \
        < shuffled.index("update@1") < shuffled.index("evaluate@1") < shuffled.index("generate@2")
    assert shuffled.index("update@1") < shuffled.index("update@2") < shuffled.index("report") == len(shuffled) - 1
    assert shuffled.index("prepare-model") < shuffled.index("prepare-prompts") < shuffled.index("evaluate-base")


def _data_files(project: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (project / "data").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("prefect") / "home")
    yield s
    s.stop()
    if s.retried:  # shown in the summary: how loaded the machine was
        warnings.warn(f"{len(s.retried)} Prefect API request(s) retried:\n" + "\n".join(s.retried[:20]))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    # params.yaml asks for 2 iterations: the first flow run sets 1 (and other overrides)
    return make_project(tmp_path_factory.mktemp("flows") / "project", small_params(tiny_model_dir, iterations=2))


@pytest.fixture(scope="module")
def first_run(server, project) -> dict:
    result, run = run_flow_on_server(server, project, "--iterations", "1", "--beta", "0.05",
                                     "--set", "optim.learning_rate=0.002")
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_flow_run_completes_with_one_task_run_per_stage(server, project, first_run):
    assert first_run["state_type"] == "COMPLETED", first_run["state"]
    expected = stage_names(["1"])
    task_runs = server.wait_task_runs(first_run["id"], len(expected))
    assert [t["name"] for t in task_runs] == expected
    assert all(t["state_type"] == "COMPLETED" and t["run_count"] == 1 for t in task_runs), task_runs
    # the flow's stages are exactly dvc.yaml's
    assert set(dvc(project, "stage", "list", "--name-only").stdout.split()) == set(expected)
    assert (project / "data/checkpoints/1/model.safetensors").exists()
    assert not (project / "data/rollouts/2.parquet").exists()


def test_overrides_are_written_into_params_yaml(project, first_run, tiny_model_dir):
    params = yaml.safe_load((project / "params.yaml").read_text())
    expected = small_params(tiny_model_dir, iterations=1)
    expected["loss"]["beta"] = 0.05
    expected["optim"]["learning_rate"] = 0.002
    assert params == expected
    # DVC saw them: the update stage ran with the new learning rate
    assert json.loads((project / "data/metrics/1/update.json").read_text())["learning_rate"] == 0.002


def test_stage_output_is_streamed_into_the_run_log(server, first_run):
    logs = server.wait_logs(first_run["id"], FLOW_DONE)
    task_runs = {t["name"]: t["id"] for t in server.wait_task_runs(first_run["id"], len(stage_names(["1"])))}
    generate = messages(logs, task_runs["generate@1"])
    assert "Running stage 'generate@1'" in generate and "generate@1: read data/prompts.parquet" in generate, generate
    flow_log = messages(logs)
    assert "params.yaml: loss.beta: 0.04 -> 0.05" in flow_log
    assert 'params.yaml: train.iterations: {"1": 0, "2": 1} -> {"1": 0}' in flow_log


def test_artifacts_show_metrics_samples_and_progress(server, first_run):
    artifacts = server.artifacts(first_run["id"])
    assert {"grpo-iteration-1-metrics", "grpo-iteration-1-completions", "grpo-progress", "grpo-history"} <= set(artifacts)

    metrics = artifacts["grpo-iteration-1-metrics"]
    assert metrics["type"] == "table"
    rows = json.loads(metrics["data"])
    names = {(r["stage"], r["metric"]) for r in rows}
    assert {("score", "reward"), ("update", "kl"), ("update", "learning_rate"), ("evaluate", "eval/accuracy"),
            ("advantages", "advantages/abs_mean"), ("generate", "completions/mean_length")} <= names
    assert next(r["value"] for r in rows if r["metric"] == "learning_rate") == 0.002

    sample = artifacts["grpo-iteration-1-completions"]
    assert sample["type"] == "markdown"
    text = sample["data"]
    assert "| best |" in text and "| worst |" in text and "advantage" in text and "### Group 3:" in text, text
    assert "How many" in text, "the sample shows each group's question"

    progress = artifacts["grpo-progress"]
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0

    history = json.loads(artifacts["grpo-history"]["data"])
    assert [r["iteration"] for r in history] == [0, 1]
    assert history[1]["kl"] is not None and history[0]["eval/accuracy"] is not None


class TestServedDeployments:
    """`python -m flows.serve` against the server: what a user starts and schedules from the UI."""

    @pytest.fixture(scope="class")
    def deployments(self, server, project, first_run, tmp_path_factory):
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        with open(log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--every", "60", "--add", "2", "--retry-delay", "1"],
                                     cwd=project, env=server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(found := {d["name"]: d for d in server.post("/deployments/filter")}) < 3:
                assert serve.poll() is None and time.monotonic() < deadline, (
                    f"flows.serve registered {sorted(found)} of 3 deployments (exit status {serve.poll()}):\n"
                    + log.read_text()[-3000:])
                time.sleep(0.5)
            yield found
        finally:
            stop_process_group(serve)

    def test_a_run_from_the_ui_reruns_nothing_and_waits_for_the_dvc_lock(self, server, project, deployments):
        files = _data_files(project)
        assert deployments["train"]["parameters"]["workspace"] == str(project.resolve())
        # a run with the current values: params.yaml stays as it is and DVC skips every stage; while another
        # process holds the workspace's DVC lock, the first stage waits for it
        with FileLock(str(project / DVC_LOCK)):
            run = server.create_flow_run(deployments["train"]["id"], {"iterations": 1, "beta": 0.05})
            # flows.serve polls for the run, starts a subprocess for it, which imports the flow: minutes when loaded
            server.wait_logs(run["id"], "waiting for the workspace's DVC lock", timeout=STATE_TIMEOUT)
            server.wait_task_runs(run["id"], 1, {"RUNNING"})  # task run states reach the server as events
            for _ in range(3):  # and it goes on waiting while the lock is held
                assert server.flow_run(run["id"])["state_type"] == "RUNNING"
                assert [t["state_type"] for t in server.task_runs(run["id"])] == ["RUNNING"]
                time.sleep(1)
        run = server.wait(run["id"])
        assert run["state_type"] == "COMPLETED", run["state"]
        logs = server.wait_logs(run["id"], FLOW_DONE)
        task_runs = server.wait_task_runs(run["id"], len(stage_names(["1"])))
        assert [t["name"] for t in task_runs] == stage_names(["1"])
        for t in task_runs:
            assert f"Stage '{t['name']}' didn't change, skipping" in messages(logs, t["id"]), t["name"]
        assert "Running stage" not in messages(logs)
        assert _data_files(project) == files, "no output was rewritten"

    def test_the_rate_deployment_asks_for_an_iteration(self, server, project, deployments):
        rate = deployments["rate"]
        assert rate["parameters"] == {"workspace": str(project.resolve())}
        assert server.get(f"/flows/{rate['flow_id']}")["name"] == "grpo-rate"
        assert "iteration" in rate["parameter_openapi_schema"]["required"]

    @pytest.mark.xfail(SQLALCHEMY_2_1, strict=True, reason=SCHEDULER_BUG)
    def test_the_extend_deployment_is_scheduled(self, server, deployments):
        extend = deployments["extend"]
        assert not extend["paused"] and extend["parameters"]["add_iterations"] == 2
        assert [s["schedule"]["interval"] for s in extend["schedules"]] == [3600.0]
        # the server's scheduler creates the coming runs (the first one interval from now: none runs here)
        deadline = time.monotonic() + 180  # its loop for recently changed deployments runs every 5 s
        while not (runs := server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [extend["id"]]}}})):
            assert time.monotonic() < deadline, "the server scheduled no extend runs:\n" + server.log.read_text()[-2000:]
            time.sleep(1)
        assert {r["state_type"] for r in runs} == {"SCHEDULED"}
        assert all(r["parameters"]["add_iterations"] == 2 for r in runs)


def test_bad_override_fails_before_touching_params_yaml(server, project):
    before = (project / "params.yaml").read_bytes()
    result, run = run_flow_on_server(server, project, "--group-size", "1")
    assert result.returncode == 1
    assert run["state_type"] == "FAILED"
    assert "rollout.group_size = 1 is not allowed; expected an integer >= 2" in run["state"]["message"]
    assert server.task_runs(run["id"]) == []
    assert (project / "params.yaml").read_bytes() == before


# what the copy's pipeline/check_inputs.py becomes, to make the check-inputs stage crash
CRASHES = {
    "traceback": "raise RuntimeError('check-inputs crashed on purpose')\n",  # a bug: Python's exit status 1
    "signal": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",  # as by the kernel's OOM killer
}


@pytest.mark.parametrize("crash", sorted(CRASHES))
def test_a_crashed_stage_is_retried_then_the_flow_run_fails(server, tmp_path, tiny_model_dir, crash):
    bad = make_project(tmp_path / "crash", small_params(tiny_model_dir, iterations=1))
    (bad / "pipeline/check_inputs.py").write_text(CRASHES[crash])
    result, run = run_flow_on_server(server, bad, "--retries", "1", "--retry-delay", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    message = run["state"]["message"]
    assert run["state_type"] == "FAILED" and "StageCrash: stage check-inputs crashed: " in message, run["state"]
    if crash == "traceback":
        assert "crashed: RuntimeError: check-inputs crashed on purpose (exit status 1)" in message, message
    else:  # the stage's shell execs python (-9), or reports the signal as 128 + 9
        assert "crashed: killed by SIGKILL" in message or "(exit status 137)" in message, message
    (task_run,) = server.wait_task_runs(run["id"], 1)  # the run stopped at the first stage
    assert task_run["name"] == "check-inputs" and task_run["state_type"] == "FAILED"
    assert task_run["run_count"] == 2, "one retry"
    assert server.task_run_states(task_run["id"]).count("RUNNING") == 2
    logs = server.wait_logs(run["id"], FLOW_FAILED)
    stage_log = messages(logs, task_run["id"])
    assert stage_log.count("Running stage 'check-inputs'") == 2, stage_log
    assert "Retry 1/1 will start" in stage_log and "Retries are exhausted" in stage_log, stage_log
    assert not (bad / "data/inputs.ok").exists()


def test_a_user_error_is_not_retried_and_fails_the_flow_run_at_once(server, tmp_path, tiny_model_dir):
    # a bad value written into params.yaml by hand (an override is checked before any stage runs):
    # check-inputs prints one error line and exits with status 2
    bad = make_project(tmp_path / "bad", small_params(tiny_model_dir, iterations=1, rollout={"group_size": 1}))
    result, run = run_flow_on_server(server, bad, "--retries", "2", "--retry-delay", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    error = "error: params.yaml: rollout.group_size = 1 is not allowed; expected an integer >= 2"
    message = run["state"]["message"]
    assert run["state_type"] == "FAILED" and f"StageUserError: stage check-inputs failed: {error}" in message, run["state"]
    (task_run,) = server.wait_task_runs(run["id"], 1)  # the run stopped at the first stage
    assert task_run["name"] == "check-inputs" and task_run["state_type"] == "FAILED"
    assert task_run["run_count"] == 1, "attempted once: not retried"
    states = server.task_run_states(task_run["id"])
    assert states.count("RUNNING") == 1 and states[-1] == "FAILED", states
    logs = server.wait_logs(run["id"], FLOW_FAILED)
    stage_log = messages(logs, task_run["id"])
    assert stage_log.count("Running stage 'check-inputs'") == 1, stage_log
    assert [line for line in stage_log.splitlines() if line.startswith("error:")] == [error], stage_log
    assert "stage check-inputs stopped on a user error: not retried" in stage_log
    assert "Retry" not in stage_log, stage_log
    assert not (bad / "data/inputs.ok").exists()


def test_dvc_reports_the_stage_exit_status_that_tells_a_user_error_from_a_crash(tmp_path):
    """What run_stage reads from `dvc repro --single-item` (which exits with 255 whatever failed), with the
    installed DVC: the stage command's exit status, from its last line."""
    (tmp_path / "user_error.py").write_text("import sys\nprint('error: bad input', file=sys.stderr)\nsys.exit(2)\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "user-error": {"cmd": "python user_error.py"},
        "crash": {"cmd": "python -c \"raise RuntimeError('boom')\""},
        "killed": {"cmd": "python -c \"import os, signal; os.kill(os.getpid(), signal.SIGKILL)\""},
        "missing-dep": {"cmd": "python user_error.py", "deps": ["missing.txt"]},
    }}))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=tmp_path, env=env(), check=True, capture_output=True)
    logger = logging.getLogger("test-dvc-status")
    failures = {}
    for name in ("user-error", "crash", "killed", "missing-dep"):
        code, lines = stream_command([sys.executable, "-m", "dvc", "repro", "--single-item", name], tmp_path, logger)
        assert code == 255, (name, code, lines)
        failures[name] = (stage_exit_status(lines), stage_failure(name, code, lines))
    status, error = failures["user-error"]
    assert status == 2 and isinstance(error, StageUserError)
    assert str(error) == "stage user-error failed: error: bad input (a user error: not retried)"
    status, error = failures["crash"]
    assert status == 1 and type(error) is StageCrash
    assert str(error) == "stage crash crashed: RuntimeError: boom (exit status 1)"
    status, error = failures["killed"]
    assert status in (-9, 137) and type(error) is StageCrash, (status, error)
    status, error = failures["missing-dep"]  # dvc failed before running the command: retried, as a crash
    assert status is None and type(error) is StageCrash
    assert "dependency 'missing.txt' does not exist" in str(error)


def test_local_ephemeral_run_extends_without_a_server(project, tmp_path):
    result = run_flow(project, prefect_env(tmp_path / "home"), "--extend", "1")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Stage 'update@1' didn't change, skipping" in out
    assert "Running stage 'generate@2'" in out and "Running stage 'update@2'" in out
    assert "Finished in state Completed" in out
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["iterations"] == {"1": 0, "2": 1}
    assert (project / "data/checkpoints/2/model.safetensors").exists()
