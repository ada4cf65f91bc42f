"""GRPO as a library: pure functions on tensors, variants in registries, no orchestration (nothing here imports
pipeline/ or flows/).

    from grpo import group_advantages, kl_divergence, policy_loss, token_logprobs

    algorithm/      the update: group advantages, KL estimators, the clipped loss, token log-probs, shared-prefix
                    packing, the trainer loop, the TRL-named metrics
    environments/   what a model learns in: dataset prompts and their answer verifiers, the Python interpreter
                    and its sandbox (code tasks), reasoning-gym; scoring runs their rewards over a table
    models/         loading a model source, checkpoint folders (weights, DCP optimizer state), LoRA, atomic
                    writes, the in-memory checkpoint cache a worker holds
    backends/       rollout backends: transformers' sampling loop, vLLM, data-parallel replicas
    config.py       params.yaml as frozen dataclasses, one per section; contracts.py the Parquet schemas between
                    stages; distributed.py torchrun and FSDP2; errors.py, registry.py, variants.py

The names below are loaded on first use (PEP 562), so that importing one module of the package (as every
pipeline stage does) does not import them all: each DVC stage depends on exactly the modules it runs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ADVANTAGE_SCALES": "grpo.algorithm.advantages",
    "group_advantages": "grpo.algorithm.advantages",
    "group_stats": "grpo.algorithm.advantages",
    "KL_ESTIMATORS": "grpo.algorithm.kl",
    "kl_divergence": "grpo.algorithm.kl",
    "token_entropy": "grpo.algorithm.logprobs",
    "token_logprobs": "grpo.algorithm.logprobs",
    "IMPORTANCE_LEVELS": "grpo.algorithm.loss",
    "LOSS_AGGREGATIONS": "grpo.algorithm.loss",
    "policy_loss": "grpo.algorithm.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
