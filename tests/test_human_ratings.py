"""Human ratings as the reward: the ratings table and its checks, the `human` reward, the terminal and CSV ways to
rate (pipeline/rate.py), and DVC scoring from ratings (a missing rating stops with a message, a changed one
re-runs scoring onward, not generation)."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from grpo.config import load_params
from grpo.contracts import RATINGS, ROLLOUTS, read_table, write_table
from grpo.environments.human import (IterationRatings, iteration_ratings, normalized, read_csv_ratings, save_ratings,
                                     write_template)
from grpo.environments.rewards import RewardSettings, Sample, human_batch
from grpo.errors import ConfigError, InputError
from tests.project import ROOT, dvc, env, make_project, small_params

HUMAN = load_params(ROOT / "params.yaml").reward.human  # scale 1..5


def rollouts(groups: int = 2, n: int = 3) -> pa.Table:
    rows = [{"iteration": 1, "prompt_id": f"p{g}", "group_id": f"1-p{g}", "sample_index": j, "prompt": f"question {g}",
             "completion": f"answer {g}.{j}", "prompt_token_ids": [1], "completion_token_ids": [2],
             "completion_logprobs": [-1.0], "finish_reason": "stop", "completion_tokens": 1, "ground_truth": "1",
             "data_source": "test", "checkpoint_id": "base", "backend": "hf", "temperature": 1.0, "top_p": 1.0,
             "seed": 0, "metadata": None} for g in range(groups) for j in range(n)]
    return pa.Table.from_pylist(rows, schema=ROLLOUTS.schema)


def test_ratings_are_saved_checked_and_mapped_to_zero_one(tmp_path):
    table = rollouts()
    path = save_ratings(tmp_path, 1, table, HUMAN, {("1-p0", 0): (5, "clear"), ("1-p0", 1): (1, None)}, "ann")
    assert path == tmp_path / "1.parquet"
    saved = read_table(path, RATINGS).to_pandas()
    assert list(saved["rater"]) == ["ann", "ann"] and list(saved["completion"]) == ["answer 0.0", "answer 0.1"]
    # a second sitting adds ratings and replaces the earlier rating of the same completion
    save_ratings(tmp_path, 1, table, HUMAN, {("1-p0", 1): (3, None), ("1-p1", 2): (4, None)}, "bob")
    values = iteration_ratings(tmp_path, 1, table, HUMAN).values
    assert values == {("1-p0", 0): 1.0, ("1-p0", 1): 0.5, ("1-p1", 2): 0.75}
    assert normalized(HUMAN.min_rating, HUMAN) == 0.0 and normalized(HUMAN.max_rating, HUMAN) == 1.0


def test_a_second_writer_waits_for_the_first_and_both_ratings_are_kept(tmp_path):
    from filelock import FileLock

    table = rollouts()
    save_ratings(tmp_path, 1, table, HUMAN, {("1-p0", 0): (5, None)}, "ann")
    pq.write_table(table, tmp_path / "rollouts.parquet")
    other = subprocess.Popen(  # a terminal rater saving while the form's writer holds the lock
        [sys.executable, "-c", "import pyarrow.parquet as pq; from grpo.config import load_params; "
         "from grpo.environments.human import save_ratings; "
         f"save_ratings({str(tmp_path)!r}, 1, pq.read_table({str(tmp_path / 'rollouts.parquet')!r}), "
         f"load_params({str(ROOT / 'params.yaml')!r}).reward.human, {{('1-p1', 2): (2, None)}}, 'bob')"],
        cwd=ROOT, env=env() | {"PYTHONPATH": str(ROOT)})
    with FileLock(str(tmp_path / ".1.lock")):
        earlier = read_table(tmp_path / "1.parquet", RATINGS).to_pylist()  # the form's read ...
        time.sleep(3)  # ... while the other writer starts and waits
        assert other.poll() is None
        rows = earlier + [dict(earlier[0], group_id="1-p0", sample_index=1, rating=4, completion="answer 0.1")]
        write_table(pa.Table.from_pylist(rows, schema=RATINGS.schema), tmp_path / "1.parquet", RATINGS)
    assert other.wait(timeout=60) == 0
    assert iteration_ratings(tmp_path, 1, table, HUMAN).values == {("1-p0", 0): 1.0, ("1-p0", 1): 0.75,
                                                                   ("1-p1", 2): 0.25}


@pytest.mark.parametrize("change,message", [
    ({"rating": 9}, "row 1, column 'rating': 9 is outside reward.human's scale 1..5"),
    ({"sample_index": 0}, "row 1, columns 'group_id', 'sample_index': '1-p0' sample 0 is rated again (first in row 0)"),
    ({"group_id": "1-p7"}, "row 1, columns 'group_id', 'sample_index': '1-p7' sample 1 is not a completion of iteration 1"),
    ({"completion": "something else"}, "row 1, column 'completion': not the text of '1-p0' sample 1"),
    ({"iteration": 2}, "row 1, column 'iteration': 2 is not iteration 1"),
])
def test_a_bad_rating_is_named_by_file_row_and_column(tmp_path, change, message):
    table = rollouts()
    path = save_ratings(tmp_path, 1, table, HUMAN, {("1-p0", 0): (5, None), ("1-p0", 1): (2, None)}, "ann")
    frame = pd.read_parquet(path)
    for column, value in change.items():
        frame.loc[1, column] = value
    frame.to_parquet(path)
    with pytest.raises(InputError) as e:
        iteration_ratings(tmp_path, 1, table, HUMAN)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


def test_the_human_reward_never_scores_an_unrated_completion_zero():
    values = {("1-p0", 0): 1.0, ("1-p0", 1): 0.25}
    ratings = IterationRatings(1, "data/ratings/1.parquet", values)
    samples = [Sample(f"c{j}", "1", 1, "stop", key=("1-p0", j)) for j in range(3)]
    reward = load_params(ROOT / "params.yaml").reward
    stop = RewardSettings(reward, 8, ratings=ratings)
    with pytest.raises(InputError) as e:
        human_batch(samples, stop)
    assert "data/ratings/1.parquet: 1 of 3 completions of iteration 1 (1 groups) await ratings" in str(e.value)
    assert "python -m pipeline.rate --iteration 1" in str(e.value)
    model = dataclasses.replace(reward, human=dataclasses.replace(reward.human, unrated="model"))
    with pytest.raises(ConfigError, match="needs a trained reward model"):
        human_batch(samples, RewardSettings(model, 8, ratings=ratings))
    scored = human_batch(samples, RewardSettings(model, 8, ratings=ratings, reward_model=lambda s: [0.6] * len(s)))
    assert scored == [1.0, 0.25, 0.6]


def test_a_csv_template_filled_in_is_imported(tmp_path):
    table = rollouts(groups=5)
    assert write_template(tmp_path / "t.csv", table, HUMAN) == HUMAN.groups_per_iteration * 3
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    for i, row in enumerate(rows):
        row["rating"] = str(1 + i % 5) if i != 2 else ""  # one left empty: skipped, not a zero
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ratings = read_csv_ratings(tmp_path / "t.csv", HUMAN)
    assert len(ratings) == len(rows) - 1 and ratings["1-p0", 0] == (1, None)
    rows[3]["rating"] = "great"
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(InputError, match=r"t.csv: line 5, column 'rating': 'great' is not an integer 1..5"):
        read_csv_ratings(tmp_path / "t.csv", HUMAN)


# ---------------------------------------------------------------------------------------------- with DVC


@pytest.fixture(scope="module")
def human_project(tmp_path_factory, tiny_model_dir):
    params = small_params(tiny_model_dir, iterations=1)
    params["reward"]["weights"] = {"correctness": 1.0, "human": 1.0}
    params["reward"]["human"]["groups_per_iteration"] = params["rollout"]["prompts_per_iteration"]
    project = make_project(tmp_path_factory.mktemp("human") / "project", params)
    dvc(project, "repro", "generate@1")
    return project


def rate(project, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.rate", "--iteration", "1", *args], cwd=project, env=env(),
                          input=stdin, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_scoring_stops_until_rated_then_reads_the_ratings(human_project):
    p = human_project
    result = dvc(p, "repro", "score@1", check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "error: data/ratings/1.parquet: 12 of 12 completions of iteration 1 (3 groups) await ratings" in out, out
    assert (p / "data/rollouts/1.parquet").exists() and not (p / "data/scored/1.parquet").exists()

    # the terminal: the first group rated (5, 4, skip, 1), then quit; the ratings of that group are saved
    done = rate(p, "--rater", "ann", stdin="5\n\n4\nshort\ns\n1\n\nq\n")
    assert done.returncode == 0, done.stderr
    assert "saved 3 rating(s) to data/ratings/1.parquet" in done.stdout
    assert "1 of the 3 groups" not in rate(p, "--status").stdout

    # the rest from a CSV
    assert rate(p, "--template", "todo.csv").returncode == 0
    rows = list(csv.DictReader(open(p / "todo.csv")))
    assert len(rows) == 12
    for row in rows:
        row["rating"] = "3"
    with open(p / "todo.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    imported = rate(p, "--import", "todo.csv", "--rater", "bob")
    assert imported.returncode == 0 and "imported 12 rating(s)" in imported.stdout, imported.stderr
    dvc(p, "repro", "score@1")
    scored = pd.read_parquet(p / "data/scored/1.parquet")
    assert (scored["reward_human"] == 0.5).all()  # 3 on 1..5
    assert (scored["reward"] == scored["reward_correctness"] + scored["reward_human"]).all()
    metrics = json.loads((p / "data/metrics/1/score.json").read_text())
    assert metrics["human/rated"] == 12 and metrics["rewards/human/mean"] == 0.5
    # save_ratings' lock file is no rating: .dvcignore keeps it out of the folder's hash
    (p / "data/ratings/.1.lock").write_text("held by a writer")
    assert "score@1" not in json.loads(dvc(p, "status", "score@1", "--json").stdout)

    # a changed rating re-runs scoring onward, not generation
    save = (f"from grpo.environments.human import save_ratings; from grpo.contracts import ROLLOUTS, read_table; "
            f"from grpo.config import load_params; t = read_table('data/rollouts/1.parquet', ROLLOUTS); "
            f"save_ratings('data/ratings', 1, t, load_params().reward.human, {{(t['group_id'][0].as_py(), 0): (5, None)}}, 'cy')")
    subprocess.run([sys.executable, "-c", save], cwd=p, env=env(), check=True)
    stale = set(json.loads(dvc(p, "status", "--json").stdout))
    assert "score@1" in stale and not any(s.startswith("generate@") for s in stale), stale
    dvc(p, "repro", "score@1")
    scored = pd.read_parquet(p / "data/scored/1.parquet")
    assert sorted(scored["reward_human"])[-1] == 1.0


@pytest.mark.slow
def test_an_out_of_scale_csv_rating_is_refused_and_nothing_is_lost(human_project, tmp_path):
    p = human_project
    before = (p / "data/ratings/1.parquet").read_bytes() if (p / "data/ratings/1.parquet").exists() else None
    rows = read_table(p / "data/rollouts/1.parquet", ROLLOUTS).select(["group_id", "sample_index"]).to_pylist()
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["group_id", "sample_index", "rating"])
        writer.writeheader()
        writer.writerows([{**rows[0], "rating": 4}, {**rows[1], "rating": 6}])
    result = rate(p, "--import", str(tmp_path / "bad.csv"))
    assert result.returncode == 2
    assert f"error: {tmp_path / 'bad.csv'}: line 3, column 'rating': 6 is outside reward.human's scale 1..5" in result.stderr
    after = (p / "data/ratings/1.parquet").read_bytes() if (p / "data/ratings/1.parquet").exists() else None
    assert after == before


def test_params_refuse_a_budget_that_leaves_groups_unrated(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["reward"]["weights"]["human"] = 1.0
    params["rollout"]["prompts_per_iteration"] = 8
    params["reward"]["human"]["groups_per_iteration"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="reward.human.groups_per_iteration = 4 is not allowed; expected an integer >= "
                                          r"rollout.prompts_per_iteration \(8\) with reward.human.unrated stop"):
        load_params(tmp_path / "params.yaml")
    params["reward"]["human"]["unrated"] = "model"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_params(tmp_path / "params.yaml").reward.human.unrated == "model"
