"""A checkpoint folder: the policy (safetensors + tokenizer), its AdamW state and the trainer's state, written
atomically (grpo.models.atomic.atomic_folder), so iteration k+1 continues exactly where iteration k stopped.

    data/checkpoints/<k>/
        model.safetensors, config.json, tokenizer files    save_pretrained (the whole, unsharded weights), or
                            with LoRA adapter_model.safetensors + adapter_config.json only (grpo/models/lora.py)
        checkpoint.json     {"checkpoint_id": "iter-k", "iteration": k, "parent": ..., "global_step": ...}
        optimizer/          AdamW state, torch.distributed.checkpoint (DCP): .metadata and one __<rank>_0.distcp
                            per rank, each holding that rank's shard of the moments (no rank ever builds the
                            whole state); keyed by parameter name, so any number of ranks can load it
        trainer_state.pt    {"iteration", "global_step", "torch_rng_state"}

The optimizer format is the same for 1 and N processes: a 1-process run writes one shard holding all of
it, and a run with another number of ranks re-shards on load (DCP reads each rank's slices).
`read_optimizer_state` gives the whole state as one plain dict, for inspection.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from grpo.distributed import World, barrier, broadcast_object, full_state_dict, world_size
from grpo.models.atomic import atomic_folder
from grpo.models.cache import CheckpointCache
from grpo.models.loading import INFO_FILE, save_model
from grpo.models.lora import is_peft_model

OPTIMIZER_DIR = "optimizer"
TRAINER_STATE_FILE = "trainer_state.pt"


def _dcp(fn, state: dict, path: Path, **kwargs) -> None:
    """dcp.save / dcp.load; without a process group DCP runs in this process alone (and would warn so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=path, no_dist=world_size() == 1, **kwargs)


def _writer(path: Path):
    """DCP's file writer, with two changes: no fsync (nothing else in a checkpoint folder is synced; the folder
    is renamed into place after), and no temporary path or random id in .metadata, so the same state is the
    same bytes (and the same DVC hash) in every run."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def storage_meta(self):
            return None

    return Writer(path, sync_files=False)


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, checkpoint_dir: str | Path, *,
                         cache: CheckpointCache | None = None, **hyperparameters) -> bool:
    """Load the AdamW moments saved with the checkpoint, if any (the base has none), into this run's layout
    (this rank's shards under FSDP; every rank calls it); `hyperparameters` (lr, weight_decay, ...) from
    params.yaml then win over the saved ones. True when a state was loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(checkpoint_dir) / OPTIMIZER_DIR
    if not path.exists():
        return False
    # what save_checkpoint kept in `cache`, in a long-lived worker process
    state = cache.get(checkpoint_dir, OPTIMIZER_DIR, take=True) if cache is not None and world_size() == 1 else None
    if state is None:
        # the target to load into: this optimizer's state dict, keyed by parameter name (for a fresh optimizer,
        # get_optimizer_state_dict first creates zero moments with a zero-gradient, lr 0 step: no weight moves)
        state = get_optimizer_state_dict(model, optimizer)
        _dcp(dcp.load, state, path)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state)
    for group in optimizer.param_groups:
        group.update(hyperparameters)
    return True


def read_optimizer_state(checkpoint_dir: str | Path) -> dict:
    """The whole optimizer state of a checkpoint as one plain dict {"state": {param name: {"step", "exp_avg",
    "exp_avg_sq"}}, "param_groups": [...]} (for inspection and tests: it builds every moment in memory)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(Path(checkpoint_dir) / OPTIMIZER_DIR, Path(tmp) / "optimizer.pt")
        return torch.load(Path(tmp) / "optimizer.pt", weights_only=True)


def load_trainer_state(checkpoint_dir: str | Path) -> dict:
    """The trainer state saved with the checkpoint; the base's is {"iteration": 0, "global_step": 0}."""
    path = Path(checkpoint_dir) / TRAINER_STATE_FILE
    return torch.load(path, weights_only=True) if path.exists() else {"iteration": 0, "global_step": 0}


def save_checkpoint(out_dir: str | Path, model, tokenizer, info: dict, *,
                    optimizer: Optional[torch.optim.Optimizer] = None, trainer_state: Optional[dict] = None,
                    world: Optional[World] = None, cache: CheckpointCache | None = None,
                    hand_over: bool = False) -> Path:
    """Write the checkpoint folder atomically; every file is saved straight into the temporary folder. With a
    `cache` (a long-lived worker's) the model and the AdamW state are also kept in memory as this checkpoint:
    copied, or with `hand_over` (the caller is done with them) kept as they are.

    With several ranks every rank calls it: each writes its shard of the optimizer state into the temporary
    folder rank 0 made, then rank 0 writes the whole weights (gathered onto its CPU) and the small files and
    renames the folder into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    world = world or World(0, 1, torch.device("cpu"))
    weights = full_state_dict(model, world)  # None in a world of one: save_pretrained reads the model itself
    # no optimizer step taken yet (an iteration without kept rollouts from the base): no state to save
    moments = get_optimizer_state_dict(model, optimizer) if optimizer is not None and optimizer.state else None
    adapter = is_peft_model(model)  # LoRA: the adapter only (grpo/models/lora.py); the tokenizer is the base's
    with atomic_folder(out_dir) if world.is_main else nullcontext() as tmp:
        tmp = broadcast_object(tmp)  # rank 0's temporary folder, for every rank's shard
        if moments is not None:
            _dcp(dcp.save, moments, tmp / OPTIMIZER_DIR, storage_writer=_writer(tmp / OPTIMIZER_DIR))
        barrier()  # every shard is written
        if world.is_main:
            with warnings.catch_warnings():
                # peft looks for the base's config.json to see if the vocabulary changed; the base is named
                # relative to the checkpoint (grpo.models.lora.describe_base) and LoRA never touches the embeddings
                warnings.filterwarnings("ignore", message="Could not find a config file")
                save_model(model, None if adapter else tokenizer, tmp, state_dict=weights)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if trainer_state is not None:
                torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
            if adapter:
                (tmp / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing of ours
    if world.size == 1 and cache is not None:
        if moments is not None:
            cache.put(out_dir, OPTIMIZER_DIR, moments, hand_over=hand_over)
        if not adapter and not getattr(model, "is_gradient_checkpointing", False):
            cache.put(out_dir, f"model:{next(model.parameters()).dtype}", (model, tokenizer), hand_over=hand_over)
    barrier()  # no rank goes on (or exits) before the checkpoint is in place
    return Path(out_dir)
