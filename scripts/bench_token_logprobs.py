"""Peak memory and time of grpo.token_logprobs vs the naive log_softmax(logits).gather(...).

    python scripts/bench_token_logprobs.py                 # [64, 256, 49152] float32 on CPU (~10 GB RAM)
    python scripts/bench_token_logprobs.py --device cuda

Each variant runs in its own subprocess so peak memory is its own: on CPU the peak resident set above the
resident set right after allocating the logits, on CUDA torch.cuda.max_memory_allocated above the same
baseline. Prints ratios (naive / ours) measured in this one run, and the max abs difference of the outputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from grpo.algorithm.logprobs import token_logprobs  # noqa: E402


def naive(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The usual one-liner: a full [B, T, V] float32 log-softmax, then gather."""
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


VARIANTS = {"naive": naive, "chunked": token_logprobs}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _make_inputs(shape, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    b, t, v = shape
    logits = torch.randn(b, t, v, generator=g, device=device).mul_(3.0)
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    return logits, ids


def run_variant(name: str, shape, device: str, backward: bool) -> dict:
    logits, ids = _make_inputs(shape, device)
    if backward:
        logits.requires_grad_(True)
    fn = VARIANTS[name]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    out = fn(logits, ids)
    if backward:
        out.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": time.perf_counter() - start, "peak_extra_bytes": max(peak, 0)}


def agreement(shape, device: str) -> float:
    logits, ids = _make_inputs(shape, device)
    with torch.no_grad():
        ours = token_logprobs(logits, ids)
        ref = naive(logits, ids)
        diff = float((ours - ref).abs().max())
        # float64 truth, a slice at a time: which of the two float32 results is closer to it
        rows = slice(0, 8)
        truth = naive(logits[rows].double(), ids[rows])
        err_ours = float((ours[rows].double() - truth).abs().max())
        err_naive = float((ref[rows].double() - truth).abs().max())
    return diff, err_ours, err_naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 256, 49152], metavar=("B", "T", "V"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    torch.set_grad_enabled(True)
    if args.child:
        variant, mode = args.child
        print(json.dumps(run_variant(variant, shape, args.device, backward=(mode == "fwd+bwd"))))
        return

    gib = 2**30
    print(f"token_logprobs benchmark: logits {list(shape)} float32 ({torch.tensor(shape).prod() * 4 / gib:.2f} GiB), "
          f"device {args.device}, torch {torch.__version__}")
    for mode in ("fwd", "fwd+bwd"):
        results = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--shape", *map(str, shape), "--device", args.device, "--child", variant, mode]
            results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        naive, ours = results["naive"], results["chunked"]
        print(f"  {mode:8s} naive   peak +{naive['peak_extra_bytes'] / gib:6.2f} GiB  {naive['seconds']:7.2f} s")
        print(f"  {mode:8s} chunked peak +{ours['peak_extra_bytes'] / gib:6.2f} GiB  {ours['seconds']:7.2f} s")
        print(f"  {mode:8s} ratio naive/chunked: memory {naive['peak_extra_bytes'] / max(ours['peak_extra_bytes'], 1):.1f}x, "
              f"time {naive['seconds'] / ours['seconds']:.2f}x")
    diff, err_ours, err_naive = agreement(shape, args.device)
    print(f"  max |chunked - naive| = {diff:.2e}  ({'within' if diff <= 1e-5 else 'NOT within'} 1e-5)")
    print(f"  max error vs float64 (first 8 sequences): chunked {err_ours:.2e}, naive {err_naive:.2e}")
    if diff > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    main()
