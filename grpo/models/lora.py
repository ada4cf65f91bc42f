"""LoRA with peft: W' = W + (alpha / r) B A, only A and B trained; the base weights W are never copied.

A LoRA checkpoint folder holds the adapter, not the model:

    data/checkpoints/<k>/                 (k >= 1; checkpoint 0 is always the whole base model)
        adapter_model.safetensors, adapter_config.json    peft's save_pretrained (A, B of every target module)
        checkpoint.json      {..., "base": "../0"}: the base folder, relative to this one
        optimizer/, trainer_state.pt      as for full fine-tuning (grpo/models/checkpoints.py), adapter parameters only

The KL reference of GRPO is the base model, i.e. the policy with its adapter switched off (B A = 0): one
model in memory, not two (`ReferenceView`).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / ADAPTER_CONFIG).exists()


def base_dir(checkpoint_dir: str | Path, info: dict) -> Path:
    """The base model folder of an adapter checkpoint (its checkpoint.json `info` names it relative to it)."""
    return (Path(checkpoint_dir) / info["base"]).resolve()


def adapter_rank(checkpoint_dir: str | Path) -> int:
    """The largest rank r of the adapter saved in checkpoint_dir (adapter_config.json)."""
    config = json.loads((Path(checkpoint_dir) / ADAPTER_CONFIG).read_text())
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def relative_base(base: str | Path, checkpoint_dir: str | Path) -> str:
    """How checkpoint.json names the base: relative, so a moved or re-checked-out data/ folder still finds it."""
    return os.path.relpath(Path(base).resolve(), Path(checkpoint_dir).resolve())


def peft_config(settings):
    """params.yaml model.lora (grpo.config.LoraSettings) -> peft.LoraConfig for a causal LM."""
    from peft import LoraConfig

    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def add_adapter(model, settings):
    """A new adapter on `model` (peft's init: A random, from torch's RNG, B = 0, so the policy starts as the
    base); every base weight frozen."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(settings))


def load_adapter(model, checkpoint_dir: str | Path, *, trainable: bool):
    """`model` (the base) with the adapter saved in checkpoint_dir."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(checkpoint_dir), is_trainable=trainable)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def describe_base(model, base: str) -> None:
    """Make adapter_config.json the same bytes in every run: the base named as checkpoint.json names it (not
    the absolute path it was loaded from), and 'all-linear' expanded to a sorted list (peft keeps a set)."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    if isinstance(config.target_modules, (set, frozenset)):
        config.target_modules = sorted(config.target_modules)


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


class ReferenceView:
    """The frozen reference as a callable model: the policy with its adapter disabled, i.e. the base."""

    def __init__(self, policy):
        self.policy = policy
        self.config = policy.config  # the model's settings, e.g. its attention implementation (grpo.algorithm.packing)

    def __call__(self, *args, **kwargs):
        with self.disabled():
            return self.policy(*args, **kwargs)

    @contextmanager
    def disabled(self):
        with self.policy.disable_adapter():
            yield
