"""Model-FLOPs utilisation of an update, as verl reports it (perf/mfu/actor): the FLOPs the model's matrix
multiplies need for the update's tokens, per second, over the device's peak.

    FLOPs = N x tokens x (2 per forward-only pass + 6 per trained pass)

N: the weights of the model's linear layers (the output head included; the embedding lookup and attention's
scores are not counted). Tokens: each completion with its own prompt, as one row per completion computes them;
shared-prefix packing computes fewer, and is credited with the same FLOPs, so layouts compare by their time.
Forward-only passes: the reference's and pi_old's log-probs; trained passes: one per epoch (forward + backward).
"""

from __future__ import annotations

import torch

# dense bf16 peak FLOP/s of the data-centre GPUs, by a word of torch.cuda.get_device_name (the SXM parts)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "B200": 2250e12}


def matmul_weights(model: torch.nn.Module) -> int:
    """N: the weights of the model's linear layers (a tied output head counted as the matrix multiply it is)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def update_flops(weights: int, tokens: int, forward_passes: int, trained_passes: int) -> float:
    return float(weights) * tokens * (2 * forward_passes + 6 * trained_passes)


def peak_flops(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak, None where unknown (the CPU, an unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for word, peak in PEAK_BF16_FLOPS.items() if word in name), None)
