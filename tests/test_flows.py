"""Prefect flows that run the DVC stages, against a real Prefect server on a free loopback port, on a tiny
model: one task run per stage, artifacts, DVC skipping fresh stages, retries, deployments, ephemeral mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy
import yaml
from filelock import FileLock

from flows.grpo_flow import DVC_LOCK, stage_names
from tests.project import dvc, env, free_port, make_project, small_params, stop_process_group

pytestmark = pytest.mark.slow

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# Prefect 3.7.7's server scheduler inserts scheduled runs with a statement SQLAlchemy 2.1 rejects ("Can't evaluate
# bulk DML statement"): with it, a deployment's schedule never creates runs. SQLAlchemy 2.0.x works.
SQLALCHEMY_2_1 = tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)
SCHEDULER_BUG = (f"SQLAlchemy {sqlalchemy.__version__}: Prefect 3.7.7's scheduler cannot insert scheduled runs "
                 "('Can't evaluate bulk DML statement'); install sqlalchemy>=2.0,<2.1")



def prefect_env(home: Path, api_url: str | None = None) -> dict:
    """The project env, Prefect isolated in `home`; without api_url a flow runs in ephemeral mode."""
    e = {k: v for k, v in env().items() if not k.startswith("PREFECT_")}
    e.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
             PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5")
    if api_url:
        e["PREFECT_API_URL"] = api_url
    return e



class Server:
    """A `prefect server start` subprocess and the bits of its REST API the tests read."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = prefect_env(home, self.url)
        self.log = home / "server.log"
        home.mkdir(parents=True, exist_ok=True)
        prefect = shutil.which("prefect", path=self.env["PATH"])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.time() + 180
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError(f"prefect server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.client.close()

    def post(self, path: str, body: dict | None = None):
        response = self.client.post(path, json=body or {})
        response.raise_for_status()
        return response.json()

    def flow_run(self, flow_run_id: str) -> dict:
        return self.client.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()

    def flow_run_ids(self) -> set[str]:
        return {r["id"] for r in self.post("/flow_runs/filter", {"limit": 200})}

    def wait(self, flow_run_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while (run := self.flow_run(flow_run_id))["state_type"] not in TERMINAL:
            assert time.time() < deadline, f"flow run still {run['state_type']} after {timeout}s"
            time.sleep(1)
        return run

    def task_runs(self, flow_run_id: str) -> list[dict]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        return {a["key"]: a for a in self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})}

    def logs(self, flow_run_id: str) -> list[dict]:
        logs: list[dict] = []
        while True:
            page = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                                              "limit": 200, "offset": len(logs)})
            logs += page
            if len(page) < 200:
                return logs

    def wait_logs(self, flow_run_id: str, text: str, timeout: float = 60) -> list[dict]:
        """The flow run's logs once one of them contains `text` (logs reach the API in batches)."""
        deadline = time.time() + timeout
        while True:
            logs = self.logs(flow_run_id)
            if any(text in log["message"] for log in logs):
                return logs
            assert time.time() < deadline, f"no log line with {text!r} after {timeout}s:\n" + _messages(logs)
            time.sleep(0.5)


def _messages(logs: list[dict], task_run_id: str | None = None) -> str:
    return "\n".join(log["message"] for log in logs if task_run_id is None or log["task_run_id"] == task_run_id)


