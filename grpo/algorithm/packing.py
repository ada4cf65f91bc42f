"""How the update lays completions out for a forward pass: shared-prefix packing, or one row per completion.

The G completions of a group share one prompt. `pack` computes each distinct prompt once: one row per prompt,

    [pad .. prompt | o_1 | o_2 | .. | o_k | pad ..]

with each completion's positions restarting after the prompt and a block mask that lets a token of o_j attend
to the prompt and to the earlier tokens of o_j only. Every completion token then sees exactly the keys and
values it sees in its own padded row, so its log-prob, and the gradient through it, are those of the
repeated-prompt computation up to floating-point rounding (Prefix Grouper, arXiv 2506.05433). The first token
of every o_j is predicted by the prompt's last position, shared by all of them. A group of 8 with a 75-token
prompt and ~30-token completions is ~315 tokens packed against 8 x (75 + 48) = 984 padded.

`collate` is the repeated-prompt layout, one left-padded prompt and right-padded completion per row: the
reference the tests hold `pack` to.

Either way the model returns the logits of its last `logits_width` columns ([S, K, V]) and
`logits_index` [B, L] picks, for token t of completion b, the flat row (s * K + column) whose logits
predict it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [S, T]
    attention_mask: torch.Tensor  # [S, T] padding mask (collate), or [S, 1, T, T] bool block mask (pack)
    position_ids: torch.Tensor  # [S, T]
    completion_ids: torch.Tensor  # [B, L], right-padded
    completion_mask: torch.Tensor  # [B, L] float, 1 on real completion tokens
    logits_width: int  # K: the model computes logits for the last K columns only
    logits_index: torch.Tensor  # [B, L] long, into the [S * K] rows of those logits

    def to(self, device) -> "Batch":
        return Batch(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in
                       (self.input_ids, self.attention_mask, self.position_ids, self.completion_ids,
                        self.completion_mask, self.logits_width, self.logits_index)))


def _completion_table(completion_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([1, *map(len, completion_ids)])  # at least one column, so an empty completion still has a row
    ids = torch.full((len(completion_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completion_ids), width))
    for b, completion in enumerate(completion_ids):
        ids[b, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        mask[b, : len(completion)] = 1.0
    return ids, mask


def collate(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
            device: torch.device | str = "cpu") -> Batch:
    """One row per completion: [pad.. prompt | completion ..pad]; positions count real tokens only, so a
    left-padded row sees the positions it would see unpadded."""
    p = max(len(x) for x in prompt_ids)
    completions, completion_mask = _completion_table(completion_ids, pad_id)
    b, l = completions.shape
    input_ids = torch.full((b, p + l), pad_id, dtype=torch.long)
    attention = torch.zeros((b, p + l), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, p - len(prompt) : p] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, p : p + l] = completions[i]
        attention[i, p - len(prompt) : p + len(completion)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    width = l + 1  # columns p - 1 .. p + l - 1; column p - 1 + t predicts completion token t
    index = torch.arange(b)[:, None] * width + torch.arange(l)[None, :]
    return Batch(input_ids, attention, position_ids, completions, completion_mask, width, index).to(device)


def pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
         device: torch.device | str = "cpu", multiple: int = 1) -> Batch:
    """One row per distinct prompt (in order of first appearance), its completions after it, block-masked.
    Completions b keep their order in completion_ids / logits_index. `multiple`: the rows' length is rounded up
    to a multiple of it by more left padding (few distinct shapes; the log-probs are the same)."""
    rows = by_prompt(range(len(prompt_ids)), prompt_ids)
    completions, completion_mask = _completion_table(completion_ids, pad_id)
    total = max(sum(len(completion_ids[b]) for b in members) for members in rows)
    p = max(len(x) for x in prompt_ids)
    p += -(p + total) % multiple  # left padding up to the next multiple
    s, t, width = len(rows), p + total, total + 1  # logits of columns p - 1 .. t - 1
    input_ids = torch.full((s, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((s, t), dtype=torch.long)
    segment = torch.full((s, t), -1, dtype=torch.long)  # -1 padding, 0 the prompt, j + 1 completion j
    index = torch.zeros(completions.shape, dtype=torch.long)
    for r, members in enumerate(rows):
        prompt = prompt_ids[members[0]]
        input_ids[r, p - len(prompt) : p] = torch.tensor(prompt, dtype=torch.long)
        position_ids[r, p - len(prompt) : p] = torch.arange(len(prompt))
        segment[r, p - len(prompt) : p] = 0
        start = p
        for j, b in enumerate(members):
            n = len(completion_ids[b])
            input_ids[r, start : start + n] = completions[b, :n]
            position_ids[r, start : start + n] = torch.arange(len(prompt), len(prompt) + n)
            segment[r, start : start + n] = j + 1
            # token 0 is predicted by the prompt's last column (p - 1), token i > 0 by column start + i - 1
            columns = torch.cat([torch.tensor([p - 1]), torch.arange(start, start + n - 1)])[:n]
            index[b, :n] = r * width + columns - (p - 1)
            start += n
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    # a padding column attends to itself only: every row of the mask has a key, so no NaN enters the pass
    allowed |= torch.eye(t, dtype=torch.bool) & (query < 0)
    return Batch(input_ids, allowed[:, None], position_ids, completions, completion_mask, width, index).to(device)


def attention_mask_for(model, batch: Batch) -> torch.Tensor:
    """The mask as the model's attention takes it: sdpa (transformers' default) takes the bool block mask as
    it is (True: attend); eager attention adds the mask to its scores, so it gets 0 / the float32 minimum."""
    mask = batch.attention_mask
    if mask.dim() != 4:
        return mask
    implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
    raise ValueError(f"shared-prefix packing needs the model's attention to be 'sdpa' or 'eager', not "
                     f"{implementation!r} (its block mask is a 4D mask)")


def by_prompt(indices: Sequence[int], prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """`indices` in groups of equal prompts (prompts in order of first appearance, indices in their order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(prompt_ids[i]), []).append(i)
    return list(groups.values())


def prompt_adjacent(indices: Sequence[int], prompt_ids: Sequence[Sequence[int]]) -> list[int]:
    """`indices` reordered so that those of one prompt are side by side (as by_prompt groups them)."""
    return [i for group in by_prompt(indices, prompt_ids) for i in group]
