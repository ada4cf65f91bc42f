"""The models an update trains against: the policy (float32 weights, trained) and the frozen reference (no
gradients; bf16 when optim.bf16, else float32), each on this rank's device, sharded over the ranks when there are
several (grpo.distributed.shard_model).

    policy, reference, tokenizer, base = load_update_models(policy_dir, reference_dir, lora=params.model.lora,
                                                            optim=params.optim, beta=params.loss.beta, world=world)

Full fine-tuning: checkpoint k-1's weights, all trained; the reference is loaded from reference_dir (None when
beta is 0). LoRA: the base with checkpoint k-1's adapter, or, from the base itself, a new adapter; only the
adapter trains, and the reference is the policy with its adapter switched off (the base, not loaded twice).
`base` is the base model's folder with LoRA, else None.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpo.config import LoraSettings, OptimConfig
from grpo.distributed import World, shard_model
from grpo.errors import ConfigError, InputError
from grpo.models.cache import CheckpointCache
from grpo.models.loading import checkpoint_info, load_checkpoint, use_fast_attention
from grpo.models.lora import ReferenceView, add_adapter, base_dir, is_adapter_dir, load_adapter


def load_policy(policy_dir: str | Path, lora: LoraSettings | None, cache: CheckpointCache | None = None):
    """(policy, tokenizer, base folder or None): the model to train, as loaded (not yet on a device or sharded)."""
    adapter = is_adapter_dir(policy_dir)
    if lora is None and adapter:
        raise ConfigError(f"model.lora is null but {policy_dir} is a LoRA adapter checkpoint; set model.lora as "
                          "in the run that wrote it, or start again from data/checkpoints/0")
    if lora is None:
        policy, tokenizer = load_checkpoint(policy_dir, to_train=True, cache=cache)
        return policy, tokenizer, None
    if adapter:
        base = base_dir(policy_dir, checkpoint_info(policy_dir))
        model, tokenizer = load_checkpoint(base, cache=cache)
        return load_adapter(model, policy_dir, trainable=True), tokenizer, base
    base, tokenizer = load_checkpoint(policy_dir, cache=cache)
    return add_adapter(base, lora), tokenizer, Path(policy_dir).resolve()


def load_update_models(policy_dir: str | Path, reference_dir: str | Path, *, lora: LoraSettings | None,
                       optim: OptimConfig, beta: float, world: World, cache: CheckpointCache | None = None):
    """(policy, reference or None, tokenizer, base folder or None): see the module docstring."""
    policy, tokenizer, base = load_policy(policy_dir, lora, cache)
    if optim.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_fast_attention(policy, world.device)
    policy = shard_model(policy.train(), world)
    reference = None
    if beta != 0.0 and base is not None:
        if base != Path(reference_dir).resolve():
            raise InputError(f"LoRA: the reference {reference_dir} is not the base of {policy_dir} ({base}); "
                             "with LoRA the KL reference is the base model (the adapter switched off)")
        reference = ReferenceView(policy)
    elif beta != 0.0:
        reference, _ = load_checkpoint(reference_dir, dtype=torch.bfloat16 if optim.bf16 else torch.float32,
                                       cache=cache)
        use_fast_attention(reference, world.device)
        reference = shard_model(reference.eval().requires_grad_(False), world)
    return policy, reference, tokenizer, base
