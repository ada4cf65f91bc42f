"""The update on several ranks (FSDP2 on the CPU with gloo) is the 1-process update.

- One iteration's update (three minibatches, two micro-batches per rank, the last minibatch uneven so one rank
  runs a placeholder micro-batch, TIS on, KL to a sharded reference), in float64, with 1 process and with 2
  ranks whose token counts differ on purpose (rank 0's completions are long, rank 1's short): the same
  weights and the same Adam moments, for token_mean and seq_mean_token_mean.
- The negative control: the same comparison with each rank normalising by its LOCAL count must not match.
- Optimizer state saved by 2 ranks (DCP) and continued with 1 process gives what continuing with 2 gives.
- DVC: a 1-iteration tiny project with optim.nproc_per_node 2 (torchrun) writes the checkpoint of
  nproc_per_node 1.

Tolerances (float64; the ranks only change the order of the sums):
    weights     rtol 0, atol 1e-10   (a step moves a weight by ~lr = 1e-3; measured: <= 1.0e-15)
    Adam m, v   rtol 1e-7, atol 1e-16 (measured: m <= 3.8e-17 of |m| <= 1e-2, v <= 7.6e-20 of |v| <= 1.1e-5)
The negative control misses them by far: weights differ by up to 6.0e-3 (token_mean) and 1.3e-3
(seq_mean_token_mean).
DVC test (float32 weights, optim.bf16 false, 2 Adam steps of lr 1e-3):
    weights     atol 1e-4 per element (a tenth of a step: Adam's division by sqrt(v) scales the rounding
                differences of an element whose gradient is ~eps up to a visible fraction of lr), and
                |w_2 - w_1| <= 1e-4 |w_1 - w_0| over all weights (measured: 1.3e-5 and 4.9e-6)
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.project import dvc, free_port, make_project, small_params

pytestmark = pytest.mark.slow

F64 = torch.float64
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
WEIGHT_TOL = dict(rtol=0.0, atol=1e-10)
MOMENT_TOL = dict(rtol=1e-7, atol=1e-16)
DVC_WEIGHT_TOL = dict(rtol=0.0, atol=1e-4)  # float32: a tenth of one Adam step (lr 1e-3)
DVC_RELATIVE_TOL = 1e-4  # |w_2 - w_1| <= 1e-4 * |w_1 - w_0| (w_0 the base, w_N after the update with N processes)
N, MINIBATCH, MICRO, SEED = 21, 8, 2, 3  # minibatches of 8, 8, 5: the last gives rank 1 a placeholder


def _cfg(aggregation: str):
    from tests.project import update_config

    return update_config(epochs=1, minibatch_size=MINIBATCH, micro_batch_size=MICRO, max_grad_norm=1.0,
                         temperature=0.9, bf16=False, seed=SEED, tis=True, tis_cap=2.0, learning_rate=1e-3,
                         warmup_steps=0, beta=0.04, clip_low=0.2, clip_high=0.28, aggregation=aggregation,
                         max_completion_tokens=16)


def _rollouts(world: int = 2):
    """N completions whose lengths follow the update's shuffle: every completion rank 0 trains on has 10-16
    tokens, every one rank 1 trains on 1-3, so the ranks' token counts differ in every minibatch."""
    from grpo.algorithm.trainer import Rollouts

    order = list(range(N))
    random.Random(SEED).shuffle(order)  # the shuffle grpo_update draws (epoch 1)
    trained_by = {i: (p % MINIBATCH) % world for p, i in enumerate(order)}  # minibatch[r::W] -> rank r
    g = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for i in range(N):
        low, high = (10, 17) if trained_by[i] == 0 else (1, 4)
        prompts.append(torch.randint(10, 1000, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist())
        completions.append(torch.randint(10, 1000, (int(torch.randint(low, high, (1,), generator=g)),),
                                         generator=g).tolist())
    advantages = torch.randn(N, generator=g, dtype=F64)
    # the sampler's log-probs: about the tiny model's (~ -log 49152 = -10.8), so TIS weights are around 1
    sampler = [(-10.8 + 0.5 * torch.randn(len(c), generator=g, dtype=F64)).tolist() for c in completions]
    return Rollouts(prompts, completions, advantages, sampler)


def _whole_optimizer_state(policy, optimizer, world) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if world.size == 1:
        return get_optimizer_state_dict(policy, optimizer)
    return get_optimizer_state_dict(policy, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _worker(rank: int, world_size: int, port: int, job: dict) -> None:
    """One process of an update. job: model (dir), aggregation, out (results file), and optionally
    local_counts (the negative control), resume (checkpoint dir to continue from), save (checkpoint dir)."""
    torch.set_num_threads(1)
    if world_size > 1:  # what torchrun sets
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world_size))
    from grpo import distributed
    from grpo.algorithm import trainer
    from grpo.models.checkpoints import load_optimizer_state, save_checkpoint
    from grpo.models.loading import load_checkpoint

    world = distributed.start("cpu")
    if job.get("local_counts"):
        trainer.global_count = lambda local: local  # NEGATIVE CONTROL: each rank divides by its own count
    source = job.get("resume") or job["model"]
    policy, tokenizer = load_checkpoint(source, dtype=F64)
    reference, _ = load_checkpoint(job["model"], dtype=F64)
    policy = distributed.shard_model(policy.train(), world)
    reference = distributed.shard_model(reference.eval().requires_grad_(False), world)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.01)
    if job.get("resume"):
        assert load_optimizer_state(optimizer, policy, job["resume"], lr=1e-3)
    result = trainer.grpo_update(policy, reference, optimizer, _rollouts(), _cfg(job["aggregation"]),
                                 device=world.device)
    weights = distributed.full_state_dict(policy, world) if world.size > 1 else dict(policy.named_parameters())
    moments = _whole_optimizer_state(policy, optimizer, world)
    if world.is_main:
        torch.save({"weights": {k: v.detach().clone() for k, v in weights.items()}, "moments": moments["state"],
                    "metrics": result.metrics}, job["out"])
    if job.get("save"):
        save_checkpoint(job["save"], policy, tokenizer, {"checkpoint_id": "test"}, optimizer=optimizer, world=world)
    distributed.stop(world)


