"""transformers rollout backend: `model.generate`, prompts batched, the RNG seeded per batch.

    backend = make_backend("hf", model_dir, prompts_per_batch=8, dtype="bfloat16")
    groups = backend.generate(prompts, SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_new_tokens=48), seeds)
"""

from __future__ import annotations

import torch

from grpo.backends.base import Completion, Group, stop_token_ids, trim_at_eos


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
                    ids, logps, finish = trim_at_eos(new_tokens[row].tolist(), token_logp[row].tolist(), eos_ids)
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
