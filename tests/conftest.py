"""Shared fixtures: a tiny randomly initialised Llama with the real SmolLM2 tokenizer (from the embedded
GGUF), so tests exercise the real chat template and token ids at a fraction of the cost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.throwaway_project import make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def peaked_tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model with large random weights: its next-token distribution is peaked (entropy ~5 nats
    instead of ~log(49152) = 10.8), so a reward over its likely outputs is learnable in a few steps."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "peaked", initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
