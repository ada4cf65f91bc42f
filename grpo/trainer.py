"""One GRPO policy update on a batch of scored, advantaged rollouts (no I/O, no orchestration).

    for epoch in 1..mu:                               mu = optim.epochs
        for minibatch (optim.minibatch_size completions, shuffled by a seeded RNG):
            for micro-batch (gradient accumulation):
                logp = log pi_theta(o_t | q, o_<t)   (bf16 autocast on CPU)
                loss = grpo.policy_loss(logp, logp_old, A, mask, ref_logprobs=logp_ref, ...)
            clip_grad_norm; AdamW step          (stop, no step, if the loss or a gradient is not finite)

logp_old is logp detached when the batch is one optimizer step (mu = 1 and one minibatch: TRL's
num_iterations=1 with steps_per_generation=1); otherwise it is computed once, before the first step, and
kept, so the clip bounds every later step to the policy that sampled (without it the ratio would stay 1
and nothing would limit how far the minibatches after the first move the policy). logp_ref comes from the
frozen reference model (the base), computed once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from grpo.errors import NonFiniteError
from grpo.logprobs import token_entropy, token_logprobs
from grpo.loss import policy_loss

# Which unit a micro-batch's share of the minibatch loss is counted in, per aggregation: the losses are
# means over sequences, or (token_mean) over tokens; weighting each micro-batch by its share makes the
# accumulated gradient that of the whole minibatch.
AGGREGATION_UNIT = {"seq_mean_token_mean": "sequence", "token_mean": "token", "seq_mean_token_sum_norm": "sequence"}


@dataclass
class Batch:
    """Completions padded into one rectangle: [pad.. prompt | completion ..pad], so every completion
    starts at column `prompt_width` and its logits are the last completion_width + 1 positions."""

    input_ids: torch.Tensor  # [B, P + L]
    attention_mask: torch.Tensor  # [B, P + L]
    position_ids: torch.Tensor  # [B, P + L]
    completion_ids: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L] float
    prompt_width: int


def collate(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int) -> Batch:
    p = max(len(x) for x in prompt_ids)
    l = max(max(len(x) for x in completion_ids), 1)
    b = len(prompt_ids)
    input_ids = torch.full((b, p + l), pad_id, dtype=torch.long)
    attention = torch.zeros((b, p + l), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, p - len(prompt) : p] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, p : p + len(completion)] = torch.tensor(completion, dtype=torch.long)
        attention[i, p - len(prompt) : p + len(completion)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids, attention, position_ids, input_ids[:, p:], attention[:, p:].float(), p)


def completion_logprobs(model, batch: Batch, *, temperature: float, autocast: bool,
                        with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(o_t | q, o_<t) for every completion token, [B, L] float32 (and the entropy, no grad)."""
    width = batch.completion_ids.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=width + 1, use_cache=False)
    logits = out.logits[:, :-1]  # position t predicts token t + 1
    logp = token_logprobs(logits, batch.completion_ids, temperature=temperature)
    entropy = token_entropy(logits, temperature=temperature) if with_entropy else None
    return logp, entropy


@dataclass
class UpdateConfig:
    epochs: int
    minibatch_size: int
    micro_batch_size: int
    max_grad_norm: float
    temperature: float
    autocast: bool
    seed: int
    loss_kwargs: dict  # beta, clip_low, clip_high, kl_estimator, aggregation, importance, max_completion_tokens
    tis_cap: Optional[float] = None  # truncated importance sampling cap C (None = off)
    learning_rate: float = 1e-5
    warmup_steps: int = 0  # linear warm-up over the first optimizer steps of the whole run
    start_step: int = 0  # optimizer steps taken by earlier iterations (the schedule continues across them)

    def lr_at(self, step: int) -> float:
        """Learning rate of global optimizer step `step` (0-based): linear warm-up, then constant.
        Adam's first steps move every weight by ~lr whatever its gradient; warm-up keeps them small."""
        if self.warmup_steps <= 0:
            return self.learning_rate
        return self.learning_rate * min(1.0, (step + 1) / self.warmup_steps)


def _weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1e-12)


