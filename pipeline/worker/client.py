"""The stage's side of the worker (pipeline/worker/): hand this stage to the worker serving this folder,
starting one if there is none.

A stage started as `python -m pipeline.<stage> ...` calls `delegate` before its heavy imports. It looks for the
worker's socket, .grpo/worker.sock; with none it starts `python -m pipeline.worker --idle-timeout S` in the
background (S = GRPO_WORKER_IDLE_SECONDS, default 120: the worker exits after S seconds without a stage; its
log is .grpo/worker.log). It sends the worker its arguments, relays the output and exits with the stage's
status. A worker runs the code and environment it started with: when a .py file of grpo/ or pipeline/ changed,
or the stage's environment differs (CUDA_*, OMP_*, ...), it exits and the stage starts a fresh one. The stage
runs in its own process when GRPO_WORKER=off, under torchrun, when the worker declines (another folder), or
when no worker could start. Killing the stage's process (Ctrl-C, SIGKILL) stops the stage in the worker: what
it was writing is dropped, as when a stage process is killed.

Every stage imports this module before anything else, so it imports only the standard library (and
pipeline.stage, which does too).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline import stage

SOCKET = Path(".grpo") / "worker.sock"  # relative to the repository root (AF_UNIX paths are short)
LOG = Path(".grpo") / "worker.log"  # what a worker started by a stage prints
IDLE_SECONDS = float(os.environ.get("GRPO_WORKER_IDLE_SECONDS", "120"))  # a started worker's idle timeout
START_TIMEOUT_S = 300.0  # its imports (torch, transformers, ...) on a busy machine
# environment variables that change what a stage computes or where: the worker declines a stage whose own differ
ENV_PREFIXES = ("CUDA_", "OMP_", "MKL_", "HF_", "TRANSFORMERS_", "VLLM_", "TORCH", "PYTORCH_", "PYTHONHASHSEED")


def relevant_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def send_message(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def connect() -> socket.socket | None:
    """A connection to the worker serving this folder, or None when there is none."""
    if not SOCKET.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(SOCKET))
    except OSError:
        conn.close()
        return None  # a socket left by a worker that is gone
    return conn


def start_worker() -> socket.socket | None:
    """Start a worker for this folder (one: a lock keeps two stages from both starting one) and connect to it;
    None if it could not start (its log says why)."""
    SOCKET.parent.mkdir(exist_ok=True)
    with open(SOCKET.parent / "worker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = connect()  # started by another stage while this one waited for the lock
        if conn is not None:
            return conn
        SOCKET.unlink(missing_ok=True)
        with open(LOG, "a") as log:  # not the stage's stdout: DVC would wait for the worker to close it
            worker = subprocess.Popen([sys.executable, "-m", "pipeline.worker", "--idle-timeout", str(IDLE_SECONDS)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # outlives this stage; Ctrl-C of DVC spares it
        deadline = time.monotonic() + START_TIMEOUT_S
        while (conn := connect()) is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                print(f"worker: it did not start (see {LOG})", file=sys.stderr)
                return None
            time.sleep(0.05)
        return conn


def delegate(module: str) -> None:
    """Run this stage (`python -m <module> <sys.argv[1:]>`) in the worker serving this folder, starting one if
    needed, and exit with its status; return (to run it here) otherwise."""
    if os.environ.get("GRPO_WORKER") == "off" or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    for _ in range(2):  # a worker that stops for this stage (code or environment changed) is started afresh
        conn = connect() or start_worker()
        if conn is None:
            return
        try:
            status = _run_in_worker(conn, module)
        except OSError:  # the worker closed the connection before it read the request: it was exiting
            status = "restart"
        if status == "restart":
            continue
        if status is None:  # declined
            return
        sys.exit(status)


def _run_in_worker(conn: socket.socket, module: str) -> int | str | None:
    """The stage's exit status; None when the worker declines it, "restart" when the worker stopped for it."""
    send_message(conn, {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": relevant_env(),
                 "started": time.time() - stage.process_age()})  # the stage's start-up counts this process's
    heard = False
    with conn, conn.makefile("r", encoding="utf-8") as replies:
        for line in replies:
            message, heard = json.loads(line), True
            if "out" in message:
                stream = sys.stdout if message["stream"] == "stdout" else sys.stderr
                stream.write(message["out"])
                stream.flush()
            elif "declined" in message:
                print(f"worker: {message['declined']}" + ("" if message.get("stopped") else
                      f"; running {module} in this process"), file=sys.stderr)
                return "restart" if message.get("stopped") else None
            elif "exit" in message:
                return message["exit"]
    if not heard:  # it closed the connection unread: it was exiting
        return "restart"
    print(f"worker: it stopped before {module} finished", file=sys.stderr)
    return 1


def stop() -> int:
    conn = connect()
    if conn is None:
        SOCKET.unlink(missing_ok=True)
        print("worker: none running here", file=sys.stderr)
        return 1
    send_message(conn, {"stop": True})
    conn.makefile("r").readline()
    conn.close()
    return 0
