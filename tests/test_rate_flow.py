"""Rating an iteration's completions in the Prefect UI (flows/rate_flow.py), against a real Prefect server on a
loopback port (UI on) and a throwaway project on the tiny model whose reward is people's ratings: the rating
flow pauses on its form, the form's schema and text read through the API, an answer off the scale refused by the
server, the answers given through the API's resume written to data/ratings/1.parquet, then scored by
`dvc repro score@1`; the form in headless Chromium; the training flow waiting on its rating subflow.

One project and one server for the module, used in the order of the tests (the fixtures chain: generated ->
unrated score -> paused -> refused -> resumed -> scored)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows.grpo_flow import stage_plan, with_rating_steps
from grpo.config import load_params
from grpo.contracts import RATINGS, ROLLOUTS, read_table
from grpo.environments.human import groups_to_rate, normalized
from scripts.prefect_screenshot import INSTALL_CHROMIUM, chromium_path, screenshot_rating_form
from tests.prefect_server import STATE_TIMEOUT, Server, prefect_env
from tests.project import ROOT, dvc, make_project, small_params, stop_process_group

pytestmark = pytest.mark.slow

PROCESS_TIMEOUT = 600.0  # a rating flow process ends once resumed (imports on a loaded machine: a minute)
SCREENSHOT_SIZE = (1400, 1000)


def human_params(model_dir: Path) -> dict:
    """small_params with people's ratings as the only reward, every group of an iteration to rate."""
    params = small_params(model_dir, iterations=1)
    params["reward"]["weights"] = {"human": 1.0}
    params["reward"]["human"]["groups_per_iteration"] = params["rollout"]["prompts_per_iteration"]
    return params


def grpo_rate_runs(server: Server) -> dict[str, dict]:
    return {r["id"]: r for r in server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["grpo-rate"]}},
                                                                    "limit": 200})}


def wait_paused(server: Server, before: set[str], proc: subprocess.Popen, log: Path) -> dict:
    """The one new grpo-rate flow run, once it is Paused on its form."""
    deadline = time.monotonic() + STATE_TIMEOUT
    while True:
        new = [r for i, r in grpo_rate_runs(server).items() if i not in before]
        assert len(new) <= 1, new
        if new and new[0]["state_type"] == "PAUSED":
            return new[0]
        assert proc.poll() is None, f"the process ended ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, (f"no paused grpo-rate run after {STATE_TIMEOUT:.0f}s "
                                             f"({[r['state_type'] for r in new]}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def run_input(server: Server, flow_run: dict, key: str):
    """A value the paused run stored for its form: its schema or its description."""
    keyset = flow_run["state"]["state_details"]["run_input_keyset"]
    return server.get(f"/flow_runs/{flow_run['id']}/input/{keyset[key]}")


def resume(server: Server, flow_run_id: str, answers: dict) -> dict:
    """POST /flow_runs/{id}/resume with a run_input, as the UI's Submit does; not retried (not idempotent)."""
    return server.request("POST", f"/flow_runs/{flow_run_id}/resume", {"run_input": answers}, retry=False)


def rating_of(group: int, completion: int) -> int:
    """The rating the test gives completion j of group i of the form: every value of the 1..5 scale comes up."""
    return 1 + (group + completion) % 5


def answers_for(schema: dict, rater: str = "test rater") -> dict:
    """A filled form: rating_of for every rating field, one comment."""
    answers = {"rater": rater}
    for name in schema["properties"]:
        if name != "rater" and not name.endswith("_comment"):
            group, completion = (int(x) for x in name.removeprefix("g").split("_c"))
            answers[name] = rating_of(group, completion)
    answers["g1_c2_comment"] = "  stops too early  "
    return answers


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("prefect-rate") / "home", ui=True)  # the UI for the browser test
    yield s
    s.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    project = make_project(tmp_path_factory.mktemp("rate") / "project", human_params(tiny_model_dir))
    dvc(project, "repro", "generate@1")
    return project


