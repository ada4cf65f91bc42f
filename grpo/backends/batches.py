"""What a rollout samples from: each iteration's prompt batch and each prompt's sampling seed.

The backends that do the sampling are in grpo/backends/ (make_backend, SamplingSpec).
"""

from __future__ import annotations

import hashlib
import random


def request_seed(seed: int, iteration: int, prompt_id: str) -> int:
    """Per-prompt sampling seed derived from (seed, iteration, prompt_id), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}/{iteration}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def iteration_batch(prompt_ids: list[str], seed: int, iteration: int, size: int) -> list[str]:
    """Iteration k's prompts: consecutive slices of one seeded permutation (epochs of the train split), so
    the batch depends only on (seed, k) and no prompt repeats before every prompt has been used."""
    order = sorted(prompt_ids)
    random.Random(f"{seed}/prompt-order").shuffle(order)
    start = (iteration - 1) * size
    return [order[(start + i) % len(order)] for i in range(size)]
