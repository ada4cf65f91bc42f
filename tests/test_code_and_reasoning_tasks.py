"""Code tasks and reasoning-gym end to end: the code_tests reward through the registry and the score stage
(real sandbox: canonical, wrong and hostile programs; a missing bwrap is a clear error), the reasoning_gym
reward, the humaneval / reasoning_gym / file-with-tests prompt sources, the params rules, the report, and a
tiny DVC run on HumanEval."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from grpo.environments import sandbox
from grpo.environments.code_tasks import humaneval_ground_truth, humaneval_tasks
from grpo.config import ConfigError, params_from_dict
from grpo.contracts import PROMPTS, ROLLOUTS, SCORED, read_table, validate, write_table
from grpo.errors import InputError
from grpo.environments.prompt_files import read_prompt_file
from grpo.environments.prompts import build_prompt_rows, prompt_id
from grpo.environments.reasoning_gym_tasks import extract_answer
from grpo.environments.rewards import Sample
from grpo.environments.scoring import score_completions
from tests.project import ROOT, dvc, make_project, reward_settings, small_params

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_available(),
                                   reason="bwrap cannot run here (see grpo.environments.sandbox.check_sandbox)")
CODE = reward_settings(strict_answer=True, code_tests={"all_or_nothing": True, "timeout_s": 2.0, "memory_mb": 256})


@pytest.fixture(scope="module")
def task() -> dict:
    return humaneval_tasks()[0]  # has_close_elements(numbers, threshold)


def programs(task: dict) -> dict[str, str]:
    name = task["entry_point"]
    return {
        "canonical": f"Here it is:\n```python\n{task['prompt']}{task['canonical_solution']}```\n",
        "wrong": f"```python\ndef {name}(numbers, threshold):\n    return False\n```",
        "fork bomb": f"```python\nimport os\ndef {name}(numbers, threshold):\n    while True:\n        os.fork()\n```",
        "infinite loop": f"```python\ndef {name}(numbers, threshold):\n    while True:\n        pass\n```",
    }


def rollouts(completions: list[str], ground_truth: str) -> pa.Table:
    rows = [{"iteration": 1, "prompt_id": "p0", "group_id": "1-p0", "sample_index": i, "prompt": "p",
             "completion": c, "prompt_token_ids": [1], "completion_token_ids": [2], "completion_logprobs": [-0.5],
             "finish_reason": "stop", "completion_tokens": 1, "ground_truth": ground_truth, "data_source": "humaneval",
             "checkpoint_id": "base", "backend": "hf", "temperature": 1.0, "top_p": 1.0, "seed": 0,
             "metadata": json.dumps({"task_id": "HumanEval/0"})} for i, c in enumerate(completions)]
    return pa.Table.from_pylist(rows, schema=ROLLOUTS.schema)


def params_file(tmp_path: Path, **sections) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        data[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


CODE_PARAMS = {"prompts": {"source": "humaneval"},
               "reward": {"weights": {"code_tests": 1.0}, "code_tests": {"all_or_nothing": True, "timeout_s": 2.0,
                                                                         "memory_mb": 256}}}


# --- the code_tests reward ------------------------------------------------------------------------------


@needs_sandbox
def test_code_tests_through_the_registry_scores_right_wrong_and_hostile_programs(task):
    cases = programs(task)
    truth = humaneval_ground_truth(task)
    columns = score_completions([Sample(c, truth, 10, "stop") for c in cases.values()], {"code_tests": 1.0}, CODE)
    scores = dict(zip(cases, columns["reward_code_tests"]))
    errors = dict(zip(cases, columns["reward_error"]))
    assert scores == {"canonical": 1.0, "wrong": 0.0, "fork bomb": 0.0, "infinite loop": 0.0}
    assert errors["canonical"] is None
    assert errors["wrong"].startswith("code_tests: a test failed: AssertionError")
    assert errors["infinite loop"].startswith("code_tests: timeout")
    assert errors["fork bomb"].startswith("code_tests: ")  # the process limit stops it: a failed test or a kill
    assert "Errno 11" in errors["fork bomb"] or "limit" in errors["fork bomb"] or "timeout" in errors["fork bomb"]


@needs_sandbox
def test_partial_credit_and_bad_ground_truth_in_one_batch(task):
    truth = humaneval_ground_truth(task)
    settings = reward_settings(strict_answer=True, code_tests={"all_or_nothing": False, "timeout_s": 2.0})
    columns = score_completions([Sample(programs(task)["wrong"], truth, 1, "stop"), Sample("x", "42", 1, "stop")],
                                {"code_tests": 1.0}, settings)
    assert 0.0 < columns["reward_code_tests"][0] < 1.0  # some asserts expect False
    assert columns["reward_code_tests"][1] == 0.0
    assert columns["reward_error"][1].startswith("code_tests: ValueError: code_tests ground truth must be a JSON object")


@needs_sandbox
def test_the_batch_runs_programs_in_parallel(task):
    slow = f"```python\nimport time\ndef {task['entry_point']}(numbers, threshold):\n    time.sleep(1.0)\n    return 0\n```"
    truth = humaneval_ground_truth(task)
    settings = reward_settings(strict_answer=True, code_tests={"timeout_s": 10.0})
    start = time.perf_counter()
    score_completions([Sample(slow, truth, 1, "stop")], {"code_tests": 1.0}, settings)
    one = time.perf_counter() - start
    start = time.perf_counter()
    score_completions([Sample(slow, truth, 1, "stop")] * 4, {"code_tests": 1.0}, settings)
    four = time.perf_counter() - start
    assert four < 3.2 * one, (one, four)  # one at a time would take 4x; 2 cores run them two by two (or more)


@needs_sandbox
def test_the_score_stage_goes_on_past_hostile_programs(tmp_path, task):
    from pipeline import score

    completions = list(programs(task).values())
    write_table(rollouts(completions, humaneval_ground_truth(task)), tmp_path / "rollouts.parquet", ROLLOUTS)
    out, metrics = tmp_path / "scored.parquet", tmp_path / "score.json"
    score.main(["--params", str(params_file(tmp_path, **CODE_PARAMS)), "--iteration", "1",
                "--rollouts", str(tmp_path / "rollouts.parquet"), "--out", str(out), "--metrics", str(metrics)])
    scored = read_table(out, SCORED).to_pandas()
    assert scored["reward_code_tests"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert scored["reward_error"].isna().tolist() == [True, False, False, False]
    assert scored["metadata"].tolist() == [json.dumps({"task_id": "HumanEval/0"})] * 4
    values = json.loads(metrics.read_text())
    assert values["reward_errors"] == 3 and values["code_tests/programs_per_second"] > 0
    assert values["time/score_seconds"] >= values["time/reward_code_tests_seconds"] > 0


def test_without_bwrap_score_and_check_inputs_stop_with_a_clear_error(tmp_path, monkeypatch, capsys, task):
    from pipeline import check_inputs, score
    from pipeline.stage import run

    monkeypatch.setenv("GRPO_BWRAP", str(tmp_path / "missing" / "bwrap"))
    write_table(rollouts(["x"], humaneval_ground_truth(task)), tmp_path / "rollouts.parquet", ROLLOUTS)
    params = params_file(tmp_path, **CODE_PARAMS)
    expected = f"error: reward.sandbox: bwrap cannot run here: {tmp_path / 'missing' / 'bwrap'} (set by $GRPO_BWRAP)"
    for main, argv in ((check_inputs.main, ["--params", str(params), "--out", str(tmp_path / "inputs.ok")]),
                       (score.main, ["--params", str(params), "--iteration", "1", "--rollouts",
                                     str(tmp_path / "rollouts.parquet"), "--out", str(tmp_path / "scored.parquet"),
                                     "--metrics", str(tmp_path / "score.json")])):
        with pytest.raises(SystemExit) as exit_info:
            run(main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "reward.sandbox: none" in err, err
    assert not (tmp_path / "inputs.ok").exists() and not (tmp_path / "scored.parquet").exists()
    # the explicit opt-out runs the programs without bwrap (UNSAFE; for trusted code)
    unsafe = params_file(tmp_path, **CODE_PARAMS | {"reward": {**CODE_PARAMS["reward"], "sandbox": "none"}})
    score.main(["--params", str(unsafe), "--iteration", "1", "--rollouts", str(tmp_path / "rollouts.parquet"),
                "--out", str(tmp_path / "scored.parquet"), "--metrics", str(tmp_path / "score.json")])
    assert read_table(tmp_path / "scored.parquet", SCORED)["reward"].to_pylist() == [0.0]


def test_a_sandbox_that_cannot_run_stops_scoring_instead_of_scoring_0(tmp_path, monkeypatch, task):
    monkeypatch.setenv("GRPO_BWRAP", str(tmp_path / "missing" / "bwrap"))
    samples = [Sample(programs(task)["canonical"], humaneval_ground_truth(task), 1, "stop")]
    with pytest.raises(ConfigError, match="bwrap cannot run here"):
        score_completions(samples, {"code_tests": 1.0}, CODE)


# --- the reasoning_gym reward ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,answer", [
    ("think\n<answer> 12 </answer>", "12"),
    ("<answer>1</answer> then <answer>2</answer>\n#### 3", "2"),  # the tag wins, the last one
    ("so 5 + 7 = 12\n#### 12\n", "12"),
    ("#### 1\nno, wait\n####  -4 ", "-4"),
    ("the answer is 12", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_reasoning_gym_reward_uses_the_generators_verifier():
    from grpo.environments.reasoning_gym_tasks import reasoning_gym_rows

    rows = reasoning_gym_rows({"chain_sum": 1.0}, {}, 3, 5)
    truths = [row["ground_truth"] for row in rows]
    answers = [json.loads(t)["entry"]["answer"] for t in truths]
    samples = [Sample(f"#### {answers[0]}", truths[0], 3, "stop"),
               Sample(f"<answer>{answers[1]}</answer>", truths[1], 3, "stop"),
               Sample(f"#### {int(answers[2]) + 1}", truths[2], 3, "stop"),
               Sample("no answer", truths[2], 3, "stop"),
               Sample("#### 1", "7", 3, "stop")]  # not a reasoning-gym ground truth: an error, recorded
    columns = score_completions(samples, {"reasoning_gym": 1.0}, CODE)
    assert columns["reward_reasoning_gym"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert columns["reward_error"][:4] == [None] * 4
    assert "ValueError: reasoning_gym ground truth must be an object" in columns["reward_error"][4]


# --- prompt sources -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts_config(**overrides):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["prompts"].update(overrides)
    if overrides.get("source") == "humaneval" or overrides.get("tests_column"):
        data["reward"]["weights"] = {"code_tests": 1.0}
    if overrides.get("source") == "reasoning_gym":
        data["reward"]["weights"] = {"reasoning_gym": 1.0}
    return params_from_dict(data).prompts


def prompts_table(prepared) -> pd.DataFrame:
    rows = [{**row, "prompt_id": prompt_id(row["data_source"], row["question"], row["ground_truth"])}
            for row in prepared.rows]
    return validate(pa.Table.from_pylist(rows), PROMPTS).to_pandas()


def test_humaneval_prompts_are_valid_rows_with_task_ids(tokenizer):
    config = prompts_config(source="humaneval", num_train=20, num_eval=8)
    table = prompts_table(build_prompt_rows(config, 3, tokenizer, context=1024, max_new_tokens=64))
    assert (table["split"] == "eval").sum() == 8 and (table["split"] == "train").sum() == 20
    assert set(table["data_source"]) == {"humaneval"}
    tasks = {t["task_id"]: t for t in humaneval_tasks()}
    for row in table.itertuples():
        meta = json.loads(row.metadata)
        task = tasks[meta["task_id"]]
        assert row.question == task["prompt"] and row.ground_truth == humaneval_ground_truth(task)
        assert f"Write the complete Python function `{task['entry_point']}` in one ```python code block." in row.prompt
    assert not set(table[table["split"] == "eval"]["question"]) & set(table[table["split"] == "train"]["question"])
    again = prompts_table(build_prompt_rows(config, 3, tokenizer, context=1024, max_new_tokens=64))
    assert again.equals(table)  # the split is seeded
    other = prompts_table(build_prompt_rows(config, 4, tokenizer, context=1024, max_new_tokens=64))
    assert set(other[other["split"] == "eval"]["prompt_id"]) != set(table[table["split"] == "eval"]["prompt_id"])


def test_reasoning_gym_prompts_are_valid_rows_naming_their_generator(tokenizer):
    config = prompts_config(source="reasoning_gym", num_train=12, num_eval=6, reasoning_gym={
        "datasets": {"chain_sum": 1.0, "basic_arithmetic": 1.0}, "config": {"chain_sum": {"max_terms": 2}},
        "size": 30, "seed": 1})
    table = prompts_table(build_prompt_rows(config, 0, tokenizer, context=1024, max_new_tokens=64))
    assert (table["split"] == "eval").sum() == 6 and (table["split"] == "train").sum() == 12
    meta = [json.loads(m) for m in table["metadata"]]
    assert {m["generator"] for m in meta} == {"chain_sum", "basic_arithmetic"}
    for m, truth, question in zip(meta, table["ground_truth"], table["question"]):
        data = json.loads(truth)
        assert data["dataset"] == m["generator"] and data["entry"]["question"] == question
        assert data["entry"]["metadata"]["source_index"] == m["index"]
        if m["generator"] == "chain_sum":
            assert data["entry"]["metadata"]["num_terms"] == 2
    assert all(p.rstrip().endswith("#### <answer><|im_end|>\n<|im_start|>assistant") for p in table["prompt"])
    assert table["question"].is_unique


def _jsonl(path: Path, *objects) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


TESTS = {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"}


def test_a_file_with_a_tests_column_gives_code_tasks(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "code.jsonl",
                  {"question": "Write add(a, b) returning a + b.", "tests": TESTS},
                  {"question": "Write mul(a, b) returning a * b.",
                   "tests": json.dumps({"test": "def check(candidate):\n    assert candidate(2, 3) == 6\n",
                                        "entry_point": "mul"})},  # a string holding the JSON works too
                  {"question": "Write sub(a, b).", "tests": {**TESTS, "entry_point": "sub", "prompt": "def sub(a, b):\n"}})
    config = prompts_config(source="file", path=str(path), tests_column="tests", num_train=2, num_eval=1)
    table = prompts_table(build_prompt_rows(config, 0, tokenizer, context=1024, max_new_tokens=64))
    by_question = {row.question: row for row in table.itertuples()}
    add = by_question["Write add(a, b) returning a + b."]
    assert json.loads(add.ground_truth) == TESTS
    assert "Write the complete Python function `add` in one ```python code block." in add.prompt
    assert json.loads(add.metadata) == {"row": 1, "source_file": "code.jsonl"}
    assert json.loads(by_question["Write sub(a, b)."].ground_truth)["prompt"] == "def sub(a, b):\n"


def test_bad_tests_cells_name_line_and_column(tmp_path):
    path = _jsonl(tmp_path / "code.jsonl",
                  {"question": "ok", "tests": TESTS},
                  {"question": "no entry point", "tests": {"test": TESTS["test"]}},
                  {"question": "not json", "tests": "def check(candidate): pass"},
                  {"question": "a number", "tests": 3},
                  {"question": "no check", "tests": {"test": "assert True", "entry_point": "f"}},
                  {"question": "no tests"})
    with pytest.raises(InputError) as info:
        read_prompt_file(path, "question", "answer", tests_column="tests")
    message = str(info.value)
    assert f"{path}: 5 bad lines:" in message
    assert "line 2, column 'tests': code_tests ground truth lacks 'entry_point'" in message
    assert "line 3, column 'tests': is a string that is not JSON" in message
    assert "line 4, column 'tests': is a number (3); expected a JSON object" in message
    assert "line 5, column 'tests': code_tests ground truth: the test defines no check(candidate)" in message
    assert "line 6, column 'tests': missing" in message


def test_a_parquet_struct_tests_column(tmp_path, tokenizer):
    path = tmp_path / "code.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"question": "Write add.", "tests": {"test": TESTS["test"], "entry_point": "add", "prompt": None}},
        {"question": "Write add again.", "tests": {"test": TESTS["test"], "entry_point": "add", "prompt": "def add(a, b):\n"}},
    ]), path)
    rows = read_prompt_file(path, "question", "answer", tests_column="tests").rows
    assert [json.loads(r["ground_truth"]) for r in rows] == [TESTS, {**TESTS, "prompt": "def add(a, b):\n"}]


# --- params ---------------------------------------------------------------------------------------------


def _params(**sections) -> dict:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        data[section].update(values)
    return data


@pytest.mark.parametrize("sections,fragment", [
    ({"prompts": {"tests_column": "tests"}},
     "prompts.tests_column = 'tests' is not allowed; expected null when prompts.source is 'synthetic'"),
    ({"prompts": {"source": "humaneval"}},
     "reward.weights = {'correctness': 1.0, 'format': 0.0} is not allowed; expected a mapping with code_tests"),
    ({"reward": {"weights": {"correctness": 1.0, "code_tests": 1.0}}},
     "reward.weights.code_tests = 1.0 is not allowed; expected no weight: code_tests scores only prompts.source humaneval"),
    ({"prompts": {"source": "reasoning_gym"}}, "expected a mapping with reasoning_gym for prompts.source reasoning_gym"),
    ({"reward": {"sandbox": "docker"}}, "reward.sandbox = 'docker' is not allowed; expected one of bwrap, none"),
    ({"reward": {"code_tests": {"all_or_nothing": True, "timeout_s": 0, "memory_mb": 512}}},
     "reward.code_tests.timeout_s = 0 is not allowed; expected a float > 0"),
    ({"prompts": {"reasoning_gym": {"datasets": {"chain_sum": 1.0}, "config": {"basic_arithmetic": {"max_terms": 2}},
                                    "size": 10, "seed": 0}}},
     "prompts.reasoning_gym.config.basic_arithmetic = {'max_terms': 2} is not allowed; expected settings of a "
     "generator in prompts.reasoning_gym.datasets"),
    ({"prompts": {"reasoning_gym": {"datasets": {}, "config": {}, "size": 10, "seed": 0}}},
     "prompts.reasoning_gym.datasets = {} is not allowed"),
])
def test_params_rules_for_code_and_reasoning_gym(sections, fragment):
    with pytest.raises(ConfigError) as info:
        params_from_dict(_params(**sections), "params.yaml")
    assert fragment in str(info.value), str(info.value)


def test_check_inputs_names_an_unknown_generator_and_a_bad_setting(tmp_path, capsys):
    from pipeline import check_inputs
    from pipeline.stage import run

    reward = {"weights": {"reasoning_gym": 1.0}}
    for generators, expected in (
        ({"datasets": {"chain_summ": 1.0}, "config": {}, "size": 10, "seed": 0},
         "error: prompts.reasoning_gym.datasets.chain_summ: no such reasoning-gym generator; known: "),
        ({"datasets": {"chain_sum": 1.0}, "config": {"chain_sum": {"max_termz": 2}}, "size": 10, "seed": 0},
         "error: prompts.reasoning_gym.config.chain_sum = {'max_termz': 2} is not accepted by the generator: "
         "TypeError"),
    ):
        params = params_file(tmp_path, prompts={"source": "reasoning_gym", "reasoning_gym": generators}, reward=reward)
        with pytest.raises(SystemExit):
            run(check_inputs.main, ["--params", str(params), "--out", str(tmp_path / "inputs.ok")])
        assert expected in capsys.readouterr().err


# --- report ---------------------------------------------------------------------------------------------


def test_the_report_plots_the_pass_rate_and_the_code_reward(tmp_path):
    from pipeline import report

    for k, metrics in ((0, {"evaluate": {"eval/pass_rate": 0.1}}),
                       (1, {"score": {"reward": 0.2, "rewards/code_tests/mean": 0.2}, "evaluate": {"eval/pass_rate": 0.3}})):
        for stage, values in metrics.items():
            (tmp_path / "metrics" / str(k)).mkdir(parents=True, exist_ok=True)
            (tmp_path / "metrics" / str(k) / f"{stage}.json").write_text(json.dumps({"iteration": k, **values}))
    report.main(["--metrics-dir", str(tmp_path / "metrics"), "--out", str(tmp_path / "report")])
    history = pd.read_csv(tmp_path / "report" / "history.csv")
    assert history["eval/pass_rate"].tolist() == [0.1, 0.3]
    assert (tmp_path / "report" / "eval_accuracy.png").exists() and (tmp_path / "report" / "reward.png").exists()


# --- a tiny DVC run on HumanEval ------------------------------------------------------------------------


@pytest.mark.slow
@needs_sandbox
def test_tiny_dvc_run_on_humaneval_with_code_tests(tmp_path, tiny_model_dir):
    params = small_params(tiny_model_dir, iterations=1,
                          prompts={"source": "humaneval", "num_train": 6, "num_eval": 3},
                          reward={"weights": {"code_tests": 1.0},
                                  "code_tests": {"all_or_nothing": False, "timeout_s": 5.0, "memory_mb": 512}})
    project = make_project(tmp_path / "project", params)
    dvc(project, "repro")
    tasks = {t["task_id"] for t in humaneval_tasks()}
    prompts = read_table(project / "data/prompts.parquet", PROMPTS).to_pandas()
    rollouts_1 = read_table(project / "data/rollouts/1.parquet", ROLLOUTS).to_pandas()
    assert {json.loads(m)["task_id"] for m in rollouts_1["metadata"]} <= tasks
    by_prompt = dict(zip(prompts["prompt_id"], prompts["metadata"]))
    assert all(by_prompt[p] == m for p, m in zip(rollouts_1["prompt_id"], rollouts_1["metadata"]))
    scored = read_table(project / "data/scored/1.parquet", SCORED).to_pandas()
    assert "reward_code_tests" in scored and scored["metadata"].notna().all()
    # a tiny random model writes no working program: every completion is 0 with its reason recorded
    assert (scored["reward_error"].notna() | (scored["reward_code_tests"] > 0)).all()
    score_metrics = json.loads((project / "data/metrics/1/score.json").read_text())
    assert score_metrics["code_tests/programs_per_second"] > 0
    for k in (0, 1):
        evaluation = json.loads((project / f"data/metrics/{k}/evaluate.json").read_text())
        assert 0.0 <= evaluation["eval/pass_rate"] <= 1.0 and evaluation["eval/num_problems"] == 3
        assert "eval/accuracy" not in evaluation
    results = pd.read_parquet(project / "data/eval/1.parquet")
    assert {json.loads(m)["task_id"] for m in results["metadata"]} <= tasks and "error" in results
    assert "eval/pass_rate" in pd.read_csv(project / "data/report/history.csv")


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_measured_examples_apply_to_params_yaml(tmp_path, example):
    import importlib.util

    from grpo.config import load_params
    from grpo.variants import check_variant_names

    spec = importlib.util.spec_from_file_location("apply_params", ROOT / "scripts" / "apply_params.py")
    apply_params = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(apply_params)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_params.main([str(example), "--params", str(params)])
    loaded = load_params(params)
    check_variant_names(loaded, str(params))
    overrides = yaml.safe_load(example.read_text())
    for key, value in overrides.items():  # every dotted key landed, as the typed params read it
        node = loaded
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        if hasattr(node, "__dataclass_fields__"):
            node = {name: getattr(node, name) for name in node.__dataclass_fields__}
        assert json.loads(json.dumps(node)) == json.loads(json.dumps(value)), key  # tuples read as lists
    assert "# synthetic | gsm8k | file" in params.read_text()  # comments kept
