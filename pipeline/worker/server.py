"""The worker's side (pipeline/worker/): a socket server that runs the stages in this process, with one
CheckpointCache (grpo/models/cache.py) that the stages load from and save to.

    python -m pipeline.worker [--cache-gb 8] [--idle-timeout 120]   # serve this folder until stopped or idle
    python -m pipeline.worker --stop

A stage starts one itself when none serves its folder (pipeline/worker/client.py), so `dvc repro` needs no
second command. It serves the code and the environment it started with: when either changed it exits, and the
stage that found out starts a fresh one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from pipeline import stage
from pipeline.worker.client import IDLE_SECONDS, SOCKET, relevant_env, send_message, stop

# the stages a worker runs -> whether their main(argv, *, cache) loads checkpoints (and takes the worker's cache)
STAGES = {"pipeline.generate": True, "pipeline.reward_model": True, "pipeline.score": True,
          "pipeline.advantages": False, "pipeline.update": True, "pipeline.evaluate": True}


class StageCancelled(BaseException):
    """The stage's process went away: stop the stage (a BaseException, so the stage's clean-up runs)."""


class _Relay:
    """sys.stdout / sys.stderr of the worker: to the stage's process while a stage runs, else the terminal."""

    lock = threading.Lock()  # one message at a time on the stage's socket (a stage's threads write too)

    def __init__(self, name: str, terminal):
        self.name, self.terminal, self.conn = name, terminal, None

    def write(self, text: str) -> int:
        if self.conn is None:
            return self.terminal.write(text)
        try:
            with self.lock:
                send_message(self.conn, {"out": text, "stream": self.name})
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


def remove_socket(inode: int) -> None:
    """Remove this worker's socket file, not one a worker started after it made: a stage that found this one
    exiting may already have started the next, whose socket has the same path."""
    try:
        if SOCKET.stat().st_ino == inode:
            SOCKET.unlink()
    except FileNotFoundError:
        pass


def serve(cache_gb: float, idle_timeout: float) -> None:
    import importlib
    import signal
    import traceback

    root = Path.cwd().resolve()
    os.environ["GRPO_WORKER"] = "off"  # what the worker starts (torchrun, vLLM's processes) runs its stages itself
    # before the imports: libraries that keep sys.stderr (transformers' logging) keep the relay
    stdout, stderr = _Relay("stdout", sys.stdout), _Relay("stderr", sys.stderr)
    sys.stdout, sys.stderr = stdout, stderr
    for module in STAGES:  # torch, transformers, pandas, ... imported once
        importlib.import_module(module)
    from grpo.models.cache import CheckpointCache

    cache = CheckpointCache(int(cache_gb * 2**30))
    code, env = code_stamp(root), relevant_env()
    SOCKET.parent.mkdir(exist_ok=True)
    SOCKET.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(SOCKET))
    ours = SOCKET.stat().st_ino  # the socket file this worker made (a worker started after it makes another)
    server.listen()
    server.settimeout(idle_timeout or None)  # 0: no idle timeout
    running = threading.Event()

    def cancel(signum, frame):
        if running.is_set():
            raise StageCancelled()

    signal.signal(signal.SIGUSR1, cancel)
    print(f"worker: serving {root} on {SOCKET} (pid {os.getpid()}"
          + (f", exits after {idle_timeout:g} s without a stage)" if idle_timeout else ")"), flush=True)

    def watch(conn: socket.socket) -> None:
        """The stage's process closing its end (killed) cancels the stage."""
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        if running.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)

    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                print(f"worker: no stage for {idle_timeout:g} s; exiting", flush=True)
                break  # (finally:) the socket goes; a stage that connected just now gets no reply and starts another
            try:
                with conn.makefile("r", encoding="utf-8") as reader:
                    request = json.loads(reader.readline())
            except (OSError, ValueError):
                conn.close()
                continue
            if request.get("stop"):
                send_message(conn, {"exit": 0})
                conn.close()
                break
            reason, stops = None, False  # stops: the worker is stale, the stage starts a fresh one
            if Path(request["cwd"]).resolve() != root:
                reason = f"it serves {root}, not {request['cwd']}"
            elif request["module"] not in STAGES:
                reason = f"it runs only {', '.join(STAGES)}"
            elif request["env"] != env:
                reason = "the stage's environment (CUDA_*, OMP_*, HF_*, ...) differs from the worker's; it stops"
                stops = True
            elif code_stamp(root) != code:
                reason, stops = "the code changed since it started; it stops", True
            if reason is not None:
                if stops:  # gone (its engine too) before the stage hears it, so that the stage starts a fresh one
                    server.close()
                    remove_socket(ours)
                    cache.close_engine()
                send_message(conn, {"declined": reason, "stopped": stops})
                conn.close()
                if stops:
                    print(f"worker: {reason}", flush=True)
                    return
                continue
            stdout.conn = stderr.conn = conn
            stage.STARTED_AT = request["started"]
            began, hits = time.perf_counter(), cache.hits
            sys.argv = [request["module"], *request["argv"]]
            status = 0
            running.set()
            threading.Thread(target=watch, args=(conn,), daemon=True).start()
            try:
                try:
                    stage_main = importlib.import_module(request["module"]).main
                    if STAGES[request["module"]]:
                        stage.run(lambda argv: stage_main(argv, cache=cache), request["argv"])
                    else:
                        stage.run(stage_main, request["argv"])
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
            if status != 0:  # an engine interrupted mid-request may hold its requests: the next stage starts a new one
                cache.close_engine()
            stage.STARTED_AT = None
            stdout.conn = stderr.conn = None
            command = " ".join([request["module"], *request["argv"]])
            print(f"worker: {command} ... " + ("cancelled (its process went away)" if status is None else
                  f"exit {status} in {time.perf_counter() - began:.1f}s, {cache.hits - hits} loads from memory"),
                  flush=True)
            if status is not None:
                try:
                    send_message(conn, {"exit": status})
                except OSError:
                    pass
            conn.close()
    finally:  # idle, stopped, or stale: its engine's processes leave with it
        cache.close_engine()
        remove_socket(ours)


def main(argv: list[str] | None = None) -> None:
    import argparse

    import pipeline.worker

    parser = argparse.ArgumentParser(prog="python -m pipeline.worker", description=pipeline.worker.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop", action="store_true", help="stop the worker serving this folder")
    parser.add_argument("--cache-gb", type=float, default=8.0,
                        help="memory for the checkpoints it keeps (least recently used leave first)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_SECONDS,
                        help="exit after this many seconds without a stage (0: never; default GRPO_WORKER_IDLE_SECONDS "
                             "or 120)")
    args = parser.parse_args(argv)
    if args.stop:
        sys.exit(stop())
    serve(args.cache_gb, args.idle_timeout)


if __name__ == "__main__":
    main()
