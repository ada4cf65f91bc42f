"""The whole GRPO loop as DVC stages, on a tiny model: outputs, contracts, caching, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from grpo.models.checkpoints import read_optimizer_state
from grpo.contracts import ADVANTAGES, PROMPTS, ROLLOUTS, SCORED, read_table
from tests.project import dvc, env, kill_while_running, make_project, same_rollouts, small_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory, tiny_model_dir) -> Path:
    project = make_project(tmp_path_factory.mktemp("dvc") / "project", small_params(tiny_model_dir, iterations=2))
    dvc(project, "repro")
    return project


def test_repro_writes_every_output_valid_against_its_contract(finished_project):
    p = finished_project
    prompts = read_table(p / "data/prompts.parquet", PROMPTS).to_pandas()
    assert set(prompts["split"]) == {"train", "eval"}
    for k in (1, 2):
        rollouts = read_table(p / f"data/rollouts/{k}.parquet", ROLLOUTS).to_pandas()
        assert len(rollouts) == 3 * 4 and rollouts["group_id"].nunique() == 3
        assert (rollouts["iteration"] == k).all()
        assert sorted(rollouts["sample_index"].unique()) == [0, 1, 2, 3]
        read_table(p / f"data/scored/{k}.parquet", SCORED)
        read_table(p / f"data/advantages/{k}.parquet", ADVANTAGES)
        checkpoint = p / f"data/checkpoints/{k}"
        assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.json").exists()
        import torch

        optimizer = read_optimizer_state(checkpoint)  # DCP shards in checkpoint/optimizer/
        assert optimizer["state"], "AdamW moments are saved"
        assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["iteration"] == k
        update = json.loads((p / f"data/metrics/{k}/update.json").read_text())
        for name in ("loss", "kl", "grad_norm", "learning_rate", "entropy", "clip_ratio/low_mean",
                     "clip_ratio/high_mean", "clip_ratio/region_mean", "sampling/logp_diff_mean"):
            assert name in update, name
    # iteration 2 samples from checkpoint 1
    assert set(pd.read_parquet(p / "data/rollouts/2.parquet")["checkpoint_id"]) == {"iter-1"}
    # the AdamW step counter carries over: iteration 2 continues iteration 1's optimizer
    import torch

    steps = [next(iter(read_optimizer_state(p / f"data/checkpoints/{k}")["state"].values()))["step"] for k in (1, 2)]
    assert float(steps[1]) == 2 * float(steps[0])
    history = pd.read_csv(p / "data/report/history.csv")
    assert list(history["iteration"]) == [0, 1, 2]
    assert {"reward", "reward_std", "frac_reward_zero_std", "kl", "eval/accuracy", "completions/mean_length"} <= set(history)
    assert (p / "data/report/reward.png").exists()
    shown = dvc(p, "metrics", "show", "--json").stdout
    assert "eval/accuracy" in shown and "rewards/correctness/mean" in shown


def test_outputs_are_links_into_the_cache_not_copies(finished_project):
    data = finished_project / "data"
    # the bulk of every iteration: weights, AdamW moments, and every Parquet table
    bulk = [*data.glob("checkpoints/*/model.safetensors"), *data.glob("checkpoints/*/optimizer/*.distcp"),
            *data.rglob("*.parquet")]
    assert len(bulk) >= 3 * 1 + 2 * 2 + 2 * 4, bulk
    copies = [str(f) for f in bulk if not f.is_symlink() and f.stat().st_nlink < 2]
    assert not copies, f"outputs copied instead of linked to the cache: {copies[:5]}"
    # DVC leaves a file as a copy when its content is already in the cache from another output (each
    # checkpoint repeats the tokenizer files) or when it is empty; those must stay a small share
    files = [f for f in data.rglob("*") if f.is_file() and "raw" not in f.parts and f.name != ".gitignore"]
    copied = sum(f.stat().st_size for f in files if f.stat().st_nlink < 2)
    assert copied < 0.15 * sum(f.stat().st_size for f in files), copied


def test_second_repro_runs_nothing(finished_project):
    out = dvc(finished_project, "repro").stdout
    assert "Running stage" not in out, out


def test_changing_a_reward_weight_reruns_scoring_onward_not_generation(finished_project, tmp_path):
    p = finished_project
    params = yaml.safe_load((p / "params.yaml").read_text())
    before = params["reward"]["weights"]["format"]
    params["reward"]["weights"]["format"] = 0.5
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(p, "status", "--json").stdout
    stale = set(json.loads(status))
    assert {"score@1", "score@2"} <= stale
    assert not any(s.startswith("generate@1") for s in stale)
    # restore for the other tests
    params["reward"]["weights"]["format"] = before
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert json.loads(dvc(p, "status", "--json").stdout) == {}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _what_differs(ours: Path, theirs: Path) -> str:
    """The inputs of the rollouts (checkpoint weights, prompts) by digest in both projects, and how each
    project's stages ran (the worker's log: loads from memory, restarts)."""
    lines = []
    for rel in ("data/prompts.parquet", "data/checkpoints/0/model.safetensors", "data/checkpoints/1/model.safetensors"):
        lines.append(f"{rel}: {_digest(ours / rel)[:12]} vs {_digest(theirs / rel)[:12]}")
    for name, project in (("resumed", ours), ("uninterrupted", theirs)):
        log = project / ".grpo/worker.log"
        kept = [line for line in (log.read_text().splitlines() if log.exists() else []) if line.startswith("worker:")]
        lines.append(f"{name} worker log:\n  " + "\n  ".join(kept))
    return "\n".join(lines)


def test_killed_stage_then_repro_reproduces_the_uninterrupted_run(finished_project, tmp_path, tiny_model_dir):
    project = make_project(tmp_path / "killed", small_params(tiny_model_dir, iterations=2))
    # stage processes (in a worker this tiny model's stages can end within the kill's delay; tests/test_worker.py
    # kills a stage in the worker); the resume below goes through the worker
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=env() | {"GRPO_WORKER": "off"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    kill_while_running(proc, "pipeline.generate", 2)  # the whole process group, iteration 2's generation at work
    assert not (project / "data/checkpoints/2").exists()
    # what a writer killed mid-write leaves: its temporaries beside the output (the kill above may or may not
    # have hit one; these make sure there are some)
    (project / "data/checkpoints/.2.killed.tmp").mkdir()
    (project / "data/checkpoints/.2.killed.tmp/model.safetensors").write_bytes(b"half a checkpoint")
    (project / "data/rollouts/.2.parquet.killed.tmp").write_bytes(b"half a table")
    # resume with no manual step: DVC's lock of the killed run is stale (its PID is gone), and each stage
    # removes the temporaries of its own outputs before writing them
    dvc(project, "repro")
    assert not list((project / "data").rglob("*.tmp")), "temporaries of the killed run are left"
    for rel in ("data/rollouts/1.parquet", "data/rollouts/2.parquet"):
        try:
            same = same_rollouts(project / rel, finished_project / rel)
        except AssertionError as e:
            raise AssertionError(f"{rel} differs from the uninterrupted run's\n{_what_differs(project, finished_project)}"
                                 f"\n{e}") from None
        if not same:  # a completion diverged (tests/project.py same_rollouts): what follows trained on other data
            print(f"{rel}: a completion diverged from the uninterrupted run's\n{_what_differs(project, finished_project)}")
            return
    ours = load_file(project / "data/checkpoints/2/model.safetensors")
    reference = load_file(finished_project / "data/checkpoints/2/model.safetensors")
    assert ours.keys() == reference.keys()
    for name in ours:
        assert (ours[name] - reference[name]).abs().max() <= 1e-6, name


def test_bad_input_fails_clearly_and_keeps_earlier_outputs(finished_project, tmp_path, tiny_model_dir):
    p = finished_project
    outputs = sorted(x for x in (p / "data").rglob("*") if x.is_file() and x.name != "inputs.ok")
    before = {x: _digest(x) for x in outputs}
    params = yaml.safe_load((p / "params.yaml").read_text())
    original = yaml.safe_dump(params, sort_keys=False)

    # a prompts file without its answer column
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "solution": "2"}\n{"question": "2+2?", "solution": "4"}\n')
    params["prompts"].update(source="file", path=str(bad))
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(p, "repro", check=False)
    assert result.returncode != 0
    assert f"{bad}: column 'answer' not found (prompts.answer_column); columns: question, solution" in result.stderr + result.stdout

    # an empty prompts file
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    params["prompts"].update(path=str(empty))
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(p, "repro", check=False)
    assert result.returncode != 0 and f"{empty}: the prompts file has no rows" in result.stderr + result.stdout

    # group size 1
    params = yaml.safe_load(original)
    params["rollout"]["group_size"] = 1
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(p, "repro", check=False)
    assert result.returncode != 0
    assert "rollout.group_size = 1 is not allowed; expected an integer >= 2" in result.stderr + result.stdout

    # nothing produced earlier was lost or overwritten: check-inputs stopped the run before any stage
    # that DVC would have cleared
    assert {x: _digest(x) for x in outputs if x.exists()} == before
    (p / "params.yaml").write_text(original)
    out = dvc(p, "repro").stdout
    # check-inputs comes back (from DVC's run-cache, or re-run); nothing else runs
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran in ([], ["Running stage 'check-inputs':"]), out
    assert json.loads(dvc(p, "status", "--json").stdout) == {}


def test_extending_the_run_runs_only_the_new_iteration(finished_project):
    p = finished_project
    result = subprocess.run([sys.executable, "-m", "pipeline.extend", "1"], cwd=p, env=env(), capture_output=True,
                            text=True, check=True)
    assert "train.iterations now 1..3" in result.stdout
    out = dvc(p, "repro").stdout
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    # check-inputs re-validates the changed params; its output is unchanged, so nothing old re-runs
    assert ran == ["advantages@3", "check-inputs", "evaluate@3", "generate@3", "report", "reward-model@3", "score@3",
                   "update@3"], out
    assert list(pd.read_csv(p / "data/report/history.csv")["iteration"]) == [0, 1, 2, 3]
