"""One GRPO policy update on a batch of scored, advantaged rollouts (no I/O, no orchestration).

Read top to bottom:

    precompute(...)        once, before the first step: log pi_ref (the frozen reference), log pi_old (the
                           policy that sampled, as the trainer computes it), the sampler/trainer mismatch and
                           the TIS weights min(pi_old / pi_sampler, C)
    optimizer_step(...)    one minibatch: for each micro-batch, logp = log pi_theta(o_t | q, o_<t) and
                           grpo.policy_loss(...) normalised by the minibatch's own count (sequences or tokens),
                           backward; then clip_grad_norm and an AdamW step (none if the loss or a gradient is
                           not finite)
    grpo_update(...)       mu = optim.epochs passes, each over minibatches of a seeded shuffle (of whole
                           groups, or of completions: optim.shuffle)

Every forward pass packs its micro-batch with grpo.algorithm.packing.pack: each distinct prompt computed once, its
completions after it; the micro-batches take a minibatch's completions prompt by prompt.

pi_old is logp detached when the batch is one optimizer step (mu = 1 and one minibatch: TRL's
num_iterations=1 with steps_per_generation=1); otherwise it is computed once, before the first step, and
kept, so the clip bounds every later step to the policy that sampled (without it the ratio would stay 1
and nothing would limit how far the minibatches after the first move the policy).

Several ranks (torchrun, the policy sharded with FSDP2 by grpo.distributed.shard_model): every rank draws the
same shuffle, and rank r takes minibatch[r::W] of each minibatch. The loss of rank r is its share of the
minibatch's sum divided by the GLOBAL count N = sum_r N_r (all-reduced); rank r back-propagates W * loss_r and
FSDP averages the ranks' gradients (reduce-scatter mean):

    (1/W) sum_r grad( W * sum_{i,t in share r} w_it * loss_it / N ) = grad( sum_{i,t} w_it * loss_it / N )

which is the 1-process gradient, whatever the ranks' token counts. Every forward of a sharded model is a
collective, so every rank runs the same number of micro-batches: a rank whose share is shorter runs
placeholder micro-batches (one row, mask 0: no loss, no gradient). The tensors of the update live on the
device of the policy (`device`); nothing is pinned to the CPU.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from grpo.config import LossConfig, OptimConfig
from grpo.distributed import all_reduce_sum, rank, world_size
from grpo.errors import NonFiniteError
from grpo.algorithm.flops import matmul_weights, peak_flops, update_flops
from grpo.algorithm.logprobs import token_entropy, token_logprobs
from grpo.algorithm.loss import LOSS_AGGREGATIONS, policy_loss
from grpo.algorithm.packing import Batch, attention_mask_for, by_prompt, pack, prompt_adjacent

# per-step statistics averaged (token-weighted over micro-batches) into the iteration's metrics
STEP_STATS = ("loss", "kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio", "ratio_mean")


# SDPA kernels for a masked (packed) batch, cuDNN left out: it builds an execution plan for every new shape and
# mask, 7.7 ms of host time per forward call on an H200 (73% of the update's host time, the GPU idle); the
# memory-efficient kernel takes any mask with no per-shape set-up. (Flash takes no mask; the CPU runs eager.)
PACKED_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def pack_multiple(device: torch.device | str) -> int:
    """Packed rows are padded to a multiple of this many columns: on CUDA a new shape costs host work (kernel
    choice, the allocator's blocks), so shapes repeat from micro-batch to micro-batch; on the CPU padding is
    only more work."""
    return 64 if torch.device(device).type == "cuda" else 1


@contextmanager
def mixed_precision(device_type: str, enabled: bool) -> Iterator[None]:
    """bf16 autocast around every forward pass of one optimizer step (or of the log-prob passes), the fp32
    weights kept as the master copy. Autocast keeps its bf16 copy of each trained fp32 weight until its
    outermost context exits: in one context per step every weight is cast once a step, not once a micro-batch
    (those casts were 16% of the update's GPU time on an H200)."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled):
        yield


@contextmanager
def outside_autocast(device_type: str) -> Iterator[None]:
    """For a backward pass inside mixed_precision: autocast off (PyTorch's advice for backward), its cache kept
    (a nested context does not clear it)."""
    with torch.autocast(device_type, enabled=False):
        yield


def forward_logprobs(model, batch: Batch, *, temperature: float,
                     with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's log pi(o_t | q, o_<t) for every completion token, [B, L] float32 (float64 for a float64
    model), and the entropy of each next-token distribution (no grad) if asked. `batch`: grpo.algorithm.packing's
    pack (shared prompts) or collate (one row per completion). Mixed precision is the caller's
    (mixed_precision)."""
    packed = batch.attention_mask.dim() == 4
    with sdpa_kernel(PACKED_SDPA_BACKENDS) if packed else nullcontext():
        out = model(input_ids=batch.input_ids, attention_mask=attention_mask_for(model, batch),
                    position_ids=batch.position_ids, logits_to_keep=batch.logits_width, use_cache=False)
    with outside_autocast(out.logits.device.type):  # from the logits on, the precision is token_logprobs's
        # the logits that predict each completion token: [S, K, V] -> [B, L, V]
        logits = out.logits.reshape(-1, out.logits.shape[-1])[batch.logits_index]
        logp = token_logprobs(logits, batch.completion_ids, temperature=temperature)
        entropy = token_entropy(logits, temperature=temperature) if with_entropy else None
    return logp, entropy


@dataclass
class Rollouts:
    """The update's input, one entry per completion."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: torch.Tensor  # [N]
    sampler_logprobs: Optional[list[list[float]]] = None  # the sampler's log-prob of each sampled token
    in_loss: Optional[list[bool]] = None  # False: the completion's tokens are masked out of the loss

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class UpdateConfig:
    """What one update needs: params.yaml's optim and loss sections as they are, and this iteration's values.
    No defaults: every value comes from params.yaml (pipeline/update.py) or the caller."""

    optim: OptimConfig  # epochs, minibatch and micro-batch sizes, learning rate and warm-up, bf16, ...
    loss: LossConfig  # beta, clip range, KL estimator, aggregation, importance level, TIS
    temperature: float  # rollout.temperature: log-probs of the distribution that sampled
    max_completion_tokens: int  # rollout.max_new_tokens: Dr. GRPO's normaliser (seq_mean_token_sum_norm)
    seed: int  # this iteration's shuffle seed
    pad_id: int
    start_step: int  # optimizer steps taken by earlier iterations (the warm-up continues across them)

    @property
    def tis_cap(self) -> Optional[float]:
        """Truncated importance sampling's cap C, None when loss.tis is off."""
        return self.loss.tis_cap if self.loss.tis else None

    def lr_at(self, step: int) -> float:
        """Learning rate of global optimizer step `step` (0-based): linear warm-up, then constant.
        Adam's first steps move every weight by ~lr whatever its gradient; warm-up keeps them small."""
        lr, warmup = self.optim.learning_rate, self.optim.warmup_steps
        return lr if warmup <= 0 else lr * min(1.0, (step + 1) / warmup)

    def loss_settings(self) -> dict:
        """The keyword arguments of grpo.policy_loss that params.yaml sets."""
        l = self.loss
        return dict(beta=l.beta, clip_low=l.clip_low, clip_high=l.clip_high, kl_estimator=l.kl_estimator,
                    aggregation=l.aggregation, importance=l.importance, max_completion_tokens=self.max_completion_tokens)


@dataclass
class Precomputed:
    """Per-completion tensors fixed for the whole update (each [len(completion)], on the update's device)."""

    ref_logprobs: Optional[list[torch.Tensor]]
    old_logprobs: Optional[list[torch.Tensor]]
    is_weights: Optional[list[torch.Tensor]]
    metrics: dict[str, float] = field(default_factory=dict)


def _padded(rows: list[torch.Tensor], idx: list[int], width: int, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(idx), width, dtype=like.dtype, device=like.device)
    for row, i in enumerate(idx):
        out[row, : len(rows[i])] = rows[i]
    return out


def chunks(indices: list[int], size: int) -> list[list[int]]:
    """`indices` cut into consecutive pieces of `size` (the last may be shorter): minibatches, micro-batches."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def rank_micro_batches(indices: list[int], size: int, rank_index: int, num_ranks: int) -> list[list[int]]:
    """This rank's micro-batches of `indices`: its share indices[rank_index::num_ranks] cut into micro-batches of
    `size`, then empty ones (placeholders) up to the count every rank runs, ceil(ceil(len / num_ranks) / size).
    One rank: the micro-batches of `indices`, none empty."""
    micro = chunks(indices[rank_index::num_ranks], size)
    rounds = math.ceil(math.ceil(len(indices) / num_ranks) / size)
    return micro + [[] for _ in range(rounds - len(micro))]


def _pack_rows(rollouts: Rollouts, idx: list[int], cfg: UpdateConfig, device) -> Batch:
    return pack([rollouts.prompt_ids[i] for i in idx], [rollouts.completion_ids[i] for i in idx], cfg.pad_id, device,
                multiple=pack_multiple(device))


def _completion_mask(batch: Batch, rollouts: Rollouts, idx: list[int]) -> torch.Tensor:
    mask = batch.completion_mask
    if not idx:  # a placeholder micro-batch: no token counts
        return torch.zeros_like(mask)
    if rollouts.in_loss is not None:
        keep = torch.tensor([float(rollouts.in_loss[i]) for i in idx], device=mask.device)
        mask = mask * keep[:, None]
    return mask


def global_count(local: torch.Tensor) -> torch.Tensor:
    """N of the whole minibatch (sequences or tokens): each rank's count of its share, summed over ranks."""
    return all_reduce_sum(local)


def _sampled_token_logprobs(models: list, rollouts: Rollouts, cfg: UpdateConfig, device) -> list[list[torch.Tensor]]:
    """For each model, log pi(o_t | q, o_<t) of every sampled token: one [len(completion)] tensor per completion.

    Rank r computes the completions r::W into an [N, L_max] table that is zero elsewhere; the tables are summed
    over ranks (each row comes from exactly one rank, so the sum is exact) and every rank gets every row."""
    n = len(rollouts)
    width = max([1, *map(len, rollouts.completion_ids)])  # as grpo.algorithm.packing: at least one column
    tables: list[Optional[torch.Tensor]] = [None] * len(models)
    adjacent = prompt_adjacent(range(n), rollouts.prompt_ids)  # prompts shared in a pack
    with torch.no_grad(), mixed_precision(torch.device(device).type, cfg.optim.bf16):
        for idx in rank_micro_batches(adjacent, cfg.optim.micro_batch_size, rank(), world_size()):
            # a placeholder micro-batch runs row 0 and keeps nothing: the forwards of a sharded model are
            # collectives, every rank runs as many
            batch = _pack_rows(rollouts, idx or [0], cfg, device)
            for m, model in enumerate(models):
                lp, _ = forward_logprobs(model, batch, temperature=cfg.temperature)
                if tables[m] is None:
                    tables[m] = torch.zeros(n, width, dtype=lp.dtype, device=lp.device)
                tables[m][idx, : lp.shape[1]] = lp[: len(idx)]
    tables = [all_reduce_sum(table) for table in tables]
    return [[table[i, : len(c)] for i, c in enumerate(rollouts.completion_ids)] for table in tables]


def precompute(policy, reference, rollouts: Rollouts, cfg: UpdateConfig, needs_old: bool,
               device: torch.device | str = "cpu") -> Precomputed:
    """log pi_ref and log pi_old of every sampled token, the sampler mismatch and the TIS weights."""
    n = len(rollouts)
    needs_ref = reference is not None and cfg.loss.beta != 0.0
    needs_old = needs_old or rollouts.sampler_logprobs is not None
    models = ([reference] if needs_ref else []) + ([policy] if needs_old else [])
    computed = _sampled_token_logprobs(models, rollouts, cfg, device) if models else []
    ref = computed[0] if needs_ref else None
    old = computed[-1] if needs_old else None
    out = Precomputed(ref, old, None)
    if rollouts.sampler_logprobs is not None:
        # Sampler / trainer mismatch: the trainer's log-probs of the sampled tokens against the sampler's.
        sampler = [torch.tensor(rollouts.sampler_logprobs[i], dtype=old[i].dtype, device=old[i].device)
                   for i in range(n)]
        diffs = torch.cat([(old[i] - sampler[i]).abs() for i in range(n)])
        out.metrics["sampling/logp_diff_mean"] = float(diffs.mean()) if diffs.numel() else 0.0
        out.metrics["sampling/logp_diff_max"] = float(diffs.max()) if diffs.numel() else 0.0
        if cfg.tis_cap is not None:
            # truncated importance sampling: w_t = min(pi_old(o_t) / pi_sampler(o_t), C)
            out.is_weights = [torch.exp(old[i] - sampler[i]).clamp(max=cfg.tis_cap) for i in range(n)]
            weights = torch.cat(out.is_weights)
            if weights.numel():
                out.metrics.update({"sampling/is_weight_min": float(weights.min()),
                                    "sampling/is_weight_mean": float(weights.mean()),
                                    "sampling/is_weight_max": float(weights.max())})
    return out


def optimizer_step(policy, optimizer, rollouts: Rollouts, minibatch: list[int], fixed: Precomputed,
                   cfg: UpdateConfig, lr: float, *, device: torch.device | str = "cpu",
                   progress: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """Accumulate the gradient of one minibatch over its micro-batches, clip it, take one AdamW step.

    Every micro-batch's loss is normalised by the minibatch's count N (its sequences, or its tokens for
    token_mean), so the micro-batch losses, and their gradients, add up to the minibatch's exactly. With
    several ranks this rank runs its share minibatch[rank::W], N is summed over ranks (global_count) and the
    statistics are summed over ranks too, so every rank returns the step's numbers for the whole minibatch."""
    aggregation = LOSS_AGGREGATIONS.get(cfg.loss.aggregation)
    world = world_size()
    # the minibatch's completions of one prompt side by side, so that a micro-batch packs them on one prompt
    # (the minibatch's gradient is a sum over its completions: their order does not change it)
    minibatch = prompt_adjacent(minibatch, rollouts.prompt_ids)
    micro = rank_micro_batches(minibatch, cfg.optim.micro_batch_size, rank(), world)
    # a placeholder (empty) micro-batch runs the minibatch's first row with a zero mask: no loss, no gradient
    batches = [_pack_rows(rollouts, idx or minibatch[:1], cfg, device) for idx in micro]
    masks = [_completion_mask(b, rollouts, idx) for b, idx in zip(batches, micro)]
    local = sum(float(aggregation.count(m)) for m, idx in zip(masks, micro) if idx)
    num_units = float(global_count(torch.tensor(local, dtype=torch.float64, device=device)))
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {name: 0.0 for name in STEP_STATS}
    tokens = 0.0
    size = cfg.optim.micro_batch_size
    device_type = torch.device(device).type
    # each trained weight cast to bf16 once this step; the backward pass (and gradient checkpointing's recompute
    # of the forward) on the forward's attention kernels
    with mixed_precision(device_type, cfg.optim.bf16), sdpa_kernel(PACKED_SDPA_BACKENDS):
        for j, (idx, batch, mask) in enumerate(zip(micro, batches, masks)):
            rows = idx or minibatch[:1]
            width = batch.completion_ids.shape[1]
            logp, entropy = forward_logprobs(policy, batch, temperature=cfg.temperature, with_entropy=True)
            with outside_autocast(device_type):  # the loss and the backward pass in the logits' precision
                fixed_rows = [None if t is None else _padded(t, rows, width, logp)
                              for t in (fixed.old_logprobs, fixed.ref_logprobs, fixed.is_weights)]
                old, ref, weights = fixed_rows
                old = logp.detach() if old is None else old
                loss, stats = policy_loss(logp, old, rollouts.advantages[rows].to(logp), mask.to(logp),
                                          ref_logprobs=ref, is_weights=weights, num_units=num_units,
                                          **cfg.loss_settings())
                # summed over ranks: non-finite on every rank when it is on one, so that all ranks stop together
                summed = all_reduce_sum(loss.detach().clone())
                if not torch.isfinite(summed):
                    raise NonFiniteError(f"loss is {float(summed)}; lower optim.learning_rate or check the rollouts")
                # FSDP averages the ranks' gradients: (1/W) sum_r grad(W * loss_r) = sum_r grad(loss_r), the
                # 1-process gradient (each loss_r is already divided by the global N); W = 1 leaves it as it is
                (loss * world).backward()
            stats["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
            # the step's loss is the sum of its micro-batch losses; the rest are token means
            totals["loss"] += stats["loss"]
            for name in STEP_STATS[1:]:
                totals[name] += stats[name] * stats["num_tokens"]
            tokens += stats["num_tokens"]
            # completions of this round on all ranks: positions [j * size * W, (j + 1) * size * W) of the minibatch
            progress(len(minibatch[j * size * world : (j + 1) * size * world]))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm))
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"gradient norm is {grad_norm}; lower optim.learning_rate or check the rollouts")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    # the whole minibatch's statistics: sums over ranks
    summed = all_reduce_sum(torch.tensor([totals[name] for name in STEP_STATS] + [tokens], dtype=torch.float64,
                                         device=device)).tolist()
    totals, tokens = dict(zip(STEP_STATS, summed[:-1])), summed[-1]
    step = {name: totals[name] / max(tokens, 1.0) for name in STEP_STATS[1:]}
    step.update(loss=totals["loss"], grad_norm=grad_norm, learning_rate=lr)
    return step


@dataclass
class UpdateResult:
    metrics: dict[str, float]  # TRL-named, averaged over optimizer steps
    steps: list[dict[str, float]]  # one entry per optimizer step, in order


def grpo_update(policy, reference, optimizer, rollouts: Rollouts, cfg: UpdateConfig, *,
                device: torch.device | str = "cpu", progress: Callable[[int], None] = lambda n: None) -> UpdateResult:
    """mu epochs of minibatch updates over `rollouts`; the optimizer's state carries the run's history."""
    n = len(rollouts)
    o = cfg.optim
    one_step = o.epochs == 1 and n <= o.minibatch_size
    began = time.perf_counter()
    fixed = precompute(policy, reference, rollouts, cfg, needs_old=not one_step, device=device)
    logprob_seconds = time.perf_counter() - began
    forward_passes = sum(t is not None for t in (fixed.ref_logprobs, fixed.old_logprobs))  # for the FLOPs
    if one_step:
        fixed.old_logprobs = None  # pi_old = pi_theta detached (the same weights, no second forward)
    rng = random.Random(cfg.seed)
    steps: list[dict[str, float]] = []
    for _ in range(o.epochs):
        if o.shuffle == "groups":  # verl: minibatches of whole groups
            groups = by_prompt(range(n), rollouts.prompt_ids)
            rng.shuffle(groups)
            order = [i for group in groups for i in group]
        else:  # TRL: minibatches of completions from any group
            order = list(range(n))
            rng.shuffle(order)
        for minibatch in chunks(order, o.minibatch_size):
            lr = cfg.lr_at(cfg.start_step + len(steps))
            try:
                steps.append(optimizer_step(policy, optimizer, rollouts, minibatch, fixed, cfg, lr, device=device,
                                            progress=progress))
            except NonFiniteError as e:
                raise NonFiniteError(f"update step {len(steps) + 1}: {e}") from None
    metrics = {name: sum(s[name] for s in steps) / max(len(steps), 1) for name in steps[0]} if steps else {}
    metrics.update(fixed.metrics)
    # TRL's names for the clip statistics
    for ours, trl in (("clip_ratio_low", "clip_ratio/low_mean"), ("clip_ratio_high", "clip_ratio/high_mean"),
                      ("clip_ratio", "clip_ratio/region_mean")):
        if ours in metrics:
            metrics[trl] = metrics.pop(ours)
    metrics["optimizer_steps"] = len(steps)
    # where the time went: the reference / pi_old log-prob passes, then the optimizer steps (forward, backward, AdamW)
    seconds = time.perf_counter() - began
    metrics["time/update_logprob_seconds"] = logprob_seconds
    metrics["time/update_steps_seconds"] = seconds - logprob_seconds
    # model FLOPs (grpo/algorithm/flops.py): the log-prob passes precompute ran, then mu trained passes
    tokens = sum(len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids))
    flops = update_flops(matmul_weights(policy), tokens, forward_passes, o.epochs)
    metrics["perf/tflops_per_second"] = flops / seconds / 1e12
    peak = peak_flops(device)
    if peak is not None:
        metrics["perf/mfu"] = flops / seconds / (peak * world_size())
    return UpdateResult(metrics, steps)
