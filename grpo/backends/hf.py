"""transformers rollout backend: a sampling loop over the model's KV cache, prompts batched, the RNG seeded per
batch.

    backend = make_backend("hf", model_dir, prompts_per_batch=8, dtype="bfloat16")
    groups = backend.generate(prompts, SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_new_tokens=48), seeds)

Not `model.generate`, for two reasons that make it ~2x faster on the default workload: each prompt's prefill runs
once and its KV cache is repeated for its n samples (generate repeats the prompt n times before the prefill),
and on the CPU a finished sequence leaves the batch (generate keeps computing it until the longest one ends; on
a GPU so does this loop, see `sample`). Each step
samples from the processed logits (temperature, then top-p, transformers' own warpers) and records
log pi_sampler(o_t) = log_softmax(scores_t)[o_t], one [rows, V] tensor at a time.

The model runs on its own device (a loaded one: CUDA when visible, else the CPU), under autocast of that
device type.
"""

from __future__ import annotations

from typing import Optional

import torch

from grpo.backends.base import Completion, Group, stop_token_ids, trim_at_eos


def _sampling_processors(temperature: float, top_p: float) -> list:
    """transformers' sampling warpers in generate's order: temperature, then top-p."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    processors = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
    return processors


def _inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [rows, V]: the first whose cumulative probability exceeds u * total, u ~ U[0, 1).
    One uniform number per row (torch.multinomial draws an exponential per vocabulary entry: on the CPU one of
    the sampling loop's largest costs at V = 49152)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling, eos_ids: list[int],
           pad_id: int, compact: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """n completions of each left-padded prompt: token ids [B * n, max_new_tokens] (pad after a sequence's EOS)
    and their sampler log-probs (None when greedy). Rows b * n .. b * n + n - 1 belong to prompt b. The caller
    seeds torch's RNG and sets autocast / no_grad.

    `compact`: a finished sequence leaves the batch and its keys and values the cache (the CPU, where every row
    costs compute); else it stays in the batch, fed padding, until all have finished (a GPU, where a step's time
    hardly depends on the rows and selecting them copies the whole cache and waits for the device each step)."""
    from transformers import DynamicCache

    device, n, steps = input_ids.device, sampling.n, sampling.max_new_tokens
    greedy = sampling.temperature == 0
    processors = [] if greedy else _sampling_processors(sampling.temperature, sampling.top_p)
    eos = torch.tensor(eos_ids, device=device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    # prefill each prompt once, then give each of its n samples a copy of its keys and values
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, 0)
    attention_mask = attention_mask.repeat_interleave(n, 0)
    position = positions[:, -1:].repeat_interleave(n, 0) + 1
    rows = torch.arange(logits.shape[0], device=device)  # the output row of each sequence in the batch
    tokens = torch.full((logits.shape[0], steps), pad_id, dtype=torch.long, device=device)
    logprobs = None if greedy else torch.zeros(tokens.shape, dtype=torch.float32, device=device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)  # not compact: rows past their EOS
    for t in range(steps):
        scores = logits.float()
        for processor in processors:
            scores = processor(tokens[rows, :t], scores)
        if greedy:
            chosen = scores.argmax(-1)
        else:
            logp = torch.log_softmax(scores, -1)
            chosen = _inverse_cdf_sample(logp.exp())
            logprobs[rows, t] = logp.gather(-1, chosen[:, None]).squeeze(-1).masked_fill(done, 0.0)
        chosen = chosen.masked_fill(done, pad_id)
        tokens[rows, t] = chosen
        finished = torch.isin(chosen, eos)
        if not compact:
            done |= finished
            if t == steps - 1 or bool(done.all()):  # one wait for the device a step, as generate's
                break
        else:
            running = ~finished
            if t == steps - 1 or not running.any():
                break
            if not running.all():  # finished sequences leave the batch, and their keys and values the cache
                keep = running.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, chosen, attention_mask = rows[keep], chosen[keep], attention_mask[keep]
                position, done = position[keep], done[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        out = model(input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=position,
                    past_key_values=cache, use_cache=True)
        logits, position = out.logits[:, -1], position + 1
    return tokens, logprobs


class HFBackend:
    """transformers models, sampled by `sample`. Prompts are generated `prompts_per_batch` at a time (n samples
    each); the RNG is seeded from the first prompt's seed of each batch, so a rerun with the same batches is
    identical."""

    name = "hf"

    def __init__(self, model_dir: str, *, model=None, tokenizer=None, prompts_per_batch: int = 8,
                 dtype: str = "bfloat16", device: str = "auto", cache=None, compact: bool | None = None):
        """A given `model` stays on its device; one loaded from `model_dir` (from `cache`, a worker's
        grpo.models.cache.CheckpointCache, when it holds the folder) goes to `device` (auto: CUDA when visible,
        else the CPU). `compact`: see `sample`; None: on the CPU only."""
        from grpo.models.loading import load_checkpoint, resolve_device, use_fast_attention

        if model is None:
            model, tokenizer = load_checkpoint(model_dir, cache=cache)
            target = resolve_device(device)
            model = use_fast_attention(model.to(target), target)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "left"
        self.prompts_per_batch = prompts_per_batch
        self.compact = compact
        self.autocast_dtype = getattr(torch, dtype) if dtype != "float32" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts, sampling, seeds, progress=True):
        from tqdm.auto import tqdm

        tok = self.tokenizer
        eos_ids = stop_token_ids(self.model.generation_config.eos_token_id, tok)
        device = self.device
        groups: list[Group] = []
        bar = tqdm(total=len(prompts), desc=f"generate (hf, n={sampling.n})", unit="prompt", disable=not progress)
        for start in range(0, len(prompts), self.prompts_per_batch):
            batch = list(prompts[start : start + self.prompts_per_batch])
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seeds[start])
            with torch.no_grad(), torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                                 enabled=self.autocast_dtype is not None):
                new_tokens, token_logp = sample(self.model, enc["input_ids"], enc["attention_mask"], sampling,
                                                eos_ids, tok.pad_token_id,
                                                compact=device.type == "cpu" if self.compact is None else self.compact)
            new_tokens = new_tokens.tolist()
            token_logp = None if token_logp is None else token_logp.tolist()
            input_ids, attention = enc["input_ids"].tolist(), enc["attention_mask"].tolist()
            for i, (prompt_ids, prompt_mask) in enumerate(zip(input_ids, attention)):
                group = Group(prompt_token_ids=[t for t, m in zip(prompt_ids, prompt_mask) if m])
                for j in range(sampling.n):
                    row = i * sampling.n + j
                    ids = new_tokens[row]
                    logps = [0.0] * len(ids) if token_logp is None else token_logp[row]
                    ids, logps, finish = trim_at_eos(ids, logps, eos_ids)
                    group.completions.append(Completion(text=tok.decode(ids, skip_special_tokens=True),
                                                        token_ids=ids, logprobs=logps, finish_reason=finish))
                groups.append(group)
            bar.update(len(batch))
        bar.close()
        return groups

    def close(self) -> None:
        pass
