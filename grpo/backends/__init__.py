"""Rollout backends: sample a group of G completions per prompt, with the sampler's own log-probs.

Every backend returns the same thing, so the generate stage writes the same Parquet columns whichever ran:

    backend = make_backend("hf", model_dir)           # or "vllm"; see select_backend for "auto"
    groups = backend.generate(prompts, SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_new_tokens=48), seeds)
    groups[i].prompt_token_ids, groups[i].completions[j].token_ids / .logprobs / .text / .finish_reason
    backend.close()

temperature 0 means greedy (n must be 1).

    base.py          SamplingSpec, Completion, Group, the Backend protocol, stop_token_ids, trim_at_eos
    hf.py            HFBackend: a transformers sampling loop (each prompt prefilled once; finished rows leave on the CPU)
    vllm_backend.py  VLLMBackend: vLLM's offline engine (a worker keeps one and reloads its weights in place)
    data_parallel.py DataParallelBackend: D replicas of a backend in their own processes (data_parallel_size)

BACKENDS maps each name to the module that defines its backend. Importing this package imports neither
backend (nor transformers, nor vllm): make_backend imports the chosen backend's module when it is called.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from grpo.backends.base import Backend, Completion, Group, SamplingSpec, stop_token_ids
from grpo.registry import Registry

if TYPE_CHECKING:
    # Never run. Names every backend module in an import statement, so that the static import scans
    # (tests/test_stage_deps.py, which dvc.yaml's code deps follow) count them as code a stage may run.
    # tests/test_backends.py checks that this list and BACKENDS name the same modules.
    from grpo.backends import hf, vllm_backend  # noqa: F401
    from grpo.models.cache import CheckpointCache

__all__ = ["BACKENDS", "Backend", "BackendEntry", "Completion", "Group", "SamplingSpec", "backend_options",
           "make_backend", "select_backend", "stop_token_ids", "vllm_available"]


def _no_options(params) -> dict:
    return {}


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend: the module that defines it and its class there (imported on the first call, not
    before), and the constructor options params.yaml sets for it."""

    module: str
    cls: str
    options: Callable[..., dict] = _no_options  # params -> keyword arguments of the class
    loads_checkpoints: bool = False  # loads the weights with grpo.models.loading (and so from a worker's cache)
    keeps_engine: bool = False  # in a worker: one instance kept across stages, its weights replaced in place (load)

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)

    def __call__(self, model_dir: str, **options) -> Backend:
        return self.load()(model_dir, **options)


def _vllm_options(params) -> dict:
    v = params.rollout.vllm
    return dict(dtype=v.dtype, max_model_len=v.max_model_len, gpu_memory_utilization=v.gpu_memory_utilization,
                tensor_parallel_size=v.tensor_parallel_size, data_parallel_size=v.data_parallel_size,
                enforce_eager=v.enforce_eager)


BACKENDS: Registry[BackendEntry] = Registry("rollout backend")
BACKENDS.register("hf")(BackendEntry("grpo.backends.hf", "HFBackend", loads_checkpoints=True))
BACKENDS.register("vllm")(BackendEntry("grpo.backends.vllm_backend", "VLLMBackend", _vllm_options,
                                       keeps_engine=True))


def make_backend(name: str, model_dir: str, *, data_parallel_size: int = 1, cache: CheckpointCache | None = None,
                 **options) -> Backend:
    """Import the module of backend `name` and build it; an unknown name is a ValueError listing the known.
    data_parallel_size > 1: that many replicas, each in its own process (grpo/backends/data_parallel.py).
    `cache`: a worker's checkpoints in memory, for a backend that loads its weights through grpo.models (hf;
    vLLM reads the folder itself)."""
    entry = BACKENDS.get(name)
    if data_parallel_size > 1:  # replicas in their own processes: this process's cache is not theirs
        from grpo.backends.data_parallel import DataParallelBackend

        return DataParallelBackend(name, model_dir, data_parallel_size, **options)
    if cache is not None and entry.loads_checkpoints:
        options["cache"] = cache
    if cache is None or not entry.keeps_engine:
        return entry(model_dir, **options)
    # a worker keeps one engine across stages and gives it each new checkpoint in place
    key = (name, engine_identity(model_dir), tuple(sorted(options.items())))
    backend = cache.engine(key)
    if backend is None:
        backend = entry(model_dir, **options)
        cache.keep_engine(key, backend)
    else:
        began, before = time.perf_counter(), backend.checkpoint
        backend.load(model_dir)
        if before != str(model_dir):
            print(f"{name}: the engine kept from an earlier stage took {model_dir} in place in "
                  f"{time.perf_counter() - began:.1f}s", file=sys.stderr)
    return backend


def engine_identity(model_dir: str) -> str:
    """What an engine is built for whatever the checkpoint: the base of a LoRA checkpoint, else the model's
    architecture (its config.json)."""
    from grpo.models.loading import checkpoint_info
    from grpo.models.lora import base_dir, is_adapter_dir

    if is_adapter_dir(model_dir):
        return f"lora:{base_dir(model_dir, checkpoint_info(model_dir))}"
    return (Path(model_dir) / "config.json").read_text()


def backend_options(params, name: str) -> dict:
    """The keyword arguments params.yaml sets for backend `name` (rollout.vllm for vllm; none for hf)."""
    return BACKENDS.get(name).options(params)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def select_backend(requested: str) -> str:
    """'auto' -> vllm when vLLM is installed and a CUDA GPU is present, else hf."""
    if requested != "auto":
        return requested
    import torch

    return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
