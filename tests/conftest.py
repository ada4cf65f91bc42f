"""Shared fixtures: a tiny randomly initialised Llama with the real SmolLM2 tokenizer (from the embedded
GGUF), so tests exercise the real chat template and token ids at a fraction of the cost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_model(out_dir: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpo.models import embedded_gguf, save_atomic

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        # head_dim 32: the smallest head size vLLM's CPU attention supports
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return save_atomic(model, tokenizer, out_dir)


@pytest.fixture(scope="session")
def peaked_tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model with large random weights: its next-token distribution is peaked (entropy ~5 nats
    instead of ~log(49152) = 10.8), so a reward over its likely outputs is learnable in a few steps."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "peaked", initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