def grpo_update(policy, reference, optimizer, prompt_ids, completion_ids, advantages: torch.Tensor,
                sampler_logprobs: Optional[Sequence[Sequence[float]]], pad_id: int, cfg: UpdateConfig,
                progress: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """Run mu epochs of minibatch updates; returns TRL-named metrics averaged over optimizer steps."""
    n = len(prompt_ids)
    micro_batches = [list(range(i, min(i + cfg.micro_batch_size, n))) for i in range(0, n, cfg.micro_batch_size)]
    loss_kwargs = dict(cfg.loss_kwargs)
    aggregation_unit = AGGREGATION_UNIT[loss_kwargs.get("aggregation", "seq_mean_token_mean")]

    def batch_of(idx: list[int]) -> Batch:
        return collate([prompt_ids[i] for i in idx], [completion_ids[i] for i in idx], pad_id)

    # Fixed per-completion quantities, computed once before the first epoch.
    ref_logp: dict[int, torch.Tensor] = {}
    old_logp: dict[int, torch.Tensor] = {}
    need_ref = loss_kwargs.get("beta", 0.0) != 0.0 and reference is not None
    one_step = cfg.epochs == 1 and n <= cfg.minibatch_size
    need_old = not one_step or sampler_logprobs is not None
    if need_ref or need_old:
        with torch.no_grad():
            for idx in micro_batches:
                batch = batch_of(idx)
                if need_ref:
                    lp, _ = completion_logprobs(reference, batch, temperature=cfg.temperature, autocast=cfg.autocast)
                    ref_logp.update({i: lp[k, : len(completion_ids[i])] for k, i in enumerate(idx)})
                if need_old:
                    lp, _ = completion_logprobs(policy, batch, temperature=cfg.temperature, autocast=cfg.autocast)
                    old_logp.update({i: lp[k, : len(completion_ids[i])] for k, i in enumerate(idx)})

    def padded(store: dict[int, torch.Tensor], idx: list[int], width: int) -> torch.Tensor:
        out = torch.zeros(len(idx), width)
        for k, i in enumerate(idx):
            out[k, : len(store[i])] = store[i]
        return out

    metrics: dict[str, list[float]] = {}

    def record(name: str, value: float, weight: float = 1.0):
        metrics.setdefault(name, []).append((value, weight))

    # Sampler / trainer mismatch: how far the trainer's log-probs of the sampled tokens are from the sampler's.
    tis_weights: dict[int, torch.Tensor] = {}
    if sampler_logprobs is not None:
        diffs = torch.cat([(old_logp[i] - torch.tensor(sampler_logprobs[i], dtype=torch.float32)).abs() for i in range(n)])
        record("sampling/logp_diff_mean", float(diffs.mean()) if diffs.numel() else 0.0)
        record("sampling/logp_diff_max", float(diffs.max()) if diffs.numel() else 0.0)
        if cfg.tis_cap is not None:
            # truncated importance sampling: w_t = min(pi_old(o_t) / pi_sampler(o_t), C)
            for i in range(n):
                tis_weights[i] = torch.exp(old_logp[i] - torch.tensor(sampler_logprobs[i])).clamp(max=cfg.tis_cap)
            all_w = torch.cat(list(tis_weights.values()))
            record("sampling/is_weight_min", float(all_w.min()))
            record("sampling/is_weight_mean", float(all_w.mean()))
            record("sampling/is_weight_max", float(all_w.max()))

    rng = random.Random(cfg.seed)
    step = 0
    for epoch in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, cfg.minibatch_size):
            minibatch = order[start : start + cfg.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            total_tokens = sum(max(len(completion_ids[i]), 1) for i in minibatch)
            step_stats: list[tuple[dict, float]] = []
            for m in range(0, len(minibatch), cfg.micro_batch_size):
                idx = minibatch[m : m + cfg.micro_batch_size]
                batch = batch_of(idx)
                width = batch.completion_ids.shape[1]
                logp, entropy = completion_logprobs(policy, batch, temperature=cfg.temperature,
                                                    autocast=cfg.autocast, with_entropy=True)
                old = logp.detach() if one_step else padded(old_logp, idx, width)
                ref = padded(ref_logp, idx, width) if need_ref else None
                mask = batch.completion_mask
                if tis_weights:
                    # the per-token IS weight multiplies the mask: it scales each token's loss and gradient
                    mask = mask * padded(tis_weights, idx, width)
                loss, stats = policy_loss(logp, old, advantages[idx].float(), mask, ref_logprobs=ref, **loss_kwargs)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"loss is {float(loss)} at epoch {epoch + 1}, step {step + 1}")
                share = (len(idx) / len(minibatch) if aggregation_unit == "sequence"
                         else float(batch.completion_mask.sum()) / total_tokens)
                (loss * share).backward()
                stats["entropy"] = float((entropy * batch.completion_mask).sum() / batch.completion_mask.sum().clamp(min=1))
                step_stats.append((stats, share))
                progress(len(idx))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise NonFiniteError(f"gradient norm is {grad_norm} at epoch {epoch + 1}, step {step + 1}")
            lr = cfg.lr_at(cfg.start_step + step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            step += 1
            for name in ("loss", "kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio", "ratio_mean"):
                record(name, _weighted_mean([s[name] for s, _ in step_stats], [w for _, w in step_stats]))
            record("grad_norm", grad_norm)
            record("learning_rate", lr)

    out = {name: _weighted_mean([v for v, _ in vals], [w for _, w in vals]) for name, vals in metrics.items()}
    # TRL's names for the clip statistics
    for ours, trl in (("clip_ratio_low", "clip_ratio/low_mean"), ("clip_ratio_high", "clip_ratio/high_mean"),
                      ("clip_ratio", "clip_ratio/region_mean")):
        out[trl] = out.pop(ours)
    out["optimizer_steps"] = step
    return out
