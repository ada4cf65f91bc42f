"""What every rollout backend takes and returns, and the helpers they share (no backend is imported here).

    SamplingSpec(n, temperature, top_p, max_new_tokens)    temperature 0 means greedy (n must be 1)
    Backend.generate(prompts, spec, seeds) -> list[Group]   one Group per prompt, n Completions each
    stop_token_ids(config_eos, tokenizer)                   the tokens that end a completion, for every backend
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class SamplingSpec:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int

    def __post_init__(self):
        if self.temperature == 0 and self.n != 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one completion per prompt, not n={self.n}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # the sampler's log-prob of each sampled token (0.0 under greedy)
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)


@dataclass
class Group:
    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)


class Backend(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], sampling: SamplingSpec, seeds: Sequence[int],
                 progress: bool = True) -> list[Group]: ...

    def close(self) -> None: ...


def stop_token_ids(config_eos: int | list[int] | None, tokenizer) -> list[int]:
    """The tokens that end a completion, for every backend: the generation config's eos_token_id (an int or a
    list) plus the tokenizer's EOS."""
    ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def trim_at_eos(ids: list[int], logps: list[float], eos_ids: list[int]) -> tuple[list[int], list[float], str]:
    """Cut at the first EOS (kept, as vLLM keeps it in token_ids) and drop the padding after it."""
    for t, token in enumerate(ids):
        if token in eos_ids:
            return ids[: t + 1], logps[: t + 1], "stop"
    return ids, logps, "length"
