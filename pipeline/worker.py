"""A long-lived process that runs the pipeline's stages for `dvc repro`, with torch and transformers imported
and the latest checkpoints held in memory (grpo/model_cache.py): a stage then skips its interpreter start, its
imports and most model loads. Its outputs are the same bytes as the stage run on its own (tests/test_worker.py),
so DVC's cache stays valid either way.

    python -m pipeline.worker &          # in the repository root, before dvc repro (or the Prefect flow)
    dvc repro
    python -m pipeline.worker --stop

A stage started as `python -m pipeline.<stage> ...` (dvc.yaml's commands, unchanged) looks for the worker's
socket, .grpo/worker.sock, sends it its arguments, relays the output and exits with the stage's status. It runs
in its own process instead when there is no worker, when GRPO_WORKER=off, under torchrun, or when the worker
declines: it serves one folder (where it started), and runs the code and environment it started with (it
restarts itself when a .py file of grpo/ or pipeline/ changes). Killing the stage's process (Ctrl-C, SIGKILL)
stops the stage in the worker: what it was writing is dropped, as when a stage process is killed.

This module is imported by every stage before anything else, so its top level imports only the standard library.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from pipeline import stage

SOCKET = Path(".grpo") / "worker.sock"  # relative to the repository root (AF_UNIX paths are short)
# environment variables that change what a stage computes or where: the worker declines a stage whose own differ
ENV_PREFIXES = ("CUDA_", "OMP_", "MKL_", "HF_", "TRANSFORMERS_", "VLLM_", "TORCH", "PYTORCH_", "PYTHONHASHSEED")
STAGES = ("pipeline.generate", "pipeline.score", "pipeline.advantages", "pipeline.update", "pipeline.evaluate")


def relevant_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


# -- the stage's side ---------------------------------------------------------------------------------------------

def delegate(module: str) -> None:
    """Run this stage (`python -m <module> <sys.argv[1:]>`) in the worker, if one serves this folder, and exit
    with its status; return (to run it here) otherwise."""
    if os.environ.get("GRPO_WORKER") == "off" or "TORCHELASTIC_RUN_ID" in os.environ or not SOCKET.exists():
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(SOCKET))
    except OSError:
        conn.close()
        return  # a socket left by a worker that is gone
    _send(conn, {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": relevant_env(),
                 "started": time.time() - stage.process_age()})  # the stage's start-up counts this process's
    status = None
    with conn.makefile("r", encoding="utf-8") as replies:
        for line in replies:
            message = json.loads(line)
            if "out" in message:
                stream = sys.stdout if message["stream"] == "stdout" else sys.stderr
                stream.write(message["out"])
                stream.flush()
            elif "declined" in message:
                print(f"worker: {message['declined']}; running {module} in this process", file=sys.stderr)
                conn.close()
                return
            elif "exit" in message:
                status = message["exit"]
                break
    conn.close()
    if status is None:
        print(f"worker: it stopped before {module} finished", file=sys.stderr)
        status = 1
    sys.exit(status)


# -- the worker's side --------------------------------------------------------------------------------------------

class StageCancelled(BaseException):
    """The stage's process went away: stop the stage (a BaseException, so the stage's clean-up runs)."""


class _Relay:
    """sys.stdout / sys.stderr of the worker: to the stage's process while a stage runs, else the terminal."""

    def __init__(self, name: str, terminal):
        self.name, self.terminal, self.conn = name, terminal, None

    def write(self, text: str) -> int:
        if self.conn is None:
            return self.terminal.write(text)
        try:
            _send(self.conn, {"out": text, "stream": self.name})
        except OSError:
            pass  # the stage's process is gone; StageCancelled is on its way
        return len(text)

    def flush(self) -> None:
        if self.conn is None:
            self.terminal.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.terminal.fileno()


def code_stamp(root: Path) -> tuple:
    files = sorted([*root.glob("grpo/**/*.py"), *root.glob("pipeline/**/*.py")])
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


