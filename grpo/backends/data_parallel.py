"""Data-parallel rollouts: D replicas of a backend, each in its own process on its own devices.

    backend = make_backend("vllm", model_dir, data_parallel_size=2, tensor_parallel_size=2)   # 4 GPUs
    groups = backend.generate(prompts, spec, seeds)   # the same groups, in the same order, as one replica gives
    backend.close()

vLLM's offline `LLM` refuses data_parallel_size > 1 in one process; its own multi-process recipe adds an
expert-parallel coordinator that dense models do not need. Here each replica is a separate engine: replica d
sees GPUs [d * tp, (d + 1) * tp) through CUDA_VISIBLE_DEVICES (set before the replica imports torch), and gets
a contiguous slice of the prompts. Every request carries its own seed (grpo.backends.batches.request_seed), so a
prompt's completions do not depend on which replica samples it or on what else is in its batch: the result
is the one-replica result, which keeps DVC's cached rollouts valid whatever D is.

Replicas are spawned (never forked: a forked CUDA context or OpenMP pool is unusable) and are not daemons,
because a vLLM engine starts processes of its own. Each replica closes its backend (and so its engine's
processes) when told to; close() kills a replica that does not exit in time.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Sequence

from grpo.backends.base import Group, SamplingSpec
from grpo.errors import ConfigError

READY_TIMEOUT_S = 900.0  # a replica's engine start: model load, KV-cache sizing, (CUDA graphs)
EXIT_TIMEOUT_S = 60.0


def replica_devices(replica: int, devices_per_replica: int) -> str:
    """CUDA_VISIBLE_DEVICES of replica `replica`: its own block of devices_per_replica GPU indices."""
    first = replica * devices_per_replica
    return ",".join(str(i) for i in range(first, first + devices_per_replica))


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of n items over `parts` replicas, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for d in range(parts):
        stop = start + base + (d < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _replica_main(name: str, model_dir: str, options: dict, env: dict, conn) -> None:
    """One replica: build the backend, then answer generate requests until told to stop (None)."""
    os.environ.update(env)  # before the backend imports torch / vllm
    from grpo.backends import make_backend

    try:
        backend = make_backend(name, model_dir, **options)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    try:
        while (request := conn.recv()) is not None:
            prompts, sampling, seeds, progress = request
            try:
                conn.send(("ok", backend.generate(prompts, sampling, seeds, progress=progress)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        backend.close()


class DataParallelBackend:
    def __init__(self, name: str, model_dir: str, data_parallel_size: int, **options):
        if data_parallel_size < 2:
            raise ValueError(f"data_parallel_size must be >= 2 here, got {data_parallel_size}")
        self.name = name
        self.replicas: list[tuple[mp.Process, object]] = []
        devices_per_replica = int(options.get("tensor_parallel_size", 1))
        import torch  # the parent only counts the GPUs; it never initialises CUDA

        gpus = torch.cuda.device_count()
        if gpus and data_parallel_size * devices_per_replica > gpus:
            raise ConfigError(
                f"rollout.vllm: data_parallel_size {data_parallel_size} x tensor_parallel_size "
                f"{devices_per_replica} needs {data_parallel_size * devices_per_replica} GPUs; this machine has {gpus}")
        context = mp.get_context("spawn")
        try:
            for d in range(data_parallel_size):
                env = {"CUDA_VISIBLE_DEVICES": replica_devices(d, devices_per_replica)} if gpus else {}
                parent_end, child_end = context.Pipe()
                process = context.Process(target=_replica_main, name=f"rollout-replica-{d}",
                                          args=(name, str(model_dir), options, env, child_end), daemon=False)
                process.start()
                child_end.close()
                self.replicas.append((process, parent_end))
            for d, (_, conn) in enumerate(self.replicas):  # the replicas start their engines concurrently
                self._receive(d, conn, READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _receive(self, replica: int, conn, timeout: float | None):
        if timeout is not None and not conn.poll(timeout):
            raise RuntimeError(f"rollout replica {replica} did not answer within {timeout:.0f} s")
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError(f"rollout replica {replica} exited unexpectedly") from None
        if status == "error":
            raise RuntimeError(f"rollout replica {replica} failed:\n{payload}")
        return payload

    def generate(self, prompts: Sequence[str], sampling: SamplingSpec, seeds: Sequence[int],
                 progress: bool = True) -> list[Group]:
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        if not self.replicas:
            raise RuntimeError("generate: the data-parallel backend is closed")
        bounds = shard_bounds(len(prompts), len(self.replicas))
        for d, ((_, conn), (start, stop)) in enumerate(zip(self.replicas, bounds)):
            # one progress bar (replica 0's) rather than D interleaved ones
            conn.send((list(prompts[start:stop]), sampling, list(seeds[start:stop]), progress and d == 0))
        groups: list[Group] = []
        for d, (_, conn) in enumerate(self.replicas):
            groups.extend(self._receive(d, conn, None))
        return groups

    def close(self) -> None:
        """Stop every replica (each closes its own backend first). Safe to call twice."""
        replicas, self.replicas = self.replicas, []
        for process, conn in replicas:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process, conn in replicas:
            process.join(EXIT_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()

    def __enter__(self) -> "DataParallelBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
