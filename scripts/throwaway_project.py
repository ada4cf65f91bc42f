"""A throwaway copy of the project (its own git + DVC repo) with small parameters and a tiny model, and DVC run
in it: for the tests and for scripts/prefect_screenshot.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# data/ratings: only its README (the folder is a dependency of reward-model@k and score@k; no one's ratings)
PROJECT_FILES = ["dvc.yaml", "params.yaml", "grpo", "pipeline", "flows", ".dvcignore", "data/raw", "data/ratings/README.md"]


def small_params(model_dir: Path, iterations: int = 2, **sections) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["source"] = str(model_dir)
    # full fine-tuning, whose every weight the checks compare; the default's LoRA adapter has its own project tests
    # (tests/test_lora.py: DVC, kill and resume, evaluation, export; tests/test_distributed.py: 2 ranks)
    params["model"]["lora"] = None
    params["prompts"].update(num_train=16, num_eval=6)
    params["rollout"].update(group_size=4, prompts_per_iteration=3, max_new_tokens=6)
    params["optim"].update(minibatch_size=6, micro_batch_size=3, learning_rate=1e-3, warmup_steps=0)
    params["eval"].update(max_new_tokens=6, batch_size=6, every=1)
    params["train"]["iterations"] = {str(k): k - 1 for k in range(1, iterations + 1)}
    for section, values in sections.items():
        params[section].update(values)
    return params


def make_project(dest: Path, params: dict) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    shutil.copy2(ROOT / ".dvc/config", dest / ".dvc/config")  # the project's cache settings (linked outputs)
    return dest


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DVC_NO_ANALYTICS="1")
    e["PYTHONPATH"] = ""  # stages import the copy's grpo/pipeline (cwd), not the checkout's
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    # the worker a stage starts (pipeline/worker/) leaves soon after its project's last stage
    e.setdefault("GRPO_WORKER_IDLE_SECONDS", "20")
    return e


def dvc(project: Path, *args: str, check: bool = True, timeout: float = 900,
        extra_env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], cwd=project, env=env() | (extra_env or {}), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM a process started with start_new_session=True and its children; SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_while_running(proc: subprocess.Popen, module: str, iteration: int, *, delay: float = 1.0,
                       timeout: float = 600) -> None:
    """SIGKILL the process group of `proc` (a `dvc repro` started with start_new_session=True) `delay` seconds
    after the stage command `python -m <module> --iteration <iteration>` has started under it: the kill hits a
    stage at work. (A kill while DVC itself writes .dvc/tmp/rwlock leaves that file empty and the next
    `dvc repro` refuses to start, a DVC bug, treeverse/dvc#7615; docs/troubleshooting.md.)"""
    import time

    import psutil

    def runs_it(cmd: list[str]) -> bool:
        pairs = set(zip(cmd, cmd[1:]))
        return ("-m", module) in pairs and ("--iteration", str(iteration)) in pairs

    deadline = time.time() + timeout
    while True:
        assert time.time() < deadline and proc.poll() is None, f"the run never started {module} @{iteration}"
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if runs_it(cmd):
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
        time.sleep(0.1)


def embedded_tokenizer():
    """SmolLM2's tokenizer: from the plain tokenizer folder GRPO_TOKENIZER_DIR when set (the GPU machine, where
    the embedded GGUF is absent: ../shared/device/prepare.sh writes one), else from the embedded GGUF."""
    from transformers import AutoTokenizer

    from grpo.models.loading import embedded_gguf

    if os.environ.get("GRPO_TOKENIZER_DIR"):
        return AutoTokenizer.from_pretrained(os.environ["GRPO_TOKENIZER_DIR"])
    gguf = embedded_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def make_tiny_model(out_dir: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo.models.loading import save_model

    tokenizer = embedded_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        # head_dim 32: the smallest head size vLLM's CPU attention supports
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    save_model(model, tokenizer, Path(out_dir))
    return Path(out_dir)
