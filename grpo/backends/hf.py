"""transformers rollout backend: `model.generate`, prompts batched, the RNG seeded per batch.

    backend = make_backend("hf", model_dir, prompts_per_batch=8, dtype="bfloat16")
    groups = backend.generate(prompts, SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_new_tokens=48), seeds)

The model runs on its own device (a loaded one: CUDA when visible, else the CPU), under autocast of that
device type. The sampler's log-prob of each sampled token is gathered one generation step at a time
(SampledLogprobs), so no [B*n, T, V] tensor of scores or log-probs is ever kept.
"""

from __future__ import annotations

from typing import Optional

import torch

from grpo.backends.base import Completion, Group, stop_token_ids, trim_at_eos


class SampledLogprobs:
    """A logits processor, last in generate's list, that records log pi_sampler(o_t) of every sampled token:

        log pi_sampler(o_t) = log_softmax(scores_t)[o_t]     scores_t: the processed (tempered, top-p) logits

    At step t it keeps log_softmax(scores_t) [B, V]; o_t is known at step t + 1 (the last column of input_ids)
    or, for the last step, from the output sequences (finish). One [B, V] float32 tensor at a time."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []  # [B] per step
        self._pending: Optional[torch.Tensor] = None  # log_softmax of the last step's scores, [B, V]

    def _gather(self, tokens: torch.Tensor) -> None:
        if self._pending is not None:
            self.steps.append(self._pending.gather(-1, tokens[:, None]).squeeze(-1))
            self._pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._gather(input_ids[:, -1])  # o_{t-1}, sampled from the previous step's scores
        self._pending = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of the T sampled tokens, given generate's output sequences."""
        self._gather(sequences[:, -1])
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros(sequences.shape[0], 0).float()


def _sampling_processors(temperature: float, top_p: float) -> list:
    """generate's own sampling warpers, in generate's order (temperature, then top-p), passed explicitly so that
    SampledLogprobs can come after them: generate puts a caller's processors before its own warpers."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    processors = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
    return processors


class HFBackend:
    """transformers `generate`. Prompts are generated `prompts_per_batch` at a time (n samples each); the
    RNG is seeded from the first prompt's seed of each batch, so a rerun with the same batches is
    identical."""

    name = "hf"

    def __init__(self, model_dir: str, *, model=None, tokenizer=None, prompts_per_batch: int = 8,
                 dtype: str = "bfloat16", device: str = "auto"):
        """A given `model` stays on its device; one loaded from `model_dir` goes to `device` (auto: CUDA when
        visible, else the CPU)."""
        from grpo.models import load_checkpoint, resolve_device

        if model is None:
            model, tokenizer = load_checkpoint(model_dir)
            model = model.to(resolve_device(device))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "left"
        self.prompts_per_batch = prompts_per_batch
        self.autocast_dtype = getattr(torch, dtype) if dtype != "float32" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts, sampling, seeds, progress=True):
        from tqdm.auto import tqdm
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        eos_ids = stop_token_ids(self.model.generation_config.eos_token_id, tok)
        device = self.device
        groups: list[Group] = []
        bar = tqdm(total=len(prompts), desc=f"generate (hf, n={sampling.n})", unit="prompt", disable=not progress)
        for start in range(0, len(prompts), self.prompts_per_batch):
            batch = list(prompts[start : start + self.prompts_per_batch])
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            greedy = sampling.temperature == 0
            recorder = None if greedy else SampledLogprobs()
            kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens,
                          num_return_sequences=sampling.n, pad_token_id=tok.pad_token_id, eos_token_id=eos_ids)
            if not greedy:
                # temperature and top-p as explicit warpers before the recorder; generate's own are switched off
                processors = _sampling_processors(sampling.temperature, sampling.top_p) + [recorder]
                kwargs.update(temperature=1.0, top_p=1.0, top_k=0, logits_processor=LogitsProcessorList(processors))
            torch.manual_seed(seeds[start])
            with torch.no_grad(), torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                                 enabled=self.autocast_dtype is not None):
                sequences = self.model.generate(**enc, **kwargs)
            new_tokens = sequences[:, enc["input_ids"].shape[1]:]
            token_logp = None if greedy else recorder.finish(sequences).tolist()
            input_ids, attention = enc["input_ids"].tolist(), enc["attention_mask"].tolist()
            for i, (prompt_ids, prompt_mask) in enumerate(zip(input_ids, attention)):
                group = Group(prompt_token_ids=[t for t, m in zip(prompt_ids, prompt_mask) if m])
                for j in range(sampling.n):
                    row = i * sampling.n + j
                    ids = new_tokens[row].tolist()
                    logps = [0.0] * len(ids) if greedy else token_logp[row]
                    ids, logps, finish = trim_at_eos(ids, logps, eos_ids)
                    group.completions.append(Completion(text=tok.decode(ids, skip_special_tokens=True),
                                                        token_ids=ids, logprobs=logps, finish_reason=finish))
                groups.append(group)
            bar.update(len(batch))
        bar.close()
        return groups

    def close(self) -> None:
        pass
