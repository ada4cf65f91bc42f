"""Pictures of GRPO flow runs in the Prefect UI, for docs/prefect.md.

Starts a Prefect server (UI on) on a free loopback port with its own PREFECT_HOME, runs a short grpo-train
flow against it (a tiny random model in a throwaway copy of the project, so it takes a minute or two on a
CPU), opens the flow run page in headless Chromium and saves a screenshot. Everything it starts is stopped
and its temporary files removed.

    python scripts/prefect_screenshot.py                    # -> docs/prefect-flow-run.png
    python scripts/prefect_screenshot.py --iterations 2 --tab Artifacts --out /tmp/artifacts.png
    python scripts/prefect_screenshot.py --rating-form      # -> docs/prefect-rating-form.png

--rating-form: a grpo-rate flow run (flows/rate_flow.py) paused on the form that rates iteration 1's completions
(the embedded SmolLM2 model's, so they read as text), the form opened by a click on the page's Resume button:
Chromium driven over the DevTools protocol (DevTools below), which --screenshot alone cannot click.

Needs Chromium (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.throwaway_project import (env, free_port, make_project, make_tiny_model, small_params,  # noqa: E402
                                       stop_process_group)


INSTALL_CHROMIUM = "apt-get install -y chromium"  # Debian's package (scripts/install.sh installs it)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def find_chromium() -> str:
    if path := chromium_path():
        return path
    raise SystemExit(f"error: no Chromium found; install it with `{INSTALL_CHROMIUM}`")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium(browser: str, profile: Path, url: str, *args: str, budget_ms: int) -> subprocess.CompletedProcess:
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    return subprocess.run([browser, *flags, *args, url], capture_output=True, text=True, timeout=180)


class DevTools:
    """Headless Chromium driven over the Chrome DevTools Protocol (a websocket on a loopback port): open a page,
    run JavaScript in it (to wait for what the UI renders, to click), take a screenshot. For what --screenshot
    alone cannot do: the rating form opens in a dialog after a click on the paused run's Resume button."""

    def __init__(self, browser: str, profile: Path, size: str = "1400,900", timeout: float = 120):
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}", "--remote-debugging-port=0",
                 "--remote-debugging-address=127.0.0.1"]
        self.proc = subprocess.Popen([browser, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.next_id = 0
        try:
            active = profile / "DevToolsActivePort"  # Chromium writes its port there (port 0: a free one)
            deadline = time.monotonic() + timeout
            while not (active.exists() and active.read_text().count("\n") >= 1):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Chromium did not open its DevTools port (exit status {self.proc.poll()})")
                time.sleep(0.2)
            port = int(active.read_text().split()[0])
            while True:
                pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
                         if t["type"] == "page"]
                if pages or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if not pages:
                raise RuntimeError("Chromium opened no page")
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, timeout: float = 120, **params) -> dict:
        """Send one DevTools command, return its result (events that come in between are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 120):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 1500) : ''")
                raise RuntimeError(f"the page did not show {what} within {timeout:.0f}s; it shows:\n{text}")
            time.sleep(0.5)
        return value

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def screenshot(self, out: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        stop_process_group(self.proc)


def has_text(text: str) -> str:
    """A JavaScript expression: whether the page shows `text`."""
    return f"!!document.body && document.body.innerText.includes({json.dumps(text)})"


CLICK_BUTTON = """(() => {{
  const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === {label});
  if (b) b.click();
  return !!b;
}})()"""


def screenshot_rating_form(browser: str, ui_url: str, flow_run_id: str, out: Path, profile: Path,
                           size: str = "1400,1000", timeout: float = 180) -> Path:
    """Open a paused grpo-rate flow run's page in the Prefect UI (`ui_url`, e.g. http://127.0.0.1:4200), press
    Resume, wait for the rating form and save a screenshot of it to `out`."""
    tools = DevTools(browser, profile, size, timeout=timeout)
    try:
        width, height = (int(x) for x in size.split(","))
        tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        tools.open(f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}")
        tools.wait_for(CLICK_BUTTON.format(label=json.dumps("Resume")), "the paused run's Resume button", timeout)
        tools.wait_for(has_text("Resume Flow Run") + " && " + has_text("group 1, completion 1"), "the rating form",
                       timeout)
        # the dialog's top: the rater's name, then the first group's question and completions with their fields
        tools.evaluate("document.querySelectorAll('.p-modal__body').forEach(b => b.scrollTop = 0)")
        time.sleep(1.0)  # let the dialog's fade-in finish
        tools.screenshot(out)
        return out
    finally:
        tools.close()


def rating_params() -> dict:
    """A small run whose reward is people's ratings, on the embedded SmolLM2 model (readable completions): 2
    prompts x 4 completions of up to 48 tokens, every group to rate."""
    params = small_params(Path("embedded"), iterations=1)
    params["model"]["source"] = "embedded"
    params["rollout"].update(group_size=4, prompts_per_iteration=2, max_new_tokens=48)
    params["optim"].update(minibatch_size=8, micro_batch_size=4)
    params["reward"]["weights"] = {"human": 1.0}
    params["reward"]["human"]["groups_per_iteration"] = params["rollout"]["prompts_per_iteration"]
    return params


def start_rating(project: Path, environment: dict, client: httpx.Client, log: Path,
                 timeout: float = 600) -> tuple[subprocess.Popen, dict]:
    """`python -m flows.rate_flow --iteration 1` started against the server; it and its flow run, once Paused on
    the form."""
    before = {r["id"] for r in client.post("/flow_runs/filter", json={}).raise_for_status().json()}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.rate_flow", "--iteration", "1", "--poll-seconds", "1"],
                                cwd=project, env=environment, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in client.post("/flow_runs/filter", json={}).raise_for_status().json() if r["id"] not in before]
        if runs and runs[0]["state_type"] == "PAUSED":
            return proc, runs[0]
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            raise SystemExit(f"error: the rating flow did not pause on its form (exit status {proc.poll()}):\n"
                             + log.read_text()[-3000:])
        time.sleep(0.5)


def rating_form_picture(browser: str, project: Path, environment: dict, client: httpx.Client, ui_url: str, out: Path,
                        size: str, tmp: Path) -> None:
    print("generating iteration 1's completions (dvc repro generate@1) ...", flush=True)
    generate = subprocess.run(["dvc", "repro", "generate@1"], cwd=project, env=environment, capture_output=True,
                              text=True, timeout=1800)
    if generate.returncode != 0:
        raise SystemExit(f"error: dvc repro generate@1 failed:\n{generate.stdout[-3000:]}\n{generate.stderr[-3000:]}")
    print("starting the rating flow ...", flush=True)
    proc, flow_run = start_rating(project, environment, client, tmp / "rate.log")
    try:
        screenshot_rating_form(browser, ui_url, flow_run["id"], out, tmp / "profile", size)
        print(f"saved {out} ({ui_url}/runs/flow-run/{flow_run['id']})")
    finally:
        stop_process_group(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="the PNG (default: docs/prefect-flow-run.png, with "
                                                     "--rating-form docs/prefect-rating-form.png)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--tab", default=None, help="open this tab of the flow run page, e.g. Artifacts or Logs")
    parser.add_argument("--rating-form", action="store_true",
                        help="instead: a grpo-rate flow run paused on its rating form (flows/rate_flow.py), the form "
                             "opened with the page's Resume button; completions of the embedded SmolLM2 model")
    parser.add_argument("--size", default=None, help="window size WIDTH,HEIGHT (default 1400,900; 1400,1000 with "
                                                     "--rating-form)")
    parser.add_argument("--attempts", type=int, default=4, help="screenshots to try until the page has rendered")
    args = parser.parse_args(argv)
    args.out = args.out or str(ROOT / ("docs/prefect-rating-form.png" if args.rating_form else "docs/prefect-flow-run.png"))
    args.size = args.size or ("1400,1000" if args.rating_form else "1400,900")
    browser = find_chromium()

    tmp = Path(tempfile.mkdtemp(prefix="prefect-screenshot-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    e = {k: v for k, v in env().items() if not k.startswith("PREFECT_")}
    e.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="true",
             PREFECT_API_URL=api, PREFECT_UI_API_URL=api)  # the UI's JavaScript calls this API
    server = subprocess.Popen([shutil.which("prefect", path=e["PATH"]), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        if args.rating_form:
            print("making a throwaway project with the human reward ...", flush=True)
            project = make_project(tmp / "project", rating_params())
        else:
            print("making a tiny model and a throwaway project ...", flush=True)
            project = make_project(tmp / "project", small_params(make_tiny_model(tmp / "tiny"), iterations=1))
        client = httpx.Client(base_url=api, timeout=30)
        deadline = time.time() + 180
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("error: the Prefect server did not start")
            time.sleep(0.5)
        if args.rating_form:
            rating_form_picture(browser, project, e, client, f"http://127.0.0.1:{port}", Path(args.out), args.size, tmp)
            return

        print(f"running grpo-train ({args.iterations} iterations) against {api} ...", flush=True)
        run = subprocess.run([sys.executable, "-m", "flows.grpo_flow", "--iterations", str(args.iterations)],
                             cwd=project, env=e, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise SystemExit(f"error: the flow run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        (flow_run,) = client.post("/flow_runs/filter", json={}).raise_for_status().json()
        url = f"http://127.0.0.1:{port}/runs/flow-run/{flow_run['id']}" + (f"?tab={args.tab}" if args.tab else "")

        # the UI renders in JavaScript: give it virtual time, and check the page shows the run before keeping it
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, args.attempts + 1):
            budget = 10000 * attempt
            dom = chromium(browser, tmp / f"profile-{attempt}", url, "--dump-dom", budget_ms=budget).stdout
            if flow_run["name"] not in dom or "Task runs" not in dom or "Can't connect" in dom:
                print(f"attempt {attempt}: the page has not rendered the flow run yet", flush=True)
                continue
            png = tmp / f"shot-{attempt}.png"
            chromium(browser, tmp / f"profile-shot-{attempt}", url, f"--window-size={args.size}", f"--screenshot={png}",
                     budget_ms=budget)
            if png.exists() and png.stat().st_size > 20_000:
                shutil.copyfile(png, out)
                print(f"saved {out} ({url})")
                return
            print(f"attempt {attempt}: no screenshot", flush=True)
        raise SystemExit(f"error: no screenshot of {url} after {args.attempts} attempts")
    finally:
        stop_process_group(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