def serve(cache_gb: float) -> None:
    import importlib
    import signal
    import threading
    import traceback

    root = Path.cwd().resolve()
    os.environ["GRPO_WORKER"] = "off"  # what the worker starts (torchrun, vLLM's processes) runs its stages itself
    # before the imports: libraries that keep sys.stderr (transformers' logging) keep the relay
    stdout, stderr = _Relay("stdout", sys.stdout), _Relay("stderr", sys.stderr)
    sys.stdout, sys.stderr = stdout, stderr
    for module in STAGES:  # torch, transformers, pandas, ... imported once
        importlib.import_module(module)
    from grpo import model_cache

    model_cache.enable(int(cache_gb * 2**30))
    code, env = code_stamp(root), relevant_env()
    SOCKET.parent.mkdir(exist_ok=True)
    SOCKET.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(SOCKET))
    server.listen()
    running = threading.Event()

    def cancel(signum, frame):
        if running.is_set():
            raise StageCancelled()

    signal.signal(signal.SIGUSR1, cancel)
    print(f"worker: serving {root} on {SOCKET} (pid {os.getpid()})", flush=True)

    def watch(conn: socket.socket) -> None:
        """The stage's process closing its end (killed) cancels the stage."""
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        if running.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)

    while True:
        conn, _ = server.accept()
        try:
            with conn.makefile("r", encoding="utf-8") as reader:
                request = json.loads(reader.readline())
        except (OSError, ValueError):
            conn.close()
            continue
        if request.get("stop"):
            _send(conn, {"exit": 0})
            conn.close()
            break
        reason = None
        if Path(request["cwd"]).resolve() != root:
            reason = f"it serves {root}, not {request['cwd']}"
        elif request["env"] != env:
            reason = "its environment (CUDA_*, OMP_*, HF_*, ...) differs from this process's"
        elif request["module"] not in STAGES:
            reason = f"it runs only {', '.join(STAGES)}"
        elif code_stamp(root) != code:
            reason = "the code changed since it started; it restarts"
        if reason is not None:
            _send(conn, {"declined": reason})
            conn.close()
            if reason.endswith("restarts"):
                server.close()
                sys.stdout, sys.stderr = stdout.terminal, stderr.terminal
                os.execv(sys.executable, [sys.executable, "-m", "pipeline.worker", "--cache-gb", str(cache_gb)])
            continue
        stdout.conn = stderr.conn = conn
        stage.STARTED_AT = request["started"]
        began, hits = time.perf_counter(), model_cache.hits
        sys.argv = [request["module"], *request["argv"]]
        status = 0
        running.set()
        threading.Thread(target=watch, args=(conn,), daemon=True).start()
        try:
            try:
                stage.run(importlib.import_module(request["module"]).main, request["argv"])
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:  # a bug in the stage: its traceback goes to the stage's process, the worker goes on
                traceback.print_exc()
                status = 1
            finally:
                running.clear()
        except StageCancelled:  # raised in the stage, or in the instant between its end and running.clear()
            status = None
        running.clear()
        stage.STARTED_AT = None
        stdout.conn = stderr.conn = None
        command = " ".join([request["module"], *request["argv"]])
        print(f"worker: {command} ... " + ("cancelled (its process went away)" if status is None else
              f"exit {status} in {time.perf_counter() - began:.1f}s, {model_cache.hits - hits} loads from memory"),
              flush=True)
        if status is not None:
            try:
                _send(conn, {"exit": status})
            except OSError:
                pass
        conn.close()
    SOCKET.unlink(missing_ok=True)


def stop() -> int:
    if not SOCKET.exists():
        print("worker: none running here", file=sys.stderr)
        return 1
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(SOCKET))
    except OSError:
        SOCKET.unlink(missing_ok=True)
        return 0
    _send(conn, {"stop": True})
    conn.makefile("r").readline()
    conn.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop", action="store_true", help="stop the worker serving this folder")
    parser.add_argument("--cache-gb", type=float, default=8.0,
                        help="memory for the checkpoints it keeps (least recently used leave first)")
    args = parser.parse_args(argv)
    if args.stop:
        sys.exit(stop())
    serve(args.cache_gb)


if __name__ == "__main__":
    main()