def _run(world_size: int, **job) -> dict:
    mp.spawn(_worker, args=(world_size, free_port(), job), nprocs=world_size, join=True)
    return torch.load(job["out"], weights_only=True)


def _assert_same_update(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], **WEIGHT_TOL, msg=lambda m: f"{name}: {m}")
    assert a["moments"].keys() == b["moments"].keys()
    for name in a["moments"]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["moments"][name][key], b["moments"][name][key], **MOMENT_TOL,
                                       msg=lambda m: f"{name} {key}: {m}")
        assert float(a["moments"][name]["step"]) == float(b["moments"][name]["step"])


def _largest_differences(a: dict, b: dict) -> str:
    """The largest absolute difference of the weights and of each moment, and the largest moment."""
    weights = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])
    text = f"weights {weights:.1e}"
    for key in ("exp_avg", "exp_avg_sq"):
        diff = max(float((a["moments"][k][key] - b["moments"][k][key]).abs().max()) for k in a["moments"])
        size = max(float(b["moments"][k][key].abs().max()) for k in b["moments"])
        text += f", {key} {diff:.1e} (largest |{key}| {size:.1e})"
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    """Every spawned update the tests compare (each start of a process costs seconds)."""
    tmp = tmp_path_factory.mktemp("distributed")
    out = {}
    for agg in AGGREGATIONS:
        out[1, agg] = _run(1, model=str(tiny_model_dir), aggregation=agg, out=str(tmp / f"1-{agg}.pt"))
        out[2, agg] = _run(2, model=str(tiny_model_dir), aggregation=agg, out=str(tmp / f"2-{agg}.pt"),
                           save=str(tmp / f"ckpt-{agg}"))
        out["local", agg] = _run(2, model=str(tiny_model_dir), aggregation=agg, local_counts=True,
                                 out=str(tmp / f"local-{agg}.pt"))
    out["dir"] = tmp
    return out


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_two_ranks_give_the_one_process_update(runs, aggregation, tiny_model_dir):
    from grpo.models.loading import load_checkpoint

    one, two = runs[1, aggregation], runs[2, aggregation]
    assert one["metrics"]["optimizer_steps"] == two["metrics"]["optimizer_steps"] == 3
    _assert_same_update(one, two)
    print(f"\n1 process vs 2 ranks ({aggregation}), largest differences: {_largest_differences(two, one)}")
    # the steps moved the weights far beyond the tolerance; the statistics are those of the whole batch
    base = load_checkpoint(tiny_model_dir, dtype=F64)[0].state_dict()
    assert max(float((one["weights"][k] - base[k]).abs().max()) for k in one["weights"]) > 5e-4
    for name in ("loss", "kl", "entropy", "grad_norm", "clip_ratio/region_mean", "sampling/logp_diff_mean"):
        assert one["metrics"][name] == pytest.approx(two["metrics"][name], rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_negative_control_local_normalisation_does_not_match(runs, aggregation):
    """Each rank dividing by its own count (what a per-rank mean does) weights the ranks unequally: the
    comparison that passes with global counts must fail."""
    one, local = runs[1, aggregation], runs["local", aggregation]
    with pytest.raises(AssertionError) as failed:
        _assert_same_update(one, local)
    print(f"\nnegative control ({aggregation}, local counts vs 1 process):\n{failed.value}")
    worst = max(float((one["weights"][k] - local["weights"][k]).abs().max()) for k in one["weights"])
    print(f"largest weight difference: {worst:.3e} (tolerance {WEIGHT_TOL['atol']:.0e})")
    assert worst > 1e3 * WEIGHT_TOL["atol"]


def test_optimizer_state_saved_by_two_ranks_continues_in_one_process(runs, tiny_model_dir):
    """Iteration 2 from the checkpoint 2 ranks wrote (DCP shards): 1 process == 2 ranks."""
    tmp, checkpoint = runs["dir"], runs["dir"] / "ckpt-token_mean"
    shards = sorted(p.name for p in (checkpoint / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    one = _run(1, model=str(tiny_model_dir), aggregation="token_mean", resume=str(checkpoint),
               out=str(tmp / "resume-1.pt"))
    two = _run(2, model=str(tiny_model_dir), aggregation="token_mean", resume=str(checkpoint),
               out=str(tmp / "resume-2.pt"))
    _assert_same_update(one, two)
    for name, state in one["moments"].items():
        assert float(state["step"]) == 6.0, name  # 3 steps saved + 3 steps now


@pytest.fixture(scope="module")
def eos_prone_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a large EOS embedding (tied: the EOS logit h . e_eos varies by +-12 with the
    context), so sampled completions end at different lengths: the overlong reward then differs within a
    group and the update has a signal (with every advantage 0 it would only move weights by rounding noise,
    which Adam scales up to ~lr)."""
    from grpo.models.loading import load_checkpoint, save_model

    model, tokenizer = load_checkpoint(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id] = 12.0 * torch.randn(64, generator=g) / 8
    out_dir = tmp_path_factory.mktemp("eos") / "model"
    save_model(model, tokenizer, out_dir)
    return out_dir


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dvc_update_with_two_processes_writes_the_one_process_checkpoint(tmp_path, eos_prone_model_dir, lora):
    import pandas as pd

    from grpo.models.checkpoints import read_optimizer_state

    checkpoints = {}
    for nproc in (1, 2):
        params = small_params(eos_prone_model_dir, iterations=1, optim={"nproc_per_node": nproc, "bf16": False},
                              reward={"weights": {"overlong": 1.0}, "overlong_buffer": 5})
        if lora:  # only the adapter trains (B starts at 0); lr 1e-2 so that it moves as far as full lr 1e-3
            params["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
            params["optim"]["learning_rate"] = 1e-2
        project = make_project(tmp_path / f"nproc{nproc}", params)
        dvc(project, "repro", "update@1")
        checkpoints[nproc] = project / "data/checkpoints/1"
    rollouts = pd.read_parquet(checkpoints[1].parents[1] / "advantages/1.parquet")
    assert rollouts["completion_tokens"].nunique() > 2 and (rollouts["advantage"] != 0).sum() >= 6
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    one, two = (load_file(checkpoints[n] / weights) for n in (1, 2))
    if lora:  # the starting point: A as peft drew it (the same seed in both runs), B = 0
        assert not (checkpoints[1] / "model.safetensors").exists() and one.keys() == two.keys()
        base = {name: torch.zeros_like(t) if "lora_B" in name else t for name, t in one.items()}
    else:
        base = load_file(checkpoints[1].parent / "0/model.safetensors")
    assert one.keys() == two.keys() == base.keys()
    # float32: Adam divides each gradient by its own scale, so an element whose gradient is ~eps can move by a
    # visible fraction of lr when the ranks' sums round differently; bound the worst element and the whole
    diff = torch.cat([(two[k] - one[k]).flatten() for k in one])
    update = torch.cat([(one[k] - base[k]).flatten() for k in one])
    print(f"\nDVC, nproc_per_node 1 vs 2: largest weight difference {float(diff.abs().max()):.1e}, "
          f"|diff| / |update| {float(diff.norm() / update.norm()):.1e}, largest update {float(update.abs().max()):.1e}")
    for name in one:
        torch.testing.assert_close(two[name], one[name], **DVC_WEIGHT_TOL, msg=lambda m: f"{name}: {m}")
    assert diff.norm() <= DVC_RELATIVE_TOL * update.norm()
    assert update.abs().max() > 1e-3  # the update moved the weights (2 steps of lr 1e-3)
    assert sorted(p.name for p in (checkpoints[2] / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    moments = {n: read_optimizer_state(checkpoints[n])["state"] for n in (1, 2)}
    assert moments[1].keys() == moments[2].keys()
    for name in moments[1]:
        assert float(moments[1][name]["step"]) == float(moments[2][name]["step"]) == 2.0


def test_a_user_error_on_two_ranks_exits_2_with_one_error_line(tmp_path, tiny_model_dir):
    """pipeline.update with nproc_per_node 2 (it relaunches itself under torchrun) on advantages holding a NaN:
    every rank stops at the same step, rank 0 prints the one error line, the stage exits 2, no checkpoint."""
    import json
    import shutil
    import subprocess
    import sys

    import pyarrow as pa
    import yaml

    from grpo.contracts import ADVANTAGES, write_table
    from tests.project import ROOT, env

    policy_dir = tmp_path / "checkpoints/0"
    shutil.copytree(tiny_model_dir, policy_dir)
    (policy_dir / "checkpoint.json").write_text(json.dumps({"checkpoint_id": "base", "iteration": 0}))
    rollouts = _rollouts()
    rows = []
    for i in range(8):
        rows.append({"iteration": 1, "prompt_id": "p", "group_id": "1-p", "sample_index": i, "prompt": "q",
                     "completion": "a", "prompt_token_ids": rollouts.prompt_ids[i],
                     "completion_token_ids": rollouts.completion_ids[i],
                     "completion_logprobs": rollouts.sampler_logprobs[i], "finish_reason": "stop",
                     "completion_tokens": len(rollouts.completion_ids[i]), "ground_truth": "1", "data_source": "t",
                     "checkpoint_id": "base", "backend": "hf", "temperature": 0.7, "top_p": 1.0, "seed": 0,
                     "reward": 1.0, "reward_error": None, "group_reward_mean": 0.5, "group_reward_std": 0.5,
                     "advantage": float("nan") if i == 5 else 1.0, "kept": True})
    advantages = tmp_path / "advantages.parquet"
    write_table(pa.Table.from_pylist(rows, schema=ADVANTAGES.schema), advantages, ADVANTAGES)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["optim"].update(nproc_per_node=2, minibatch_size=8, micro_batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "checkpoints/1"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.update", "--params", str(tmp_path / "params.yaml"), "--iteration", "1",
         "--policy", str(policy_dir), "--reference", str(policy_dir), "--advantages", str(advantages),
         "--out", str(out), "--metrics", str(tmp_path / "update.json")],
        cwd=ROOT, env=env() | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error: update step 1: loss is nan") == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not out.exists() and not list(out.parent.glob(".1.*.tmp"))
    assert not (tmp_path / "update.json").exists()
