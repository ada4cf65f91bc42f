import pytest
import torch

from grpo import token_entropy, token_logprobs
from grpo.algorithm.logprobs import naive_token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 5, 512])
def test_matches_log_softmax_gather_and_its_gradient(temperature, chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 6, 50, generator=g, dtype=torch.float64)).requires_grad_(True)
    ids = torch.randint(0, 50, (4, 6), generator=g)
    ours = token_logprobs(logits, ids, temperature=temperature, chunk_rows=chunk_rows)
    ref = naive_token_logprobs(logits, ids, temperature=temperature)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


def test_gradcheck():
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, temperature=0.9, chunk_rows=2), (logits,))


def test_bf16_logits_agree_with_float32_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 1000, generator=g).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, 1000, (2, 8), generator=g)
    ours = token_logprobs(logits, ids)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive_token_logprobs(logits, ids), rtol=0, atol=1e-5)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_float32_agreement_on_a_large_vocabulary():
    g = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(2, 16, 49152, generator=g)
    ids = torch.randint(0, 49152, (2, 16), generator=g)
    torch.testing.assert_close(token_logprobs(logits, ids), naive_token_logprobs(logits, ids), rtol=0, atol=1e-5)


def test_entropy():
    logits = torch.zeros(1, 2, 8)
    torch.testing.assert_close(token_entropy(logits), torch.full((1, 2), torch.log(torch.tensor(8.0)).item()))


def test_shape_and_temperature_errors():
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0)