@pytest.fixture(scope="module")
def to_rate(project) -> pd.DataFrame:
    """The completions the form asks for, with their form numbers (group i, completion j)."""
    rollouts = read_table(project / "data/rollouts/1.parquet", ROLLOUTS)
    human = load_params(project / "params.yaml").reward.human
    groups = groups_to_rate(rollouts, human)
    df = rollouts.to_pandas()
    df = df[df["group_id"].isin(groups)].copy()
    df["form_group"] = df["group_id"].map({g: i for i, g in enumerate(groups, 1)})
    df["form_completion"] = df["sample_index"] + 1
    return df.sort_values(["form_group", "form_completion"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def unrated_score(project) -> subprocess.CompletedProcess:
    """`dvc repro score@1` before anyone rated."""
    return dvc(project, "repro", "score@1", check=False)


@pytest.fixture(scope="module")
def paused(server, project, unrated_score, tmp_path_factory):
    """`python -m flows.rate_flow --iteration 1` running against the server, its flow run paused on the form."""
    log = tmp_path_factory.mktemp("rate-cli") / "rate.log"
    before = set(grpo_rate_runs(server))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.rate_flow", "--iteration", "1", "--poll-seconds", "1"],
                                cwd=project, env=server.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc, wait_paused(server, before, proc, log), log
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def refused(server, project, paused) -> list[dict]:
    """Answers the server refuses: a rating off the scale, a form without a rating."""
    _, flow_run, _ = paused
    answers = answers_for(run_input(server, flow_run, "schema"))
    off_scale = resume(server, flow_run["id"], {**answers, "g1_c1": 6})
    missing = resume(server, flow_run["id"], {k: v for k, v in answers.items() if k != "g2_c3"})
    return [off_scale, missing]


@pytest.fixture(scope="module")
def resumed(server, project, paused, refused) -> tuple[dict, subprocess.Popen, str]:
    """The form answered through the API's resume; the answers, the ended process and its output."""
    proc, flow_run, log = paused
    answers = answers_for(run_input(server, flow_run, "schema"))
    response = resume(server, flow_run["id"], answers)
    assert response["status"] == "ACCEPT", response
    try:
        proc.wait(PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the rating process did not end once resumed:\n{log.read_text()[-3000:]}") from None
    return answers, proc, log.read_text()


@pytest.fixture(scope="module")
def scored(project, resumed) -> subprocess.CompletedProcess:
    return dvc(project, "repro", "score@1")


# ---------------------------------------------------------------------------------------------------- tests


def test_the_rating_step_comes_after_generation_and_before_what_reads_the_ratings(tmp_path):
    names = [s.name for s in with_rating_steps(stage_plan(ROOT, ["1", "2"]))]
    for k in ("1", "2"):
        assert names.index(f"generate@{k}") + 1 == names.index(f"rate@{k}") < names.index(f"reward-model@{k}") \
            < names.index(f"score@{k}"), names
    assert names.index("evaluate@1") < names.index("rate@2"), "rate@2 waits for iteration 1, not the other way"
    # dvc.yaml listing reward-model (which reads data/ratings, not the rollouts) before generate
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    order = ["check-inputs", "prepare-model", "prepare-prompts", "evaluate-base", "reward-model", "generate", "score",
             "advantages", "update", "evaluate", "report"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {name: stages[name] for name in order}}))
    names = [s.name for s in with_rating_steps(stage_plan(tmp_path, ["1"]))]
    assert names.index("generate@1") < names.index("rate@1") < names.index("reward-model@1") < names.index("score@1")
    assert len(names) == len(set(names)) == len(stage_plan(tmp_path, ["1"])) + 1


def test_without_ratings_scoring_stops_with_one_line_saying_how_many_await_them(unrated_score, to_rate):
    assert unrated_score.returncode != 0
    errors = [line for line in (unrated_score.stdout + unrated_score.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, unrated_score.stdout + unrated_score.stderr
    n, groups = len(to_rate), to_rate["group_id"].nunique()
    assert f"{n} of {n} completions of iteration 1 ({groups} groups) await ratings" in errors[0], errors[0]
    assert "python -m flows.rate_flow --iteration 1" in errors[0], errors[0]


def test_the_paused_run_asks_for_one_rating_per_completion(server, project, paused, to_rate):
    _, flow_run, log = paused
    assert flow_run["name"] == "rate-iteration-1" and flow_run["parameters"]["iteration"] == 1
    schema = run_input(server, flow_run, "schema")
    human = load_params(project / "params.yaml").reward.human
    ratings = [f"g{g}_c{c}" for g, c in zip(to_rate["form_group"], to_rate["form_completion"])]
    assert list(schema["properties"]) == ["rater"] + [f for name in ratings for f in (name, f"{name}_comment")]
    assert schema["required"] == ["rater"] + ratings, "a rating is required, a comment is not"
    assert schema["additionalProperties"] is False
    assert schema["properties"]["rater"]["type"] == "string" and schema["properties"]["rater"]["minLength"] == 1
    for row, name in zip(to_rate.itertuples(), ratings):
        field = schema["properties"][name]
        assert field["type"] == "integer", field
        assert (field["minimum"], field["maximum"]) == (human.min_rating, human.max_rating)
        assert field["title"] == f"group {row.form_group}, completion {row.form_completion}"
        # the field's help text shows the completion it rates and the scale (the UI hides the form's description
        # once the fields overflow its dialog)
        help_text = " ".join(field["description"].split())
        assert " ".join(row.completion.split()) in help_text or not row.completion.strip(), (row.completion, help_text)
        assert f"Rate {human.min_rating} (worst) to {human.max_rating} (best)" in help_text
        assert schema["properties"][f"{name}_comment"] == {"default": "", "title": f"{field['title']}: comment",
                                                           "type": "string"}

    description = run_input(server, flow_run, "description")
    n, groups = len(to_rate), to_rate["group_id"].nunique()
    assert description.startswith(f"## Rate iteration 1: {n} completions in {groups} groups")
    prompts = pd.read_parquet(project / "data/prompts.parquet")
    questions = dict(zip(prompts["prompt_id"], prompts["question"]))
    for g, group in to_rate.groupby("form_group"):
        section = description.split(f"### Group {g}\n")[1].split("### Group")[0]
        assert " ".join(questions[group["prompt_id"].iloc[0]].split()) in " ".join(section.split())
        for row in group.itertuples():
            assert f"**Completion {row.form_completion}** (" in section
            assert " ".join(row.completion.split()) in " ".join(section.split())

    # the command printed where the form is: the run's page in the UI
    assert f"{server.ui_url}/runs/flow-run/{flow_run['id']}" in log.read_text(), log.read_text()
    assert not (project / "data/ratings/1.parquet").exists()


def test_the_rating_form_in_a_browser(server, paused, tmp_path):
    """Headless Chromium opens the paused run's page in the Prefect UI, presses Resume, finds the form."""
    browser = chromium_path()
    if browser is None:
        pytest.skip(f"no Chromium (install it with `{INSTALL_CHROMIUM}`, as scripts/install.sh does)")
    from PIL import Image, ImageStat

    _, flow_run, _ = paused
    png = screenshot_rating_form(browser, server.ui_url, flow_run["id"], tmp_path / "form.png", tmp_path / "profile",
                                 size=",".join(map(str, SCREENSHOT_SIZE)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size == SCREENSHOT_SIZE
        gray = image.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 20, "a blank page"
        assert len(gray.getcolors(maxcolors=256) or range(256)) > 50, "too few shades for a rendered form"
    assert server.flow_run(flow_run["id"])["state_type"] == "PAUSED", "looking at the form resumes nothing"


def test_the_server_refuses_a_rating_off_the_scale(server, project, paused, refused):
    _, flow_run, _ = paused
    off_scale, missing = refused
    assert off_scale["status"] == "REJECT", off_scale
    assert "6 is greater than the maximum of 5" in off_scale["details"]["reason"], off_scale["details"]
    assert missing["status"] == "REJECT", missing
    assert "'g2_c3' is a required property" in missing["details"]["reason"], missing["details"]
    time.sleep(2)  # the flow polls every second: it would have seen a resume
    assert server.flow_run(flow_run["id"])["state_type"] == "PAUSED"
    assert not (project / "data/ratings/1.parquet").exists()


def test_the_submitted_form_is_written_to_the_ratings_file(server, project, paused, resumed, to_rate):
    _, flow_run, _ = paused
    answers, proc, out = resumed
    assert proc.returncode == 0, out
    assert server.wait(flow_run["id"], timeout=120)["state_type"] == "COMPLETED"
    path = project / "data/ratings/1.parquet"
    assert f"wrote {len(to_rate)} ratings to {path}" in out, out

    ratings = read_table(path, RATINGS).to_pandas()
    assert len(ratings) == len(to_rate)
    got = ratings.set_index(["group_id", "sample_index"])
    for row in to_rate.itertuples():
        rated = got.loc[(row.group_id, row.sample_index)]
        assert rated["rating"] == rating_of(row.form_group, row.form_completion)
        assert (rated["prompt"], rated["completion"]) == (row.prompt, row.completion)
        assert rated["iteration"] == 1 and rated["rater"] == "test rater"
        expected_comment = "stops too early" if (row.form_group, row.form_completion) == (1, 2) else None
        assert (rated["comment"] if isinstance(rated["comment"], str) else None) == expected_comment


def test_scoring_reads_the_ratings_as_the_human_reward(project, resumed, scored, to_rate):
    human = load_params(project / "params.yaml").reward.human
    df = pd.read_parquet(project / "data/scored/1.parquet").set_index(["group_id", "sample_index"])
    for row in to_rate.itertuples():
        expected = normalized(rating_of(row.form_group, row.form_completion), human)
        assert df.loc[(row.group_id, row.sample_index), "reward_human"] == pytest.approx(expected)
        assert df.loc[(row.group_id, row.sample_index), "reward"] == pytest.approx(expected)
    assert json.loads((project / "data/metrics/1/score.json").read_text())["human/rated"] == len(to_rate)


def test_a_rated_iteration_is_not_asked_again(server, project, scored):
    before = (project / "data/ratings/1.parquet").read_bytes()
    result = subprocess.run([sys.executable, "-m", "flows.rate_flow", "--iteration", "1"], cwd=project, env=server.env,
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "iteration 1 is rated already" in result.stdout, result.stdout + result.stderr
    assert (project / "data/ratings/1.parquet").read_bytes() == before


def test_without_a_server_the_command_says_how_to_start_one(project, tmp_path):
    result = subprocess.run([sys.executable, "-m", "flows.rate_flow", "--iteration", "1"], cwd=project,
                            env=prefect_env(tmp_path / "home"), capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert result.returncode != 0
    assert "error: PREFECT_API_URL is not set" in result.stderr and "prefect server start" in result.stderr, result.stderr
    assert not list(Path(tmp_path / "home").glob("*.db")), "no ephemeral server was started"


# a workspace whose stages only copy a rollouts file and read the ratings: the training flow's rating step
# against real Prefect and DVC, without training
MINI_DVC_YAML = {"stages": {
    "generate": {"foreach": "${train.iterations}", "do": {
        "cmd": "python -c \"import os, shutil; os.makedirs('data/rollouts', exist_ok=True); "
               "shutil.copyfile('rollouts.parquet', 'data/rollouts/${key}.parquet')\"",
        "deps": ["rollouts.parquet"], "outs": ["data/rollouts/${key}.parquet"]}},
    "score": {"foreach": "${train.iterations}", "do": {
        "cmd": "python -c \"import pyarrow.parquet as pq; n = pq.read_table('data/ratings/${key}.parquet').num_rows; "
               "open('data/scored-${key}.txt', 'w').write(str(n))\"",
        "deps": ["data/rollouts/${key}.parquet", "data/ratings"], "outs": ["data/scored-${key}.txt"]}},
}}


def mini_project(dest: Path, project: Path, model_dir: Path) -> Path:
    mini = make_project(dest, human_params(model_dir))
    (mini / "dvc.yaml").write_text(yaml.safe_dump(MINI_DVC_YAML, sort_keys=False))
    (mini / "rollouts.parquet").write_bytes((project / "data/rollouts/1.parquet").read_bytes())
    return mini


def test_the_training_flow_waits_for_its_rating_subflow(server, project, tmp_path, tiny_model_dir):
    mini = mini_project(tmp_path / "mini", project, tiny_model_dir)
    log = tmp_path / "train.log"
    before = set(grpo_rate_runs(server))
    trains_before = {r["id"] for r in server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["grpo-train"]}}})}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.grpo_flow", "--retries", "0"], cwd=mini, env=server.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rate = wait_paused(server, before, proc, log)
        (train,) = [r for r in server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["grpo-train"]}}})
                    if r["id"] not in trains_before]
        assert server.flow_run(train["id"])["state_type"] == "RUNNING", "the training run waits for the ratings"
        parent = server.get(f"/task_runs/{rate['parent_task_run_id']}")
        assert parent["flow_run_id"] == train["id"], "the rating run is a subflow of the training run"
        assert not (mini / "data/scored-1.txt").exists(), "score@1 waits for the ratings"
        assert resume(server, rate["id"], answers_for(run_input(server, rate, "schema"), "trainer"))["status"] == "ACCEPT"
        proc.wait(PROCESS_TIMEOUT)
        assert proc.returncode == 0, log.read_text()[-4000:]
    finally:
        stop_process_group(proc)
    assert server.wait(train["id"], timeout=120)["state_type"] == "COMPLETED"
    assert server.wait(rate["id"], timeout=120)["state_type"] == "COMPLETED"
    rated = read_table(mini / "data/ratings/1.parquet", RATINGS)
    assert set(rated["rater"].to_pylist()) == {"trainer"}
    assert (mini / "data/scored-1.txt").read_text() == str(rated.num_rows)
    tasks = [t["name"] for t in server.wait_task_runs(train["id"], 3)]
    assert tasks[0] == "generate@1" and tasks[-1] == "score@1", tasks


def test_a_training_run_without_a_server_stops_at_an_unrated_iteration(project, tmp_path, tiny_model_dir):
    """Prefect's ephemeral mode (no PREFECT_API_URL): no browser reaches its temporary server, so the rating
    step fails at once, saying how to start a server, instead of pausing where nobody can answer."""
    mini = mini_project(tmp_path / "mini", project, tiny_model_dir)
    result = subprocess.run([sys.executable, "-m", "flows.grpo_flow", "--retries", "0"], cwd=mini,
                            env=prefect_env(tmp_path / "home"), capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "NoPrefectServer: iteration 1: the rating form needs a Prefect server" in out, out[-4000:]
    assert "prefect server start" in out and "python -m pipeline.rate --iteration 1" in out, out[-4000:]
    assert (mini / "data/rollouts/1.parquet").exists(), "generate@1 ran"
    assert not (mini / "data/scored-1.txt").exists() and not (mini / "data/ratings/1.parquet").exists()
