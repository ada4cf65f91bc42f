"""Atomic writes: every output of the pipeline (Parquet tables, JSON, plots, checkpoint folders with their DCP
optimizer state) is written under a temporary name beside its final path and renamed into place, so a killed
writer never leaves a file or folder that looks complete.

    atomic_write(path, lambda tmp: table.to_parquet(tmp))    a file: write(tmp), fsync, rename
    write_text(path, text) / write_json(path, data)        the same, for text and metrics JSON
    with atomic_folder(out_dir) as tmp: ...                a folder: filled in tmp, renamed into place on success,
                                                           removed on any exception

Temporaries are named .<name>.<random>.tmp; the next writer of the same path removes any a killed run left.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def temporary_prefix(path: Path) -> str:
    """Temporaries of `path` are named .<name>.<random>.tmp beside it."""
    return f".{path.name}."


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete what a killed writer of `path` left behind (its .<name>.*.tmp files or folders). Stages run one
    at a time per output (DVC's lock), so a temporary that exists when the writer starts is stale."""
    path = Path(path)
    stale = sorted(path.parent.glob(f"{temporary_prefix(path)}*.tmp")) if path.parent.exists() else []
    for leftover in stale:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a temporary file beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: dict) -> Path:
    """Metrics or state as JSON: indented, keys sorted (the same data is the same bytes)."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def temporary_dir(out_dir: str | Path) -> Path:
    """A new empty temporary sibling of `out_dir` (what a killed earlier run left there is removed first)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir), suffix=".tmp", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    return tmp


@contextmanager
def atomic_folder(out_dir: str | Path) -> Iterator[Path]:
    """Yield a new temporary sibling of `out_dir`; when the block ends without an exception, rename it into place
    (replacing an older `out_dir`); on any exception, remove it."""
    out_dir = Path(out_dir)
    tmp = temporary_dir(out_dir)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
