"""A checkpoint folder: the policy (safetensors + tokenizer), its AdamW state and the trainer's state, written
atomically (grpo.models.save_atomic), so iteration k+1 continues exactly where iteration k stopped.

    data/checkpoints/<k>/
        model.safetensors, config.json, tokenizer files    save_pretrained
        checkpoint.json     {"checkpoint_id": "iter-k", "iteration": k, "parent": ..., "global_step": ...}
        optimizer.pt        AdamW state_dict           torch.load(path, weights_only=True)
        trainer_state.pt    {"iteration", "global_step", "torch_rng_state"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from grpo.models import save_atomic

INFO_FILE = "checkpoint.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.pt"


def checkpoint_info(checkpoint_dir: str | Path) -> dict:
    """checkpoint.json: the checkpoint's id ("base", "iter-k"), iteration, parent, global_step."""
    return json.loads((Path(checkpoint_dir) / INFO_FILE).read_text())


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint_dir: str | Path, **hyperparameters) -> bool:
    """Load the AdamW moments saved with the checkpoint, if any (the base has none); `hyperparameters`
    (lr, weight_decay, ...) from params.yaml then win over the saved ones. True when a state was loaded."""
    path = Path(checkpoint_dir) / OPTIMIZER_FILE
    if not path.exists():
        return False
    optimizer.load_state_dict(torch.load(path, weights_only=True))
    for group in optimizer.param_groups:
        group.update(hyperparameters)
    return True


def load_trainer_state(checkpoint_dir: str | Path) -> dict:
    """The trainer state saved with the checkpoint; the base's is {"iteration": 0, "global_step": 0}."""
    path = Path(checkpoint_dir) / TRAINER_STATE_FILE
    return torch.load(path, weights_only=True) if path.exists() else {"iteration": 0, "global_step": 0}


def save_checkpoint(out_dir: str | Path, model, tokenizer, info: dict, *,
                    optimizer: Optional[torch.optim.Optimizer] = None, trainer_state: Optional[dict] = None) -> Path:
    """Write the checkpoint folder atomically; every file is saved straight into the temporary folder."""

    def write_extra(tmp: Path) -> None:
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)

    return save_atomic(model, tokenizer, out_dir, write_extra)
