"""Several processes for one update: torchrun starts them, FSDP2 shards the policy across them.

    world = start("auto")          # under torchrun: join the process group (nccl on CUDA, gloo on the CPU)
    shard_model(policy, world)     # FSDP2: each decoder layer, then the root
    ...                            # grpo.algorithm.trainer: rank r trains on minibatch[r::W] of each minibatch
    weights = full_state_dict(policy, world)   # rank 0: the whole state dict on the CPU; other ranks: {}
    stop(world)

A 1-process run (no torchrun) has no process group and no sharding: every collective here is then the
identity, so the 1-process update runs exactly the code it ran before ranks existed.

`relaunch` is how the update stage gets its ranks: `python -m pipeline.update ...` with
optim.nproc_per_node N > 1 runs itself again as `torchrun --standalone --nproc-per-node N -m pipeline.update ...`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from grpo.models.loading import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int  # this process, 0..size-1 (rank 0 writes the checkpoint and the metrics)
    size: int  # processes taking part in the update
    device: torch.device  # this process's device (cuda:<local rank> on a GPU machine)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets WORLD_SIZE, RANK and LOCAL_RANK for each process it starts."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def start(device: str) -> World:
    """This process's place in the update. Under torchrun: join the process group (NCCL on CUDA, gloo on the
    CPU) and take GPU LOCAL_RANK; otherwise a world of one on `device` (train.device: auto | cpu | cuda)."""
    kind = resolve_device(device)
    if not under_torchrun():
        return World(0, 1, kind)
    local_rank = int(os.environ["LOCAL_RANK"])
    if kind.type == "cuda":
        kind = torch.device("cuda", local_rank)
        torch.cuda.set_device(kind)
    dist.init_process_group("nccl" if kind.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), kind)


def stop(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ---- collectives (the identity in a world of one) -----------------------------------------------------


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """sum_r x_r over the ranks, in place; returned for chaining."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj: Optional[T]) -> T:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ---- FSDP2 ------------------------------------------------------------------------------------------


def shard_model(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """FSDP2 (fully_shard) over all ranks: each decoder layer (the model's `_no_split_modules` classes) is one
    unit, the root holds the rest (embeddings, final norm, lm_head; tied weights stay tied), each rank's shards
    on its device. A world of one: the whole model moved to the device.

    FSDP2 averages the ranks' gradients (reduce-scatter mean, (1/W) sum_r g_r); grpo.algorithm.trainer scales each
    rank's loss by W so that the result is the sum, the 1-process gradient."""
    if world.size == 1:
        return model.to(world.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))  # on the CPU: a gloo mesh of the CPU processes
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: torch.nn.Module, world: World) -> Optional[dict]:
    """The whole (unsharded) weights of a sharded model, gathered onto rank 0's CPU (collective: every rank
    calls it; the other ranks get {}). None in a world of one: the model's own state dict is whole."""
    if world.size == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # frozen parameters (a LoRA adapter's base) are not part of the checkpoint: not gathered
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    # a tied weight (lm_head = embed_tokens) is one parameter under two names: keep its first name only, as
    # save_pretrained does with an unsharded model's (shared) tensors
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in names}


# ---- torchrun ---------------------------------------------------------------------------------------


def relaunch(module: str, argv: Sequence[str], nproc_per_node: int) -> int:
    """Run `python -m <module> <argv>` as nproc_per_node processes on this machine under torchrun
    (torch.distributed.run --standalone: rendezvous on a free local port), in a child process whose output
    goes to this process's sys.stdout / sys.stderr (so a worker relays it to the stage). Returns the exit
    status: the first failed rank's (so that a user error, exit status 2, stays exit status 2), else 0.
    An exception here (a cancelled stage) kills the ranks."""
    import signal
    import subprocess
    import sys
    import threading

    # torchrun gives each process 1 CPU thread unless told otherwise; share the cores out instead
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    command = [sys.executable, "-c", "import sys, grpo.distributed as d; sys.exit(d.torchrun(sys.argv[1:]))",
               str(nproc_per_node), "--module", module, *argv]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)  # its own group: the ranks leave with it

    def copy(source, sink) -> None:
        while chunk := source.read1(65536):
            sink.write(chunk.decode(errors="replace"))
            sink.flush()

    copies = [threading.Thread(target=copy, args=(child.stdout, sys.stdout), daemon=True),
              threading.Thread(target=copy, args=(child.stderr, sys.stderr), daemon=True)]
    for thread in copies:
        thread.start()
    try:
        status = child.wait()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        for thread in copies:
            thread.join(timeout=10)
    return status


def torchrun(argv: Sequence[str]) -> int:
    """relaunch's child: `torchrun --standalone --nproc-per-node argv[0] argv[1:]`; the first failed rank's exit
    status, else 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={argv[0]}", *argv[1:]])
    try:
        run(args)
    except ChildFailedError as e:
        codes = [failure.exitcode for _, failure in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0
