"""Rollout backends: sample a group of G completions per prompt, with the sampler's own log-probs.

Every backend returns the same thing, so the generate stage writes the same Parquet columns whichever ran:

    backend = make_backend("hf", model_dir)           # or "vllm"; see select_backend for "auto"
    groups = backend.generate(prompts, SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_new_tokens=48), seeds)
    groups[i].prompt_token_ids, groups[i].completions[j].token_ids / .logprobs / .text / .finish_reason
    backend.close()

temperature 0 means greedy (n must be 1).
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from grpo.registry import Registry


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


BACKENDS: Registry[Callable[..., Backend]] = Registry("rollout backend")


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


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def select_backend(requested: str) -> str:
    """'auto' -> vllm when vLLM is installed and a CUDA GPU is present, else hf."""
    if requested != "auto":
        return requested
    return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"


def make_backend(name: str, model_dir: str, **options) -> Backend:
    if name == "vllm":
        import grpo.backends.vllm_backend  # noqa: F401  (registers "vllm"; imports vllm)
    return BACKENDS.get(name)(model_dir, **options)


@BACKENDS.register("hf")
class HFBackend:
    """transformers `generate`. Prompts are generated `prompts_per_batch` at a time (n samples each); the
    RNG is seeded from the first prompt's seed of each batch, so a rerun with the same batches is
    identical."""

    name = "hf"

    def __init__(self, model_dir: str, *, model=None, tokenizer=None, prompts_per_batch: int = 8,
                 dtype: str = "bfloat16"):
        from grpo.models import load_checkpoint

        if model is None:
            model, tokenizer = load_checkpoint(model_dir)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "left"
        self.prompts_per_batch = prompts_per_batch
        self.autocast_dtype = getattr(torch, dtype) if dtype != "float32" else None

    def generate(self, prompts, sampling, seeds, progress=True):
        from tqdm.auto import tqdm

        tok = self.tokenizer
        eos_ids = stop_token_ids(self.model.generation_config.eos_token_id, tok)
        groups: list[Group] = []
        bar = tqdm(total=len(prompts), desc=f"generate (hf, n={sampling.n})", unit="prompt", disable=not progress)
        for start in range(0, len(prompts), self.prompts_per_batch):
            batch = list(prompts[start : start + self.prompts_per_batch])
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            greedy = sampling.temperature == 0
            kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens,
                          num_return_sequences=sampling.n, output_scores=True, return_dict_in_generate=True,
                          pad_token_id=tok.pad_token_id, eos_token_id=eos_ids)
            if not greedy:
                kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            torch.manual_seed(seeds[start])
            with torch.no_grad(), torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self._autocast()):
                out = self.model.generate(**enc, **kwargs)
            new_tokens = out.sequences[:, enc["input_ids"].shape[1]:]
            # scores are the processed (tempered, top-p filtered) logits the sampler drew from
            step_logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
            token_logp = step_logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
            for i, prompt_ids in enumerate(enc["input_ids"]):
                prompt_ids = prompt_ids[enc["attention_mask"][i].bool()].tolist()
                group = Group(prompt_token_ids=prompt_ids)
                for j in range(sampling.n):
                    row = i * sampling.n + j
                    ids, logps, finish = _trim(new_tokens[row].tolist(), token_logp[row].tolist(), eos_ids)
                    group.completions.append(Completion(text=tok.decode(ids, skip_special_tokens=True),
                                                        token_ids=ids, logprobs=[0.0] * len(ids) if greedy else logps,
                                                        finish_reason=finish))
                groups.append(group)
            bar.update(len(batch))
        bar.close()
        return groups

    def _autocast(self) -> bool:
        return self.autocast_dtype is not None and next(self.model.parameters()).device.type == "cpu"

    def close(self) -> None:
        pass


def stop_token_ids(config_eos: int | list[int] | None, tokenizer) -> list[int]:
    """The tokens that end a completion, for every backend: the generation config's eos_token_id (an int or a
    list) plus the tokenizer's EOS."""
    ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _trim(ids: list[int], logps: list[float], eos_ids: list[int]) -> tuple[list[int], list[float], str]:
    """Cut at the first EOS (kept, as vLLM keeps it in token_ids) and drop the padding after it."""
    for t, token in enumerate(ids):
        if token in eos_ids:
            return ids[: t + 1], logps[: t + 1], "stop"
    return ids, logps, "length"
