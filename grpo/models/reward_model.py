"""A reward model trained on people's ratings: the frozen base checkpoint as a feature extractor and a linear
scalar head fitted by Bradley-Terry on the pairs of completions of a group that were rated differently.

    x = mean over the completion's tokens of the base model's last hidden state (prompt + completion, fp32)
    z = (x - mean_train) / std_train                   standardised with the training completions' statistics
    s = w . z                                           the score; P(a preferred to b) = sigmoid(s_a - s_b)
    reward_model = sigmoid(s)                           in [0, 1]; the training completions' mean features score 0.5

    data/reward_models/<k>/
        head.safetensors     weight [1, d], feature_mean [d], feature_std [d]
        reward_model.json    {"trained": true, "base", "base_checkpoint_id", "features", "config", "metrics"}
                             or {"trained": false, "reason"} where no reward uses it (pipeline/reward_model.py)

Why a linear probe on frozen features rather than a fine-tuned (LoRA) model: a few dozen ratings per iteration
are a few hundred pairs, far too few to tune millions of weights without overfitting; the probe has d weights
(576 for SmolLM2-135M) and costs one forward pass per rated completion, no backward. Measured with SmolLM2-135M
on a busy 2-core CPU: the features of 32 completions (~200 tokens each) took 32 s and the 300-step fit 0.3 s,
while one forward + backward over the same 32, what every step of a LoRA fit costs, took 132 s. The fit is
deterministic, and the base weights stay untouched, so the scorer shares the worker's cached base checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from grpo.config import RewardModelConfig
from grpo.errors import ConfigError, InputError
from grpo.models.atomic import atomic_write
from grpo.models.cache import CheckpointCache, stamp
from grpo.models.loading import INFO_FILE, checkpoint_info, load_checkpoint, resolve_device, use_fast_attention

INFO = "reward_model.json"  # pipeline/reward_model.py writes the untrained form itself (no torch import there)
HEAD = "head.safetensors"
BATCH_SIZE = 16  # completions per forward pass (sorted by length, so a batch pads little)
FEATURES = {"input": "prompt + completion tokens (add_special_tokens=False, as the rollout backends encode them)",
            "layer": "last hidden state (after the final norm)", "pooling": "mean over the completion's tokens",
            "dtype": "float32", "standardised": "with the training completions' mean and std"}


# ----------------------------------------------------------------------------------------------------------------
# features

@torch.no_grad()
def completion_features(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                        device: torch.device) -> torch.Tensor:
    """[n, hidden] on the CPU: the base model's last hidden state, mean-pooled over each completion's tokens.

    Mean over the completion's tokens, not the whole sequence or the last token: a rating judges the completion,
    and a group's completions share their prompt, whose token states (causal attention: they never see the
    completion) are the same for every completion of the group, so pooling them in would only dilute the
    differences Bradley-Terry learns from. The last token alone, in a small frozen model, mostly encodes what
    comes next; the mean sees every token of the completion (a word anywhere in it) and does not grow with length.
    """
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    encoded = []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        cut = max(0, len(p) + len(c) - limit)  # too long: drop the prompt's start first, the completion is judged
        encoded.append(((p + c)[cut:], max(len(p) - cut, 0)))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    out = torch.zeros(len(encoded), model.config.hidden_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for b in range(0, len(order), BATCH_SIZE):
        batch = order[b:b + BATCH_SIZE]
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        pool = torch.zeros(len(batch), width)
        for row, i in enumerate(batch):
            tokens, start = encoded[i]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            attention[row, :len(tokens)] = 1  # right padding: positions 0.. stay those of the unpadded sequence
            if start < len(tokens):
                pool[row, start:len(tokens)] = 1
            else:  # an empty completion: the prompt's last state, from which the completion would have begun
                pool[row, len(tokens) - 1] = 1
        # base_model: the transformer without the LM head (no [batch, length, vocab] logits to compute)
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=attention.to(device)).last_hidden_state
        pooled = (hidden.float() * pool.to(device)[..., None]).sum(1) / pool.sum(1, keepdim=True).to(device)
        out[batch] = pooled.cpu()
    return out


def rating_features(base: str | Path, rows: dict, device: str = "auto", *, cache: CheckpointCache | None = None,
                    features_dir: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """[n, hidden]: completion_features of every rating in `rows` (columns iteration, prompt, completion).

    Computed an iteration at a time, so that a rating's features never depend on which other iterations are read
    with it (batches, and with them the last bits of a float, are formed within the iteration), and kept in
    `features_dir` (None: nowhere) under a hash of the base folder's stamp (grpo.models.cache.stamp), the device
    and the iteration's (prompt, completion) pairs. New ratings re-run every reward-model@j (data/ratings is one
    DVC dependency); each then reads the features of unchanged iterations from there, the same numbers bit for
    bit, instead of running the base model over every rating again. The base is loaded only when one is missing.
    """
    x: torch.Tensor | None = None
    loaded = None
    iterations = sorted(set(rows["iteration"]))
    report = {"feature_iterations": len(iterations), "feature_iterations_cached": 0}
    # the same for every iteration: the base folder's files (path, size, mtime) and where the features are computed
    source = {"base": stamp(base), "device": resolve_device(device).type, "features": FEATURES}
    for iteration in iterations:
        index = [i for i, k in enumerate(rows["iteration"]) if k == iteration]
        pairs = [[rows["prompt"][i], rows["completion"][i]] for i in index]
        path = None
        if features_dir is not None:
            key = json.dumps({**source, "pairs": pairs})
            path = Path(features_dir) / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
        if path is not None and path.exists():
            part = load_file(path)["features"]
            report["feature_iterations_cached"] += 1
        else:
            loaded = loaded or load_base(base, cache=cache, device=device)
            model, tokenizer, dev = loaded
            part = completion_features(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], dev)
            if path is not None:
                atomic_write(path, lambda tmp: save_file({"features": part.contiguous()}, tmp))
        if x is None:
            x = torch.zeros(len(rows["iteration"]), part.shape[1])
        x[index] = part
    return x, report


def load_base(base: str | Path, *, cache: CheckpointCache | None = None, device: str = "auto"):
    """(model, tokenizer, device): the frozen base checkpoint, fp32, in evaluation mode."""
    model, tokenizer = load_checkpoint(base, dtype=torch.float32, cache=cache)
    dev = resolve_device(device)
    model = use_fast_attention(model.to(dev).eval(), dev)
    return model, tokenizer, dev


# ----------------------------------------------------------------------------------------------------------------
# training

def heldout_groups(groups: Sequence[str], seed: int, fraction: float) -> set[str]:
    """The groups held out: those whose hash (with train.seed) falls below `fraction`. Whole groups, since pairs
    are formed within a group; a hash, so a group stays where it is as ratings of other groups are added."""
    def u(group: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}/{group}".encode()).digest()[:8], "big") / 2 ** 64
    return {g for g in groups if u(g) < fraction}


def rated_pairs(groups: Sequence[str], ratings: Sequence[int], rows: Sequence[int]) -> torch.Tensor:
    """[pairs, 2] (winner row, loser row): every two of `rows` in the same group with different ratings (a tie
    says nothing about which is better, and Bradley-Terry has no tie)."""
    by_group: dict[str, list[int]] = {}
    for r in rows:
        by_group.setdefault(groups[r], []).append(r)
    pairs = [(a, b) if ratings[a] > ratings[b] else (b, a)
             for members in by_group.values() for i, a in enumerate(members) for b in members[i + 1:]
             if ratings[a] != ratings[b]]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def pairwise_accuracy(scores: torch.Tensor, pairs: torch.Tensor) -> float | None:
    """The fraction of pairs whose winner scores higher; a tie in score counts half. None without pairs."""
    if len(pairs) == 0:
        return None
    diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def fit_head(z: torch.Tensor, pairs: torch.Tensor, config: RewardModelConfig) -> torch.nn.Linear:
    """Full-batch AdamW on the Bradley-Terry loss. No bias: the loss sees only score differences, in which it
    cancels. Zero initialisation: every completion starts at score 0, and the fit is deterministic."""
    head = torch.nn.Linear(z.shape[1], 1, bias=False)
    torch.nn.init.zeros_(head.weight)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    threads = torch.get_num_threads()
    # ops this small gain nothing from threads, which only wait on each other: 300 steps of [320, 576] took 0.3 s
    # on one thread and 6-15 s on two of a busy 2-core machine
    torch.set_num_threads(1)
    try:
        for _ in range(config.steps):
            s = head(z).squeeze(-1)
            # Bradley-Terry: P(winner preferred to loser) = sigmoid(s_w - s_l); loss = -mean log sigmoid(s_w - s_l)
            loss = -F.logsigmoid(s[pairs[:, 0]] - s[pairs[:, 1]]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return head


def train(base: str | Path, ratings: pa.Table, config: RewardModelConfig, *, seed: int,
          cache: CheckpointCache | None = None, device: str = "auto",
          features_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for head.safetensors, metrics) from a RATINGS table (every rating so far). InputError when the
    ratings hold no pair to learn from, or every pair is held out. `features_dir`: see rating_features."""
    start = time.perf_counter()
    rows = ratings.select(["iteration", "group_id", "rating", "prompt", "completion"]).to_pydict()
    groups = [f"{k}/{g}" for k, g in zip(rows["iteration"], rows["group_id"])]  # a group id is per iteration
    heldout = heldout_groups(sorted(set(groups)), seed, config.heldout_fraction)
    train_rows = [i for i, g in enumerate(groups) if g not in heldout]
    train_pairs = rated_pairs(groups, rows["rating"], train_rows)
    heldout_pairs = rated_pairs(groups, rows["rating"], [i for i, g in enumerate(groups) if g in heldout])
    counts = f"{len(groups)} ratings in {len(set(groups))} groups"
    if len(train_pairs) + len(heldout_pairs) == 0:
        raise InputError(f"{counts}, but no two completions of a group are rated differently: the reward model "
                         "learns which of two completions of a prompt is better; rate whole groups, telling them apart")
    if len(train_pairs) == 0:
        raise InputError(f"{counts}: every pair of differently rated completions is in a held-out group "
                         f"(reward.reward_model.heldout_fraction {config.heldout_fraction}); rate more groups or "
                         "lower heldout_fraction")

    x, feature_report = rating_features(base, rows, device, cache=cache, features_dir=features_dir)
    feature_seconds = time.perf_counter() - start
    mean = x[train_rows].mean(0)
    std = x[train_rows].std(0, unbiased=False).clamp_min(1e-6)  # a constant feature: no division by 0
    z = (x - mean) / std
    head = fit_head(z, train_pairs, config)
    with torch.no_grad():
        scores = head(z).squeeze(-1)
    metrics = {"ratings": len(groups), "groups": len(set(groups)), "groups_heldout": len(heldout),
               "pairs_train": len(train_pairs), "pairs_heldout": len(heldout_pairs),
               "train_pairwise_accuracy": pairwise_accuracy(scores, train_pairs),
               "heldout_pairwise_accuracy": pairwise_accuracy(scores, heldout_pairs),
               **feature_report, "feature_seconds": feature_seconds, "seconds": time.perf_counter() - start}
    tensors = {"weight": head.weight.detach().clone(), "feature_mean": mean, "feature_std": std}
    return tensors, metrics


