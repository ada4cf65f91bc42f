"""Checkpoints kept in memory by a long-lived process (pipeline/worker/), so that stage after stage does not
read the same weights and AdamW moments from disk again.

    cache = CheckpointCache(max_bytes=8 * 2**30)     # the worker owns one; a stage process has none
    load_checkpoint(path, cache=cache)                # grpo.models.loading: from memory when the folder is unchanged

An entry is keyed by (checkpoint folder, kind) and remembers the folder's stamp: every file's relative path,
size and modification time, as DVC's own state database uses to skip re-hashing. A folder that changed on disk
(rewritten, checked out again) no longer matches and is read from disk. `get` and `put` copy, so what a stage
does with its model never reaches the cache, except where the caller says it is done with the object
(`put(hand_over=True)`) or will change it (`get(take=True)`, which removes the entry). The library's loaders and
savers take the cache as an argument (None: no cache), so nothing here is global.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch


def stamp(folder: str | Path) -> tuple:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(_nbytes(t) for t in [*obj.parameters(), *obj.buffers()])
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _fresh(obj):
    """`obj` with its models as loading their checkpoint gives them: evaluation mode, no gradients attached."""
    for model in obj if isinstance(obj, tuple) else (obj,):
        if isinstance(model, torch.nn.Module):
            model.eval()
            for p in model.parameters():
                p.grad = None
    return obj


class CheckpointCache:
    """Checkpoint contents in memory, at most `max_bytes` of tensors; least recently used entries leave first.
    Beside them, one rollout engine (a vLLM engine, grpo.backends.make_backend) that lives as long as the worker
    and takes each new checkpoint's weights in place."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = 0  # loads served from memory (the worker reports them)
        self._entries: OrderedDict = OrderedDict()  # (folder, kind) -> (stamp, object, bytes)
        self._engine: tuple | None = None  # (key, backend)

    def engine(self, key):
        """The engine kept under `key`, or None."""
        return self._engine[1] if self._engine is not None and self._engine[0] == key else None

    def keep_engine(self, key, backend) -> None:
        """Keep `backend` (its close() then leaves it running) in place of the engine kept before, which is
        closed: one at a time, as GPU memory holds one."""
        self.close_engine()
        backend.resident = True
        self._engine = (key, backend)

    def close_engine(self) -> None:
        if self._engine is not None:
            backend = self._engine[1]
            self._engine, backend.resident = None, False
            backend.close()

    def get(self, folder: str | Path, kind: str, *, take: bool = False):
        """What `put` stored for this folder and kind, if the folder is unchanged since; else None. A copy, or
        with `take` the stored object itself, which leaves the cache (for a caller that will change it)."""
        key = (str(Path(folder).resolve()), kind)
        entry = self._entries.pop(key, None) if take else self._entries.get(key)
        if entry is None or not Path(folder).is_dir() or entry[0] != stamp(folder):
            return None
        self.hits += 1
        if take:
            return entry[1]
        self._entries.move_to_end(key)
        return copy.deepcopy(entry[1])

    def put(self, folder: str | Path, kind: str, obj, *, hand_over: bool = False) -> None:
        """Keep `obj` as the content of `folder` (already written) for `kind`: a copy, or with `hand_over` the
        object itself (its owner is done with it)."""
        key = (str(Path(folder).resolve()), kind)
        self._entries.pop(key, None)
        size = _nbytes(obj)
        if size > self.max_bytes:
            return
        while self._entries and sum(e[2] for e in self._entries.values()) + size > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = (stamp(folder), _fresh(obj if hand_over else copy.deepcopy(obj)), size)
