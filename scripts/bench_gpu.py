"""The GPU stage at the speed of the GPU: the update beside a plain padded loop, the sampler beside
`model.generate`, and one default iteration through the warm path, per stage. No downloads: random-init models
of real architectures, SmolLM2's tokenizer (the embedded GGUF's, or GRPO_TOKENIZER_DIR's plain folder).

    python scripts/bench_gpu.py                                  # CUDA: SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-1.5B
    python scripts/bench_gpu.py --models smollm2-135m --out bench.json
    python scripts/bench_gpu.py --device cpu                     # a tiny model and workload (the tests run this)

1. Update. 32 prompts x 8 completions (prompts 90-150 tokens, completions 50-300), minibatch 64, micro-batch
   16, beta 0.04 with a bf16 reference, one epoch: 4 optimizer steps, fp32 master weights, bf16 autocast.
   Ours: grpo.algorithm.trainer.grpo_update (shared-prefix packing). The plain loop: one left-padded row per
   completion, the reference and pi_old passes, the clipped loss with k3 KL (seq-mean-token-mean), fused AdamW,
   autocast around each forward. Both start from the same weights, after a warm-up on 2 groups each (CUDA's
   one-time kernel set-up). Seconds, completion tokens per second, MFU (grpo/algorithm/flops.py: 2N per token
   of a forward-only pass, 6N per trained token, N the linear layers' weights, each completion counted with its
   prompt, attention not counted; peak: dense bf16 of the GPU) and peak memory (torch.cuda.max_memory_allocated).
2. Sampler. SmolLM2-135M's architecture in bf16, 64 prompts x 8 samples x 256 new tokens (temperature 0.7, no
   top-k / top-p): grpo.backends.hf (HFBackend.generate, with the sampler's log-probs) against
   model.generate(num_return_sequences=8) on the same model; tokens per second of each.
3. Iteration. A throwaway copy of the project (grpo/, pipeline/, dvc.yaml, params.yaml; the random SmolLM2 as
   model.source), its stage commands taken from dvc.yaml and run one after another as DVC runs them:
   prepare-model and prepare-prompts, then generate, score, advantages and update for iterations 1 and 2
   through the worker the first stage starts (pipeline/worker/), and iteration 2 again with GRPO_WORKER=off.
   Seconds per stage as the stage's command takes them (process start included).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# the architectures' shapes (their config.json), the weights random
ARCHITECTURES = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                   rope_theta=100000.0, max_position_embeddings=8192)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=1000000.0, max_position_embeddings=32768)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_theta=1000000.0, max_position_embeddings=32768)),
    # --device cpu: the tests' tiny Llama (head_dim 32)
    "tiny": ("llama", dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                           max_position_embeddings=1024)),
}
# (prompts, group size, prompt lengths, completion lengths, minibatch, micro-batch) of each device's workload
UPDATE_WORKLOAD = {"cuda": (32, 8, (90, 150), (50, 300), 64, 16), "cpu": (4, 4, (10, 20), (5, 30), 8, 4)}
SAMPLER_WORKLOAD = {"cuda": (64, 8, 256), "cpu": (4, 4, 16)}  # prompts, samples, new tokens


def random_model(name: str, device, dtype=torch.float32, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo.models.loading import use_fast_attention

    model_type, shape = ARCHITECTURES[name]
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return use_fast_attention(model, torch.device(device))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------ 1. update


def make_rollouts(vocab: int, prompts: int, group: int, prompt_len, completion_len, seed: int = 0):
    from grpo.algorithm.trainer import Rollouts

    rng = random.Random(seed)
    prompt_ids, completion_ids = [], []
    for _ in range(prompts):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(*prompt_len))]
        for _ in range(group):
            prompt_ids.append(prompt)
            completion_ids.append([rng.randrange(10, vocab) for _ in range(rng.randint(*completion_len))])
    advantages = torch.tensor([rng.gauss(0.0, 1.0) for _ in prompt_ids], dtype=torch.float64)
    return Rollouts(prompt_ids, completion_ids, advantages)


def update_config(minibatch: int, micro: int):
    """params.yaml's optim and loss, with the workload's batch sizes, bf16 and no warm-up."""
    import dataclasses

    from grpo.algorithm.trainer import UpdateConfig
    from grpo.config import load_params

    params = load_params(ROOT / "params.yaml")
    optim = dataclasses.replace(params.optim, minibatch_size=minibatch, micro_batch_size=micro, epochs=1,
                                bf16=True, warmup_steps=0, learning_rate=1e-6)
    return UpdateConfig(optim=optim, loss=params.loss, temperature=params.rollout.temperature,
                        max_completion_tokens=max(300, params.rollout.max_new_tokens), seed=0, pad_id=0, start_step=0)


def ours(policy, reference, rollouts, cfg, device) -> None:
    from grpo.algorithm.trainer import grpo_update

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.learning_rate, fused=True)
    grpo_update(policy, reference, optimizer, rollouts, cfg, device=device)


def plain_loop(policy, reference, rollouts, cfg, device) -> None:
    """One left-padded row per completion, as a first GRPO loop is written."""
    from grpo.algorithm.packing import collate

    beta, clip, temperature = cfg.loss.beta, cfg.loss.clip_low, cfg.temperature
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.learning_rate, fused=True)
    n, micro = len(rollouts), cfg.optim.micro_batch_size

    def logprobs(model, rows):
        batch = collate([rollouts.prompt_ids[i] for i in rows], [rollouts.completion_ids[i] for i in rows], 0, device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, logits_to_keep=batch.logits_width).logits
        logits = logits[:, :-1] / temperature  # [B, L, V], the column before each completion token
        # one row at a time, as TRL's selective_log_softmax for bf16 logits
        logp = torch.stack([torch.log_softmax(row.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
                            for row, ids in zip(logits, batch.completion_ids)])
        return logp, batch.completion_mask

    def per_completion(model) -> list[torch.Tensor]:
        with torch.no_grad():
            return [lp[: len(rollouts.completion_ids[i])] for rows in _chunks(list(range(n)), micro)
                    for i, lp in zip(rows, logprobs(model, rows)[0])]

    def padded(values: list[torch.Tensor], rows: list[int], width: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(values[i], (0, width - len(values[i]))) for i in rows])

    ref, old = per_completion(reference), per_completion(policy)
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    for minibatch in _chunks(order, cfg.optim.minibatch_size):
        optimizer.zero_grad(set_to_none=True)
        for rows in _chunks(minibatch, micro):
            logp, mask = logprobs(policy, rows)
            width = logp.shape[1]
            old_lp, ref_lp = padded(old, rows, width), padded(ref, rows, width)
            adv = rollouts.advantages[rows].to(device, torch.float32)[:, None]
            ratio = torch.exp(logp - old_lp)
            surrogate = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
            kl = torch.exp(ref_lp - logp) - (ref_lp - logp) - 1  # k3
            per_token = (surrogate + beta * kl) * mask
            loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / len(minibatch)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def bench_update(name: str, device) -> dict:
    from grpo.algorithm.flops import matmul_weights, peak_flops, update_flops

    prompts, group, prompt_len, completion_len, minibatch, micro = UPDATE_WORKLOAD[torch.device(device).type]
    initial = random_model(name, device)
    reference = copy.deepcopy(initial).to(torch.bfloat16).eval().requires_grad_(False)
    rollouts = make_rollouts(ARCHITECTURES[name][1]["vocab_size"], prompts, group, prompt_len, completion_len)
    warm_up = make_rollouts(ARCHITECTURES[name][1]["vocab_size"], 2, group, prompt_len, completion_len, seed=1)
    cfg = update_config(minibatch, micro)
    tokens = sum(len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids))
    completion_tokens = sum(map(len, rollouts.completion_ids))
    flops = update_flops(matmul_weights(initial), tokens, forward_passes=2, trained_passes=1)
    peak = peak_flops(device)
    result = {"model": name, "completions": len(rollouts), "completion_tokens": completion_tokens}
    for label, run in (("plain", plain_loop), ("ours", ours)):
        run(copy.deepcopy(initial).train(), reference, warm_up, cfg, device)
        policy = copy.deepcopy(initial).train()
        reset_peak(device)
        sync(device)
        began = time.perf_counter()
        run(policy, reference, rollouts, cfg, device)
        sync(device)
        seconds = time.perf_counter() - began
        result[label] = {"seconds": seconds, "completion_tokens_per_second": completion_tokens / seconds,
                         "mfu": None if peak is None else flops / seconds / peak,
                         "peak_memory_gib": peak_memory_gib(device)}
        del policy
    result["ratio"] = result["ours"]["seconds"] / result["plain"]["seconds"]
    return result


# ------------------------------------------------------------------------------------------------ 2. sampler


def tokenizer():
    from scripts.throwaway_project import embedded_tokenizer

    return embedded_tokenizer()


def bench_sampler(device) -> dict:
    from grpo.backends import SamplingSpec
    from grpo.backends.hf import HFBackend
    from grpo.environments.prompts import render_prompt, synthetic_rows

    n_prompts, samples, new_tokens = SAMPLER_WORKLOAD[torch.device(device).type]
    tok = tokenizer()
    name = "smollm2-135m" if torch.device(device).type == "cuda" else "tiny"
    model = random_model(name, device, dtype=torch.bfloat16).eval()
    rows = synthetic_rows(0, num_train=n_prompts, num_eval=0, min_operand=1, max_operand=20, num_operands=3,
                          operations=("+", "-"))
    prompts = [render_prompt(tok, r["question"]) for r in rows]
    spec = SamplingSpec(n=samples, temperature=0.7, top_p=1.0, max_new_tokens=new_tokens)
    backend = HFBackend("-", model=model, tokenizer=tok, prompts_per_batch=n_prompts, dtype="bfloat16")
    backend.generate(prompts[:2], spec, [0, 1], progress=False)  # warm-up
    sync(device)
    began = time.perf_counter()
    groups = backend.generate(prompts, spec, list(range(n_prompts)), progress=False)
    sync(device)
    ours_seconds = time.perf_counter() - began
    ours_tokens = sum(len(c.token_ids) for g in groups for c in g.completions)

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    eos = model.generation_config.eos_token_id

    def generate(inputs):
        with torch.no_grad():
            return model.generate(**inputs, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                                  max_new_tokens=new_tokens, num_return_sequences=samples,
                                  pad_token_id=tok.pad_token_id)

    generate({k: v[:2] for k, v in enc.items()})  # warm-up
    sync(device)
    began = time.perf_counter()
    out = generate(enc)[:, enc["input_ids"].shape[1] :].tolist()
    sync(device)
    generate_seconds = time.perf_counter() - began
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    generate_tokens = sum(next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row)) for row in out)
    return {"model": name, "prompts": n_prompts, "samples": samples, "max_new_tokens": new_tokens,
            "ours": {"seconds": ours_seconds, "tokens": ours_tokens, "tokens_per_second": ours_tokens / ours_seconds},
            "generate": {"seconds": generate_seconds, "tokens": generate_tokens,
                         "tokens_per_second": generate_tokens / generate_seconds},
            "ratio": (ours_tokens / ours_seconds) / (generate_tokens / generate_seconds)}


# ------------------------------------------------------------------------------------------------ 3. iteration


def stage_commands(project: Path, iteration: int) -> dict[str, str]:
    """dvc.yaml's commands of prepare-model, prepare-prompts and iteration k's generate .. update."""
    import yaml

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name in ("check-inputs", "prepare-model", "prepare-prompts"):
        commands[name] = stages[name]["cmd"]
    for name in ("generate", "score", "advantages", "update"):
        cmd = " ".join(stages[name]["do"]["cmd"].split())
        commands[f"{name}@{iteration}"] = cmd.replace("${key}", str(iteration)).replace("${item}", str(iteration - 1))
    return commands


def bench_iteration(device, work: Path) -> dict:
    import yaml

    cpu = torch.device(device).type == "cpu"
    source = work / "model"
    random_model("tiny" if cpu else "smollm2-135m", "cpu").save_pretrained(source)
    tokenizer().save_pretrained(source)
    project = work / "project"
    for name in ("grpo", "pipeline"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["source"] = str(source)
    params["train"]["device"] = torch.device(device).type
    params["train"]["iterations"] = {"1": 0, "2": 1}
    if cpu:  # the tests' small workload
        params["prompts"].update(num_train=16, num_eval=6)
        params["rollout"].update(group_size=4, prompts_per_iteration=3, max_new_tokens=6)
        params["optim"].update(minibatch_size=6, micro_batch_size=3)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the stages import the copy's grpo/ and pipeline/ (python -m puts the working directory first)
    env = dict(os.environ, GRPO_WORKER_IDLE_SECONDS="30", HF_HUB_OFFLINE="1")
    env.pop("GRPO_WORKER", None)

    def run(command: str, extra: dict | None = None) -> float:
        argv = command.split()
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        began = time.perf_counter()
        result = subprocess.run(argv, cwd=project, env=env | (extra or {}), capture_output=True, text=True,
                                timeout=900)
        if result.returncode != 0:
            sys.exit(f"error: {command} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return time.perf_counter() - began

    timings: dict[str, dict[str, float]] = {"prepare": {}, "warm@1": {}, "warm@2": {}, "off@2": {}}
    for name, command in list(stage_commands(project, 1).items())[:3]:
        timings["prepare"][name] = run(command, {"GRPO_WORKER": "off"})
    try:
        for k in (1, 2):
            for name, command in list(stage_commands(project, k).items())[3:]:
                timings[f"warm@{k}"][name.split("@")[0]] = run(command)
    finally:
        subprocess.run([sys.executable, "-m", "pipeline.worker", "--stop"], cwd=project, env=env, capture_output=True)
    for name, command in list(stage_commands(project, 2).items())[3:]:
        timings["off@2"][name.split("@")[0]] = run(command, {"GRPO_WORKER": "off"})
    return {"completions": params["rollout"]["group_size"] * params["rollout"]["prompts_per_iteration"],
            "seconds": timings, **{f"{kind}_total": sum(timings[kind].values()) for kind in ("warm@1", "warm@2", "off@2")}}


# ------------------------------------------------------------------------------------------------ main


def fmt(value, spec: str) -> str:
    """`value` formatted by `spec` ("9.1%"), or n/a in the same width."""
    return "n/a".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--models", default=None,
                        help="comma-separated architectures (default: the three real ones on CUDA, tiny on the CPU)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: update, sampler, iteration")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; --device cpu runs the tiny workload")
    device = torch.device(args.device)
    names = args.models.split(",") if args.models else (
        ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"] if device.type == "cuda" else ["tiny"])
    skip = set(filter(None, args.skip.split(",")))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"bench_gpu: {where}, torch {torch.__version__}", flush=True)
    results: dict = {"device": where, "torch": torch.__version__, "update": [], "sampler": None, "iteration": None}
    if "update" not in skip:
        print("update (ours: grpo_update, shared-prefix packing; plain: one padded row per completion)")
        print(f"  {'model':<14} {'plain s':>8} {'ours s':>8} {'ours/plain':>10} {'plain tok/s':>11} "
              f"{'ours tok/s':>10} {'plain MFU':>9} {'ours MFU':>8} {'plain GiB':>9} {'ours GiB':>8}")
        for name in names:
            r = bench_update(name, device)
            results["update"].append(r)
            p, o = r["plain"], r["ours"]
            print(f"  {name:<14} {p['seconds']:>8.2f} {o['seconds']:>8.2f} {r['ratio']:>9.2f}x "
                  f"{p['completion_tokens_per_second']:>11.0f} {o['completion_tokens_per_second']:>10.0f} "
                  f"{fmt(p['mfu'], '9.1%')} {fmt(o['mfu'], '8.1%')} {fmt(p['peak_memory_gib'], '9.1f')} "
                  f"{fmt(o['peak_memory_gib'], '8.1f')}", flush=True)
    if "sampler" not in skip:
        r = results["sampler"] = bench_sampler(device)
        print(f"sampler ({r['model']}, {r['prompts']} prompts x {r['samples']} x {r['max_new_tokens']} tokens, bf16): "
              f"ours {r['ours']['tokens_per_second']:.0f} tok/s, generate {r['generate']['tokens_per_second']:.0f} "
              f"tok/s, ours/generate {r['ratio']:.2f}x", flush=True)
    if "iteration" not in skip:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
            r = results["iteration"] = bench_iteration(device, Path(work))
        print(f"iteration ({r['completions']} completions), seconds per stage command:")
        for kind, stages in r["seconds"].items():
            print(f"  {kind:<8} " + "  ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())
                  + (f"  = {r[kind + '_total']:.1f}" if kind + "_total" in r else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
