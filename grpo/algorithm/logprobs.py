"""Log-probability of each sampled token, without a full-vocabulary float32 log-softmax of the batch.

    log pi(o_t | q, o_<t) = log_softmax(z_t / T)[o_t] = z_t[o_t] / T - logsumexp_v(z_t[v] / T)

The naive `log_softmax(logits, -1).gather(...)` allocates a [B, T, V] float32 tensor (3.2 GB for
64 x 256 x 49152), and autograd keeps it for the backward pass. Here positions are processed in chunks of
`chunk_rows`: forward keeps no vocabulary-sized tensor beyond the logits themselves, and backward
recomputes the softmax of one chunk at a time (d logp / d z = (onehot - softmax(z/T)) / T).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 256  # x 49152 vocab x 4 bytes = 48 MiB per temporary


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # bf16/fp16 logits are upcast per chunk; float64 stays float64 (tests pin the math in float64)
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, chunk_rows: int):
        flat = logits.reshape(-1, logits.shape[-1])  # [N, V], a view
        ids = token_ids.reshape(-1, 1)
        out = torch.empty(flat.shape[0], dtype=_compute_dtype(logits), device=logits.device)
        for rows in _chunks(flat.shape[0], chunk_rows):
            # the same row-wise log_softmax kernel as the naive one-liner, so results agree to the bit
            out[rows] = _chunk_log_softmax(flat[rows], out.dtype, temperature).gather(-1, ids[rows]).squeeze(-1)
        ctx.save_for_backward(logits, token_ids)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return out.view(token_ids.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, token_ids = ctx.saved_tensors
        t = ctx.temperature
        flat = logits.reshape(-1, logits.shape[-1])
        ids = token_ids.reshape(-1, 1)
        grad = torch.empty_like(flat)
        for rows in _chunks(flat.shape[0], ctx.chunk_rows):
            # d/dz [log_softmax(z/T)_o] = (onehot(o) - softmax(z/T)) / T, recomputed one chunk at a time
            probs = _chunk_log_softmax(flat[rows], _compute_dtype(logits), t).exp_()
            g = grad_out.reshape(-1)[rows].to(probs.dtype).unsqueeze(-1) / t
            chunk_grad = probs.mul_(-g).scatter_add_(-1, ids[rows], g)
            grad[rows] = chunk_grad
        return grad.view(logits.shape), None, None, None


def _chunks(n: int, size: int):
    return (slice(start, start + size) for start in range(0, n, size))


def _chunk_log_softmax(chunk: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    z = chunk.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """logits [B, T, V], token_ids [B, T] -> log-probs [B, T] (float32, float64 for float64 logits), differentiable.

    `temperature` must match the sampler's, so that the log-probs are those of the sampling distribution.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match token_ids {tuple(token_ids.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _ChunkedTokenLogprobs.apply(logits, token_ids.long(), float(temperature), int(chunk_rows))


def naive_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Reference implementation (full float32 log-softmax); for tests and the benchmark only."""
    logp = _chunk_log_softmax(logits, _compute_dtype(logits), temperature)
    return logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Entropy of the (tempered) next-token distribution at each position, [B, T], no grad, chunked."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=_compute_dtype(logits), device=logits.device)
    for rows in _chunks(flat.shape[0], chunk_rows):
        logp = _chunk_log_softmax(flat[rows], out.dtype, temperature)
        out[rows] = -(logp.exp() * logp).sum(-1)
    return out.view(logits.shape[:-1])
