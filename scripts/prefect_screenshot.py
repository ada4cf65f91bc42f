"""A picture of a GRPO flow run in the Prefect UI, for docs/prefect.md.

Starts a Prefect server (UI on) on a free loopback port with its own PREFECT_HOME, runs a short grpo-train
flow against it (a tiny random model in a throwaway copy of the project, so it takes a minute or two on a
CPU), opens the flow run page in headless Chromium and saves a screenshot. Everything it starts is stopped
and its temporary files removed.

    python scripts/prefect_screenshot.py                    # -> docs/prefect-flow-run.png
    python scripts/prefect_screenshot.py --iterations 2 --tab Artifacts --out /tmp/artifacts.png

Needs Chromium (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
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


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    raise SystemExit("error: no Chromium found; install it with `apt-get install -y chromium`")


def chromium(browser: str, profile: Path, url: str, *args: str, budget_ms: int) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    return subprocess.run([browser, *flags, *args, url], capture_output=True, text=True, timeout=180)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs/prefect-flow-run.png"))
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--tab", default=None, help="open this tab of the flow run page, e.g. Artifacts or Logs")
    parser.add_argument("--size", default="1400,900", help="window size WIDTH,HEIGHT")
    parser.add_argument("--attempts", type=int, default=4, help="screenshots to try until the page has rendered")
    args = parser.parse_args(argv)
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
