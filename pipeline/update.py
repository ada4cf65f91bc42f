"""Stage update@k: one GRPO policy update from checkpoint k-1 (weights and AdamW state) on iteration k's
advantaged rollouts; writes checkpoint k. The frozen reference for the KL term is the base model.

    python -m pipeline.update --iteration 1 --policy data/checkpoints/0 --reference data/checkpoints/0 \
        --advantages data/advantages/1.parquet --out data/checkpoints/1 --metrics data/metrics/1/update.json

With optim.nproc_per_node N > 1 the command runs itself again under torchrun, as N processes on this
machine (`torchrun --standalone --nproc-per-node N -m pipeline.update <the same arguments>`): the policy and
the reference are sharded over them with FSDP2, each minibatch is split across them, rank 0 writes the
checkpoint and the metrics. Started under torchrun already (several machines: torchrun --nnodes ...), it
runs as the rank torchrun gave it.
"""

from __future__ import annotations

from pipeline.worker.client import delegate

if __name__ == "__main__":
    delegate("pipeline.update")  # a running worker (pipeline/worker/) runs the stage and this exits; else it runs here

import sys
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from grpo.config import load_params
from grpo.contracts import ADVANTAGES, read_table
from grpo.algorithm.trainer import Rollouts, UpdateConfig, grpo_update
from grpo.distributed import World, barrier, relaunch, start, stop, under_torchrun
from grpo.errors import USER_ERROR_EXIT, InputError, UserError
from grpo.models.atomic import write_json
from grpo.models.cache import CheckpointCache
from grpo.models.checkpoints import load_optimizer_state, load_trainer_state, save_checkpoint
from grpo.models.loading import checkpoint_info, resolve_device
from grpo.models.lora import describe_base, relative_base, trainable_parameters
from grpo.models.training import load_update_models
from pipeline.stage import iteration_parser, run, stage


def main(argv: list[str] | None = None, *, cache: CheckpointCache | None = None) -> None:
    """`cache`: a long-lived worker's checkpoints in memory (pipeline/worker/); None in a stage process."""
    args = iteration_parser(__doc__, policy="checkpoint k-1", reference="frozen reference model (the base)",
                            advantages="advantages Parquet of iteration k").parse_args(argv)
    params = load_params(args.params)
    nproc = params.optim.nproc_per_node
    if nproc > 1 and not under_torchrun():
        gpus = torch.cuda.device_count()
        if resolve_device(params.train.device).type == "cuda" and nproc > gpus:
            raise InputError(f"optim.nproc_per_node = {nproc} is not allowed; expected at most the {gpus} visible "
                             "CUDA devices (or train.device: cpu)")
        sys.exit(relaunch("pipeline.update", sys.argv[1:] if argv is None else argv, nproc))
    world = start(params.train.device)
    try:
        update(args, params, world, cache)
    except UserError as e:
        if world.size == 1:
            raise  # run() prints the error line
        # every rank stops at the same check (what it tests is all-reduced); rank 0 says why, once, and no rank
        # exits before it has (torchrun stops the others when one exits)
        if world.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        barrier()
        sys.exit(USER_ERROR_EXIT)
    finally:
        stop(world)


def update(args, params, world: World, cache: CheckpointCache | None) -> None:
    k, o, lcfg = args.iteration, params.optim, params.loss
    torch.manual_seed(params.train.seed * 1_000_003 + k)
    logged = stage(f"update@{k}", reads=[args.policy, args.advantages], writes=[args.out, args.metrics])
    with logged if world.is_main else nullcontext({}) as log:
        began = time.perf_counter()
        table = read_table(args.advantages, ADVANTAGES).to_pandas()
        table = table[table["kept"]].reset_index(drop=True)
        policy, reference, tokenizer, base = load_update_models(args.policy, args.reference, lora=params.model.lora,
                                                                optim=o, beta=lcfg.beta, world=world, cache=cache)
        # only what trains has AdamW moments: every weight, or (LoRA) the adapter's A and B
        # fused: one kernel over all parameters (CPU and CUDA; FSDP2's DTensors too), ~5x faster a step on this CPU
        optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=o.learning_rate, weight_decay=o.weight_decay,
                                      fused=True)
        # AdamW moments and the step count carry over between iterations; params.yaml's values win
        load_optimizer_state(optimizer, policy, args.policy, cache=cache, lr=o.learning_rate,
                             weight_decay=o.weight_decay)
        global_step = load_trainer_state(args.policy)["global_step"]
        load_seconds = time.perf_counter() - began  # the rollouts, the models and the AdamW state

        cfg = UpdateConfig(optim=o, loss=lcfg, temperature=params.rollout.temperature,
                           max_completion_tokens=params.rollout.max_new_tokens, seed=params.train.seed * 1_000_003 + k,
                           pad_id=tokenizer.pad_token_id, start_step=global_step)
        metrics = {}
        if len(table):
            rollouts = Rollouts(
                prompt_ids=table["prompt_token_ids"].map(list).tolist(),
                completion_ids=table["completion_token_ids"].map(list).tolist(),
                advantages=torch.tensor(table["advantage"].to_numpy()),
                sampler_logprobs=table["completion_logprobs"].map(list).tolist(),
                # TRL's mask_truncated_completions: a completion cut at max_new_tokens teaches nothing about
                # how to finish; it keeps its place in its group's advantage but leaves the loss
                in_loss=(table["finish_reason"] != "length").tolist() if lcfg.mask_truncated_completions else None,
            )
            bar = tqdm(total=len(table) * o.epochs, desc=f"update@{k}", unit="completion", disable=not world.is_main)
            metrics = grpo_update(policy, reference, optimizer, rollouts, cfg, device=world.device,
                                  progress=bar.update).metrics
            bar.close()
            if lcfg.mask_truncated_completions:
                metrics["num_truncated_masked"] = int((table["finish_reason"] == "length").sum())
        global_step += metrics.get("optimizer_steps", 0)
        trainer_state = {"iteration": k, "global_step": global_step, "torch_rng_state": torch.get_rng_state()}
        info = {"checkpoint_id": f"iter-{k}", "iteration": k, "parent": checkpoint_info(args.policy)["checkpoint_id"],
                "global_step": global_step}
        if base is not None:  # an adapter checkpoint names its base (checkpoint 0), relative to itself
            info["base"] = relative_base(base, args.out)
            describe_base(policy, info["base"])
        policy.eval()
        saving = time.perf_counter()
        # the last use of the policy and the optimizer: a worker keeps them as checkpoint k, uncopied
        save_checkpoint(args.out, policy, tokenizer, info, optimizer=optimizer, trainer_state=trainer_state, world=world,
                        cache=cache, hand_over=True)
        if not world.is_main:
            return
        metrics["time/update_save_seconds"] = time.perf_counter() - saving
        tokens = int(table["completion_tokens"].sum())
        seconds = time.perf_counter() - began
        metrics.update({"iteration": k, "global_step": global_step, "num_completions_trained": int(len(table)),
                        "time/update_seconds": seconds, "time/update_load_seconds": load_seconds,
                        "time/update_startup_seconds": log.startup_seconds,
                        "tokens/update_per_second": tokens * o.epochs / seconds})
        write_json(args.metrics, metrics)
        log.update(loss=f"{metrics.get('loss', 0.0):.4f}", kl=f"{metrics.get('kl', 0.0):.4f}",
                   grad_norm=f"{metrics.get('grad_norm', 0.0):.3f}", steps=metrics.get("optimizer_steps", 0),
                   processes=world.size)


if __name__ == "__main__":
    run(main)
