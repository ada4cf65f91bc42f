"""What every stage shares: a one-line log of what it read, wrote and how long it took, and a user's
mistake (grpo.errors.UserError) turned into one clear error line and exit status 2. Any other exception is
a bug: it keeps its traceback (and Python's exit status 1)."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from grpo.errors import USER_ERROR_EXIT, UserError


def _describe(paths) -> str:
    return ", ".join(str(p) for p in paths) if paths else "-"


class StageLog(dict):
    """The details a stage logs on its last line, and when its work began."""

    startup_seconds: float  # from the process's start to the stage's body: interpreter start-up and imports


STARTED_AT: float | None = None  # set by pipeline/worker/server.py: when the stage's own (delegating) process started


def process_age() -> float:
    """Seconds since this process started (the OS's start time, so imports made before any of our code count):
    /proc's start time against the boot clock. (psutil's create_time adds /proc/stat's boot time, which Linux
    gives in whole seconds: the same error of up to 1 s in every stage.)"""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        import psutil

        return time.time() - psutil.Process().create_time()


def process_seconds() -> float:
    """Seconds since this process started; in the worker, since the stage's own process started."""
    return process_age() if STARTED_AT is None else time.time() - STARTED_AT


@contextmanager
def stage(name: str, *, reads: list, writes: list) -> Iterator[StageLog]:
    """Time a stage and log 'name: read ..., wrote ... (details) in Xs'. Yield a dict for details, which also
    carries `startup_seconds` (for the stage's time/<stage>_startup_seconds metric)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=False)
    details = StageLog()
    details.startup_seconds = process_seconds()
    start = time.perf_counter()
    yield details
    info = "; ".join(f"{k}={v}" for k, v in details.items())
    logging.getLogger("pipeline").info(
        "%s: read %s, wrote %s%s in %.1fs", name, _describe(reads), _describe(writes), f" ({info})" if info else "",
        time.perf_counter() - start,
    )


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Entry point wrapper: a UserError prints one line 'error: ...' and exits with USER_ERROR_EXIT (2)."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def iteration_parser(doc: str | None, **inputs: str):
    """argparse for a per-iteration stage: --params, --iteration, the stage's --<input> paths (name -> help),
    --out and --metrics."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--iteration", type=int, required=True)
    for name, help_text in inputs.items():
        parser.add_argument(f"--{name}", required=True, help=help_text)
    parser.add_argument("--out", required=True)
    parser.add_argument("--metrics", required=True, help="metrics JSON of this stage")
    return parser
