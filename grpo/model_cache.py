"""Checkpoints kept in memory by a long-lived process (pipeline/worker.py), so that stage after stage does not
read the same weights and AdamW moments from disk again.

An entry is keyed by (checkpoint folder, kind) and remembers the folder's stamp: every file's relative path,
size and modification time, as DVC's own state database uses to skip re-hashing. A folder that changed on disk
(rewritten, checked out again) no longer matches and is read from disk. `get` and `put` copy, so what a stage
does with its model never reaches the cache, except where the caller says it is done with the object
(`put(hand_over=True)`) or will change it (`get(take=True)`, which removes the entry). Disabled (every call a no-op) unless `enable` was called: an
ordinary stage process gains nothing from a cache it will not live to use.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch

_entries: OrderedDict = OrderedDict()  # (folder, kind) -> (stamp, object, bytes); least recently used first
_max_bytes = 0  # 0: disabled
hits = 0  # loads served from memory (the worker reports them)


def enable(max_bytes: int) -> None:
    global _max_bytes
    _max_bytes = max_bytes


def enabled() -> bool:
    return _max_bytes > 0


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


def get(folder: str | Path, kind: str, *, take: bool = False):
    """What `put` stored for this folder and kind, if the folder is unchanged since; else None. A copy, or with
    `take` the stored object itself, which leaves the cache (for a caller that will change it: no copy made)."""
    if not enabled():
        return None
    key = (str(Path(folder).resolve()), kind)
    entry = _entries.pop(key, None) if take else _entries.get(key)
    if entry is None or not Path(folder).is_dir() or entry[0] != stamp(folder):
        return None
    global hits
    hits += 1
    if take:
        return entry[1]
    _entries.move_to_end(key)
    return copy.deepcopy(entry[1])


def put(folder: str | Path, kind: str, obj, *, hand_over: bool = False) -> None:
    """Keep `obj` as the content of `folder` (already written) for `kind`: a copy, or with `hand_over` the object
    itself (its owner is done with it). The least recently used entries leave when the cache would exceed its
    size."""
    if not enabled():
        return
    key = (str(Path(folder).resolve()), kind)
    _entries.pop(key, None)
    size = _nbytes(obj)
    if size > _max_bytes:
        return
    while _entries and sum(e[2] for e in _entries.values()) + size > _max_bytes:
        _entries.popitem(last=False)
    _entries[key] = (stamp(folder), _fresh(obj if hand_over else copy.deepcopy(obj)), size)


def _fresh(obj):
    """`obj` with its models as loading their checkpoint gives them: evaluation mode, no gradients attached."""
    for model in obj if isinstance(obj, tuple) else (obj,):
        if isinstance(model, torch.nn.Module):
            model.eval()
            for p in model.parameters():
                p.grad = None
    return obj