def run_flow(project: Path, environment: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.grpo_flow", "--retry-delay", "1", *args], cwd=project,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def run_flow_on_server(server: Server, project: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the flow in a subprocess against the server; return the process and the new flow run."""
    before = server.flow_run_ids()
    result = run_flow(project, server.env, *args)
    (new,) = server.flow_run_ids() - before
    return result, server.wait(new, timeout=60)


def _data_files(project: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (project / "data").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("prefect") / "home")
    yield s
    s.stop()


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
    task_runs = server.task_runs(first_run["id"])
    expected = stage_names(["1"])
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
    logs = server.wait_logs(first_run["id"], "Finished in state Completed")
    task_runs = {t["name"]: t["id"] for t in server.task_runs(first_run["id"])}
    generate = _messages(logs, task_runs["generate@1"])
    assert "Running stage 'generate@1'" in generate and "generate@1: read data/prompts.parquet" in generate, generate
    flow_log = _messages(logs)
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
    def deployments(self, server, project, first_run):
        serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--every", "60", "--add", "2", "--retry-delay", "1"],
                                 cwd=project, env=server.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            deadline = time.time() + 120
            while len(found := {d["name"]: d for d in server.post("/deployments/filter")}) < 2:
                assert time.time() < deadline and serve.poll() is None, "flows.serve did not register its deployments"
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
            run = server.post(f"/deployments/{deployments['train']['id']}/create_flow_run",
                              {"parameters": {"iterations": 1, "beta": 0.05}})
            server.wait_logs(run["id"], "waiting for the workspace's DVC lock", timeout=120)
            time.sleep(2)
            assert server.flow_run(run["id"])["state_type"] == "RUNNING"
            assert [t["state_type"] for t in server.task_runs(run["id"])] == ["RUNNING"]
        run = server.wait(run["id"], timeout=300)
        assert run["state_type"] == "COMPLETED", run["state"]
        logs = server.wait_logs(run["id"], "Finished in state Completed")
        task_runs = server.task_runs(run["id"])
        assert [t["name"] for t in task_runs] == stage_names(["1"])
        for t in task_runs:
            assert f"Stage '{t['name']}' didn't change, skipping" in _messages(logs, t["id"]), t["name"]
        assert "Running stage" not in _messages(logs)
        assert _data_files(project) == files, "no output was rewritten"

    @pytest.mark.xfail(SQLALCHEMY_2_1, strict=True, reason=SCHEDULER_BUG)
    def test_the_extend_deployment_is_scheduled(self, server, deployments):
        extend = deployments["extend"]
        assert not extend["paused"] and extend["parameters"]["add_iterations"] == 2
        assert [s["schedule"]["interval"] for s in extend["schedules"]] == [3600.0]
        # the server's scheduler creates the coming runs (the first one interval from now: none runs here)
        deadline = time.time() + 30
        while not (runs := server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [extend["id"]]}}})):
            assert time.time() < deadline, "the server scheduled no extend runs:\n" + server.log.read_text()[-2000:]
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


def test_failing_stage_is_retried_then_the_flow_run_fails(server, tmp_path, tiny_model_dir):
    bad = make_project(tmp_path / "bad", small_params(tiny_model_dir, iterations=1, rollout={"group_size": 1}))
    result, run = run_flow_on_server(server, bad, "--retries", "1", "--retry-delay", "0")
    assert result.returncode == 1
    error = "rollout.group_size = 1 is not allowed; expected an integer >= 2"
    assert run["state_type"] == "FAILED" and error in run["state"]["message"], run["state"]
    (task_run,) = server.task_runs(run["id"])  # the run stopped at the first stage
    assert task_run["name"] == "check-inputs" and task_run["state_type"] == "FAILED"
    assert task_run["run_count"] == 2, "one retry"
    logs = server.wait_logs(run["id"], "Finished in state Failed")
    stage_log = _messages(logs, task_run["id"])
    assert stage_log.count("Running stage 'check-inputs'") == 2
    assert [line for line in stage_log.splitlines() if line.startswith("error:")] == [f"error: params.yaml: {error}"] * 2, stage_log
    assert "Retry 1/1 will start" in stage_log
    assert not (bad / "data/inputs.ok").exists()


def test_local_ephemeral_run_extends_without_a_server(project, tmp_path):
    result = run_flow(project, prefect_env(tmp_path / "home"), "--extend", "1")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Stage 'update@1' didn't change, skipping" in out
    assert "Running stage 'generate@2'" in out and "Running stage 'update@2'" in out
    assert "Finished in state Completed" in out
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["iterations"] == {"1": 0, "2": 1}
    assert (project / "data/checkpoints/2/model.safetensors").exists()
