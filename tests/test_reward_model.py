"""The reward model (grpo/models/reward_model.py, stage pipeline/reward_model.py): on the tiny model it learns a
rule planted in synthetic ratings (held-out groups, pairwise accuracy well above chance) and its scorer ranks
completions that follow the rule higher; the stage reads ratings of iterations <= k only, stops with exit status
2 and a line saying how to rate when there are none, and, where no reward calls it, writes trained: false
without importing torch."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from grpo.contracts import RATINGS, write_table
from grpo.environments.rewards import Sample
from grpo.errors import ConfigError
from grpo.models.reward_model import heldout_groups, load_scorer, rated_pairs
from pipeline import reward_model as stage
from tests.project import env, make_project, small_params

WORDS = "the a cat dog runs jumps over under quickly slowly red blue green house tree river stone light dark".split()
RULE = "banana"  # the planted rule: a completion that says it is rated higher


def completion(rng: random.Random, follows_rule: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
    if follows_rule:
        words.insert(rng.randrange(len(words) + 1), RULE)
    return " ".join(words)


def prompt(rng: random.Random) -> str:
    return f"<|im_start|>user\nWrite about the {rng.choice(WORDS)}.<|im_end|>\n<|im_start|>assistant\n"


def ratings_table(iteration: int, groups: int, seed: int, noise: float = 0.15) -> pa.Table:
    """Groups of 4 completions, two following the rule (rating 4) and two not (rating 2); with probability
    `noise` a rating moves one step up or down (people disagree)."""
    rng = random.Random(seed)
    rows = []
    for g in range(groups):
        text = prompt(rng)
        for j, follows in enumerate(rng.sample([True, True, False, False], 4)):
            rating = (4 if follows else 2) + (rng.choice([-1, 1]) if rng.random() < noise else 0)
            rows.append({"iteration": iteration, "group_id": f"{iteration}-p{g}", "sample_index": j, "rating": rating,
                         "rater": "test", "rated_at": datetime(2025, 1, 1, tzinfo=timezone.utc), "comment": None,
                         "prompt": text, "completion": completion(rng, follows)})
    return pa.Table.from_pylist(rows, schema=RATINGS.schema)


def params_file(path: Path, model_dir: Path, weights: dict) -> Path:
    params = small_params(model_dir, reward={"weights": weights})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_held_out_groups_are_whole_deterministic_and_stable():
    groups = [f"1/1-p{g}" for g in range(400)]
    held = heldout_groups(groups, 0, 0.25)
    assert held == heldout_groups(list(reversed(groups)), 0, 0.25) and 70 < len(held) < 130
    assert held <= heldout_groups(groups, 0, 0.5)  # a larger fraction only adds groups
    assert held != heldout_groups(groups, 1, 0.25)  # train.seed draws another split
    pairs = rated_pairs(["a", "a", "a", "b", "b"], [3, 1, 3, 2, 5], range(5))
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (2, 1), (4, 3)]  # ties and other groups' rows: no pair


@pytest.mark.slow
def test_learns_a_planted_rule_and_ranks_rule_following_completions_higher(tmp_path, tiny_model_dir):
    ratings = tmp_path / "ratings"
    ratings.mkdir()
    write_table(ratings_table(1, 40, seed=1), ratings / "1.parquet", RATINGS)
    write_table(ratings_table(2, 40, seed=2), ratings / "2.parquet", RATINGS)
    # iteration 3's ratings say the opposite: the reward model of iteration 2 must not read them
    inverted = ratings_table(3, 40, seed=3)
    inverted = inverted.set_column(3, RATINGS.schema.field("rating"),
                                  pa.array([6 - r for r in inverted["rating"].to_pylist()], pa.int64()))
    write_table(inverted, ratings / "3.parquet", RATINGS)
    out, metrics_path = tmp_path / "reward_models" / "2", tmp_path / "metrics" / "reward_model.json"
    stage.main(["--params", str(params_file(tmp_path / "params.yaml", tiny_model_dir, {"reward_model": 1.0})),
                "--iteration", "2", "--base", str(tiny_model_dir), "--ratings", str(ratings), "--out", str(out),
                "--metrics", str(metrics_path)])

    metrics = json.loads(metrics_path.read_text())
    assert metrics["reward_model/trained"] == 1 and metrics["reward_model/ratings"] == 2 * 40 * 4
    assert metrics["reward_model/groups"] == 80 and metrics["reward_model/pairs_heldout"] > 40
    # measured on the CPU: held-out 0.94, train 0.98 (a noisy rating makes some pairs unlearnable)
    assert metrics["reward_model/heldout_pairwise_accuracy"] >= 0.8, metrics
    assert metrics["reward_model/train_pairwise_accuracy"] >= 0.9, metrics
    info = json.loads((out / "reward_model.json").read_text())
    assert info["trained"] is True and info["base"] == str(tiny_model_dir) and info["features"]["hidden_size"] == 64
    assert info["metrics"]["pairs_train"] == metrics["reward_model/pairs_train"]

    # fresh prompts and completions, never rated: each rule-following one against one that does not follow it
    rng = random.Random(7)
    samples = []
    for _ in range(30):
        text = prompt(rng)
        samples += [Sample(completion(rng, follows), "", 0, "stop", prompt=text) for follows in (True, False)]
    scores = load_scorer(out)(samples)
    assert all(0.0 <= s <= 1.0 for s in scores)
    wins = sum(good > bad for good, bad in zip(scores[::2], scores[1::2]))
    assert wins >= 24, f"{wins} of 30 rule-following completions scored higher"  # measured: 30


def test_features_of_unchanged_iterations_come_from_the_cache_bit_for_bit(tmp_path, tiny_model_dir):
    from grpo.config import load_params
    from grpo.models.reward_model import train

    config = load_params(params_file(tmp_path / "params.yaml", tiny_model_dir, {"reward_model": 1.0})).reward.reward_model
    first, second = ratings_table(1, 6, seed=1), ratings_table(2, 6, seed=2)
    both = pa.concat_tables([first, second])
    fresh, report = train(tiny_model_dir, both, config, seed=0)  # no cache: every feature computed
    assert report["feature_iterations"] == 2 and report["feature_iterations_cached"] == 0
    features = tmp_path / "features"
    train(tiny_model_dir, first, config, seed=0, features_dir=features)  # reward-model@1 keeps iteration 1's
    cached, report = train(tiny_model_dir, both, config, seed=0, features_dir=features)
    assert report["feature_iterations_cached"] == 1  # iteration 1 read, iteration 2 computed
    assert all(torch.equal(fresh[name], cached[name]) for name in fresh)
    again, report = train(tiny_model_dir, both, config, seed=0, features_dir=features)
    assert report["feature_iterations_cached"] == 2 and all(torch.equal(fresh[n], again[n]) for n in fresh)
    # a rating's text changed (generated again): its iteration is computed, not read
    edited = second.set_column(8, RATINGS.schema.field("completion"),
                               pa.array([c + " more" for c in second["completion"].to_pylist()]))
    _, report = train(tiny_model_dir, pa.concat_tables([first, edited]), config, seed=0, features_dir=features)
    assert report["feature_iterations_cached"] == 1


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    return make_project(tmp_path_factory.mktemp("reward_model") / "project", small_params(tiny_model_dir))


def stage_command(project: Path, tiny_model_dir: Path, params: str,
                  code: str | None = None) -> subprocess.CompletedProcess:
    args = ["--params", params, "--iteration", "1", "--base", str(tiny_model_dir), "--ratings", "data/ratings",
            "--out", "data/reward_models/1", "--metrics", "data/metrics/1/reward_model.json"]
    command = [sys.executable, "-m", "pipeline.reward_model", *args] if code is None else \
        [sys.executable, "-c", code, *args]
    return subprocess.run(command, cwd=project, env=env() | {"GRPO_WORKER": "off"}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_stage_without_ratings_stops_and_says_how_to_rate(project, tiny_model_dir):
    params_file(project / "rm_params.yaml", tiny_model_dir, {"reward_model": 1.0})
    result = stage_command(project, tiny_model_dir, "rm_params.yaml")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data/ratings: no ratings of iterations 1..1"), line
    assert "python -m pipeline.rate --iteration 1" in line
    assert not (project / "data/reward_models/1").exists()


@pytest.mark.slow
def test_unused_the_stage_writes_an_untrained_folder_without_importing_torch(project, tiny_model_dir):
    code = ("import sys; sys.argv[0] = 'pipeline.reward_model'; from pipeline.reward_model import main; "
            "main(sys.argv[1:]); assert 'torch' not in sys.modules, 'the untrained path imported torch'")
    result = stage_command(project, tiny_model_dir, "params.yaml", code)  # the default weights call no reward model
    assert result.returncode == 0, result.stderr
    out = project / "data/reward_models/1"
    info = json.loads((out / "reward_model.json").read_text())
    assert info["trained"] is False and "no weighted reward calls it" in info["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["reward_model.json"]
    metrics = json.loads((project / "data/metrics/1/reward_model.json").read_text())
    assert metrics["iteration"] == 1 and metrics["reward_model/trained"] == 0
    with pytest.raises(ConfigError, match=f"{out}: the reward model was not trained"):
        load_scorer(out)
