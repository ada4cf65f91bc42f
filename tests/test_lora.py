"""LoRA end to end on the tiny model: adapter-only checkpoints on a base that is never copied, the base (the
adapter switched off) as the KL reference, evaluation of adapter checkpoints, resume after SIGKILL, caching,
export to a merged model. vLLM serving the adapter: tests/test_vllm_backend.py; two ranks: test_distributed.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpo.models.checkpoints import read_optimizer_state
from grpo.models.lora import ReferenceView, add_adapter
from grpo.models.loading import load_checkpoint
from tests.project import dvc, env, kill_while_running, make_project, same_rollouts, small_params

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "checkpoint.json", "optimizer", "trainer_state.pt"}


def lora_params(model_dir: Path, iterations: int = 2) -> dict:
    params = small_params(model_dir, iterations=iterations)
    params["model"]["lora"] = dict(LORA)
    params["optim"]["learning_rate"] = 1e-2  # B starts at 0: a larger step than full fine-tuning's
    return params


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_reference_is_the_base_with_the_adapter_switched_off(tiny_model_dir):
    base, _ = load_checkpoint(tiny_model_dir)
    expected = _logits(base, torch.tensor([[1, 2, 3, 4, 5]]))
    torch.manual_seed(0)
    policy = add_adapter(base, SimpleNamespace(**LORA))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert (_logits(policy, ids) - expected).abs().max() > 1e-2  # the adapter changes the policy
    torch.testing.assert_close(_logits(ReferenceView(policy), ids), expected, rtol=0, atol=0)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # nothing the reference computes can take a gradient (the adapter is off, the base frozen)
    assert not ReferenceView(policy)(input_ids=ids).logits.requires_grad



@pytest.fixture(scope="module")
def lora_project(tmp_path_factory, tiny_model_dir) -> Path:
    project = make_project(tmp_path_factory.mktemp("lora") / "project", lora_params(tiny_model_dir))
    dvc(project, "repro")
    return project


@pytest.mark.slow
def test_checkpoints_after_the_base_are_adapters_with_their_optimizer_state(lora_project):
    base = lora_project / "data/checkpoints/0"
    base_bytes = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    previous = None
    for k in (1, 2):
        folder = lora_project / f"data/checkpoints/{k}"
        assert {f.name for f in folder.iterdir()} == ADAPTER_FILES
        info = json.loads((folder / "checkpoint.json").read_text())
        assert info["base"] == "../0" and (folder / info["base"]).resolve() == base.resolve()
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "../0" and config["r"] == LORA["r"]
        assert config["target_modules"] == sorted(config["target_modules"])  # the same bytes in every run
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert size < 0.1 * base_bytes, (k, size, base_bytes)
        adapter = load_file(folder / "adapter_model.safetensors")
        assert adapter and all("lora_A" in n or "lora_B" in n for n in adapter)
        # B leaves 0 exactly when some completion so far had a nonzero advantage (with B = 0 the policy is the
        # reference: no KL gradient either). A tiny random model's rewards are often all 0; then B must stay 0.
        signal = any(pd.read_parquet(lora_project / f"data/advantages/{j}.parquet")["advantage"].abs().max() > 0
                     for j in range(1, k + 1))
        assert any(t.abs().max() > 0 for n, t in adapter.items() if "lora_B" in n) == signal, signal
        # AdamW state for the adapter's parameters and nothing else
        state = read_optimizer_state(folder)["state"]
        assert len(state) == len(adapter) and all("lora_" in name for name in state)
        if previous is not None and signal:
            assert any((adapter[n] - previous[n]).abs().max() > 0 for n in adapter)
        previous = adapter


@pytest.mark.slow
def test_evaluate_and_the_report_read_adapter_checkpoints(lora_project):
    for k in (0, 1, 2):
        metrics = json.loads((lora_project / f"data/metrics/{k}/evaluate.json").read_text())
        assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["eval/num_problems"] == 6
    assert (lora_project / "data/report").is_dir()


@pytest.mark.slow
def test_second_repro_runs_nothing(lora_project):
    out = dvc(lora_project, "repro").stdout
    assert "Running stage" not in out, out


@pytest.mark.slow
def test_killed_run_then_repro_reproduces_the_uninterrupted_run(lora_project, tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "killed", lora_params(tiny_model_dir))
    # stage processes (a worker's update of this tiny model can end within the kill's delay; tests/test_worker.py
    # kills a stage in the worker)
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=env() | {"GRPO_WORKER": "off"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_while_running(proc, "pipeline.update", 2)  # mid-update: the adapter checkpoint being written
    assert not (project / "data/checkpoints/2").exists()
    dvc(project, "repro")
    assert not list((project / "data").rglob("*.tmp"))
    if not same_rollouts(project / "data/rollouts/2.parquet", lora_project / "data/rollouts/2.parquet"):
        return  # a completion diverged (tests/project.py same_rollouts): the update trained on other data
    ours = load_file(project / "data/checkpoints/2/adapter_model.safetensors")
    theirs = load_file(lora_project / "data/checkpoints/2/adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-6, name


@pytest.mark.slow
def test_export_writes_a_merged_model_that_transformers_loads(lora_project, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint", "data/checkpoints/2", "--out", str(out)],
                   cwd=lora_project, env=env(), check=True, capture_output=True)
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(exported, "peft_config")
    AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False)
    base, _ = load_checkpoint(lora_project / "data/checkpoints/0")
    unmerged = PeftModel.from_pretrained(base, str(lora_project / "data/checkpoints/2"))
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    torch.testing.assert_close(_logits(exported, ids), _logits(unmerged, ids), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_an_adapter_checkpoint_without_model_lora_is_a_clear_error(lora_project, tmp_path):
    params = yaml.safe_load((lora_project / "params.yaml").read_text())
    params["model"]["lora"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.update", "--params", str(tmp_path / "params.yaml"), "--iteration", "3",
         "--policy", "data/checkpoints/2", "--reference", "data/checkpoints/0", "--advantages",
         "data/advantages/2.parquet", "--out", str(tmp_path / "3"), "--metrics", str(tmp_path / "m.json")],
        cwd=lora_project, env=env(), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "error: model.lora is null but data/checkpoints/2 is a LoRA adapter checkpoint" in result.stderr
    assert not (tmp_path / "3").exists()
