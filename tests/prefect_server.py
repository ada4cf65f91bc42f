"""A real Prefect server on a free loopback port for the tests (tests/test_flows.py, tests/test_rate_flow.py), and
the bits of its REST API they read.

The machine may be a loaded 2-core one: every request to the server has a long timeout and idempotent ones are
retried on timeouts and connection errors; every wait polls up to a generous deadline, then fails an assertion
that says what it waited for."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.project import env, free_port, stop_process_group

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# deadlines, generous for a loaded 2-core machine; each one ends in an assertion (or a timeout error) that says
# what did not happen
HTTP_TIMEOUT = 120.0  # one request to the loopback Prefect server
HTTP_RETRY_FOR = 300.0  # an idempotent request is retried on timeouts, connection errors and 5xx this long
SERVER_START = 300.0  # `prefect server start` answers /health
FLOW_RUN_TIMEOUT = 1800.0  # one `python -m flows.grpo_flow` subprocess
STATE_TIMEOUT = 600.0  # a flow run reaches a state
LOGS_TIMEOUT = 180.0  # a log line reaches the API (logs are sent in batches)


def prefect_env(home: Path, api_url: str | None = None, ui: bool = False) -> dict:
    """The project env, Prefect isolated in `home`; without api_url a flow runs in ephemeral mode. With ui, a
    server started with it serves the UI, whose JavaScript calls api_url."""
    e = {k: v for k, v in env().items() if not k.startswith("PREFECT_")}
    e.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED=str(ui).lower(),
             PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5",
             # a loaded machine: the clients (flow runs, flows.serve) wait longer for the server, the server for
             # SQLite, and an ephemeral-mode flow run for its temporary server (20 s by default)
             PREFECT_API_REQUEST_TIMEOUT=str(HTTP_TIMEOUT), PREFECT_SERVER_DATABASE_TIMEOUT="60",
             PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT="30", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    if api_url:
        e["PREFECT_API_URL"] = api_url
        if ui:
            e["PREFECT_UI_API_URL"] = api_url
    return e


class Server:
    """A `prefect server start` subprocess and the bits of its REST API the tests read."""

    def __init__(self, home: Path, ui: bool = False):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"  # the UI, when served (ui=True)
        self.env = prefect_env(home, self.url, ui=ui)
        self.log = home / "server.log"
        self.retried: list[str] = []  # requests that were retried, and why
        home.mkdir(parents=True, exist_ok=True)
        prefect = shutil.which("prefect", path=self.env["PATH"])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT)
        deadline = time.monotonic() + SERVER_START
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"prefect server did not answer /health within {SERVER_START:.0f}s "
                                     f"(exit status {self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.client.close()

    def request(self, method: str, path: str, body: dict | None = None, retry: bool = True) -> Any:
        """The JSON answer of one API call. With retry (only for calls that may safely run twice), a timeout, a
        connection error or a 5xx answer (SQLite busy) is retried for HTTP_RETRY_FOR seconds."""
        deadline = time.monotonic() + HTTP_RETRY_FOR
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.client.request(method, path, json=body)
                if response.status_code < 500 or not retry or time.monotonic() > deadline:
                    return response.raise_for_status().json()
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.TransportError as e:  # timeouts, refused or dropped connections
                if not retry or time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"{method} {path}: no answer from the Prefect server after {attempt} "
                                         f"attempt(s) ({e!r}; server exit status {self.proc.poll()}); "
                                         f"server log:\n{self.log.read_text()[-2000:]}") from e
                problem = repr(e)
            self.retried.append(f"{method} {path} (attempt {attempt}): {problem}")
            time.sleep(min(2.0 ** attempt, 15.0))

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict | None = None) -> Any:
        """A read through a POST (the /filter endpoints): safe to retry."""
        return self.request("POST", path, body or {})

    def create_flow_run(self, deployment_id: str, parameters: dict) -> dict:
        # the idempotency key makes a retried request return the run the first attempt created, if it did
        return self.request("POST", f"/deployments/{deployment_id}/create_flow_run",
                            {"parameters": parameters, "idempotency_key": str(uuid.uuid4())})

    def flow_run(self, flow_run_id: str) -> dict:
        return self.get(f"/flow_runs/{flow_run_id}")

    def local_flow_run_ids(self) -> set[str]:
        """Flow runs not started from a deployment (the extend deployment's scheduled runs come and go)."""
        return {r["id"] for r in self.post("/flow_runs/filter", {"flow_runs": {"deployment_id": {"is_null_": True}},
                                                                  "limit": 200})}

    def wait(self, flow_run_id: str, timeout: float = STATE_TIMEOUT, states: set[str] = TERMINAL) -> dict:
        """The flow run once it is in one of `states` (by default a terminal state)."""
        deadline = time.monotonic() + timeout
        while (run := self.flow_run(flow_run_id))["state_type"] not in states:
            assert time.monotonic() < deadline, (f"flow run {run['name']} still {run['state_type']} after "
                                                 f"{timeout:.0f}s; expected {sorted(states)}")
            time.sleep(1)
        return run

    def task_runs(self, flow_run_id: str) -> list[dict]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})

    def wait_task_runs(self, flow_run_id: str, count: int, states: set[str] = TERMINAL,
                       timeout: float = LOGS_TIMEOUT) -> list[dict]:
        """The flow run's task runs once `count` of them are recorded, all in one of `states`: task run states
        reach the server as events, recorded apart from (and possibly after) the flow run's own state."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.task_runs(flow_run_id)
            if len(runs) >= count and all(t["state_type"] in states for t in runs):
                return runs
            assert time.monotonic() < deadline, (f"after {timeout:.0f}s, task runs {[(t['name'], t['state_type']) for t in runs]}"
                                                 f"; expected {count} in {sorted(states)}")
            time.sleep(0.5)

    def task_run_states(self, task_run_id: str) -> list[str]:
        """The state types a task run went through, in order (RUNNING once per attempt)."""
        states = self.get(f"/task_run_states/?task_run_id={task_run_id}")
        return [st["type"] for st in sorted(states, key=lambda st: st["timestamp"])]

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

    def wait_logs(self, flow_run_id: str, text: str, timeout: float = LOGS_TIMEOUT) -> list[dict]:
        """The flow run's logs once one of them contains `text` (logs reach the API in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs(flow_run_id)
            if any(text in log["message"] for log in logs):
                return logs
            assert time.monotonic() < deadline, f"no log line with {text!r} after {timeout:.0f}s:\n" + _messages(logs)
            time.sleep(0.5)


def _messages(logs: list[dict], task_run_id: str | None = None) -> str:
    return "\n".join(log["message"] for log in logs if task_run_id is None or log["task_run_id"] == task_run_id)


def messages(logs: list[dict], task_run_id: str | None = None) -> str:
    return "\n".join(log["message"] for log in logs if task_run_id is None or log["task_run_id"] == task_run_id)