def save(folder: str | Path, base: str | Path, tensors: dict[str, torch.Tensor], metrics: dict,
         config: RewardModelConfig, seed: int) -> None:
    """Write the trained reward model into `folder` (the caller's grpo.models.atomic.atomic_folder)."""
    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / HEAD)
    base_id = checkpoint_info(base)["checkpoint_id"] if (Path(base) / INFO_FILE).exists() else None
    info = {"trained": True, "base": str(base), "base_checkpoint_id": base_id,
            "features": {**FEATURES, "hidden_size": int(tensors["weight"].shape[1])},
            "config": {"seed": seed, "heldout_fraction": config.heldout_fraction, "steps": config.steps,
                       "learning_rate": config.learning_rate, "weight_decay": config.weight_decay},
            # what the fit found; how long it took and what came from the features cache are the stage's metrics
            "metrics": {k: v for k, v in metrics.items() if not k.endswith("seconds") and not k.startswith("feature_")}}
    (folder / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# scoring

def read_info(folder: str | Path) -> dict:
    """reward_model.json of a trained reward model; ConfigError naming the folder when it is not one."""
    path = Path(folder) / INFO
    if not path.exists():
        raise InputError(f"{folder}: no {INFO}; not a reward model folder (stage reward-model@k writes one)")
    info = json.loads(path.read_text())
    if not info.get("trained"):
        raise ConfigError(f"{folder}: the reward model was not trained ({info.get('reason', 'no reason given')}); "
                          "a reward that calls it needs reward-model@k to train it (dvc repro)")
    return info


def load_scorer(folder: str | Path, *, cache: CheckpointCache | None = None,
                device: str = "auto") -> Callable[[Sequence], list[float]]:
    """samples (grpo.environments.rewards.Sample: .prompt, .completion) -> sigmoid(w . z) in [0, 1]."""
    info = read_info(folder)
    tensors = load_file(Path(folder) / HEAD)
    model, tokenizer, dev = load_base(info["base"], cache=cache, device=device)
    if model.config.hidden_size != tensors["weight"].shape[1]:
        raise ConfigError(f"{folder}: trained on {info['base']} with hidden size {tensors['weight'].shape[1]}, "
                          f"but that checkpoint now has {model.config.hidden_size}; train it again (dvc repro)")

    def score(samples: Sequence) -> list[float]:
        if not samples:
            return []
        x = completion_features(model, tokenizer, [s.prompt for s in samples], [s.completion for s in samples], dev)
        z = (x - tensors["feature_mean"]) / tensors["feature_std"]
        return torch.sigmoid(z @ tensors["weight"][0]).tolist()

    return score
