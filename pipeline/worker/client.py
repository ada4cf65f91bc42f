"""The stage's side of the worker (pipeline/worker/): hand this stage to a running worker, if one serves this folder.

A stage started as `python -m pipeline.<stage> ...` calls `delegate` before its heavy imports. It looks for the
worker's socket, .grpo/worker.sock, sends it its arguments, relays the output and exits with the stage's status.
It runs in its own process instead when there is no worker, when GRPO_WORKER=off, under torchrun, or when the
worker declines: it serves one folder (where it started), and runs the code and environment it started with (it
restarts itself when a .py file of grpo/ or pipeline/ changes). Killing the stage's process (Ctrl-C, SIGKILL)
stops the stage in the worker: what it was writing is dropped, as when a stage process is killed.

Every stage imports this module before anything else, so it imports only the standard library (and
pipeline.stage, which does too).
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


def relevant_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def send_message(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


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
    send_message(conn, {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": relevant_env(),
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
    send_message(conn, {"stop": True})
    conn.makefile("r").readline()
    conn.close()
    return 0
