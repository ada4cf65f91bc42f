"""pipeline.params_file, the one editor of params.yaml (used by `python -m pipeline.extend` and the flows):
dotted keys set in a ruamel round trip that keeps every comment and line as written, validated before anything
is written, written atomically; errors are one-line ConfigErrors naming the file, the key, the value and what
is allowed."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from grpo.config import load_params
from grpo.errors import ConfigError
from pipeline import extend
from pipeline.params_file import edit_params, extend_iterations, iteration_keys, iterations_mapping

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path) -> Path:
    """A copy of the project's params.yaml (comments and layout as the user sees them), 2 iterations."""
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    lines = [('  iterations: {"1": 0, "2": 1}' if line.startswith("  iterations:") else line)
             for line in text.splitlines(keepends=False)]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return path


def _changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    a, b = before.splitlines(), after.splitlines()
    assert len(a) == len(b), "lines were added or removed"
    return [(x, y) for x, y in zip(a, b) if x != y]


def test_extend_changes_only_the_iterations_line(params):
    before = params.read_text()
    assert extend_iterations(params, 3) == 5
    after = params.read_text()
    assert _changed_lines(before, after) == [('  iterations: {"1": 0, "2": 1}',
                                              '  iterations: {"1": 0, "2": 1, "3": 2, "4": 3, "5": 4}')]
    assert load_params(params).train.iterations == iterations_mapping(5)
    assert iteration_keys(params) == ["1", "2", "3", "4", "5"]
    assert stat.S_IMODE(params.stat().st_mode) == 0o644, "the file keeps its mode"
    assert sorted(p.name for p in params.parent.iterdir()) == ["params.yaml"], "no temporary left behind"


def test_extend_the_project_params_yaml_as_it_is(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    n = load_params(path).train.num_iterations
    assert extend_iterations(path, 1) == n + 1
    (changed,) = _changed_lines((ROOT / "params.yaml").read_text(), path.read_text())
    assert changed[1] == "  iterations: {" + ", ".join(f'"{k}": {k - 1}' for k in range(1, n + 2)) + "}"


def test_extend_cli_prints_the_same_line(params, capsys):
    extend.main(["2", "--params", str(params)])
    assert capsys.readouterr().out == f"{params}: train.iterations now 1..4; run `dvc repro` to train the new ones\n"
    assert iteration_keys(params) == ["1", "2", "3", "4"]


def test_extend_a_block_mapping_writes_the_one_line_form(params):
    text = params.read_text().replace('  iterations: {"1": 0, "2": 1}', '  iterations:\n    "1": 0\n    "2": 1')
    params.write_text(text)
    assert extend_iterations(params, 1) == 3
    assert '  iterations: {"1": 0, "2": 1, "3": 2}\n' in params.read_text()
    assert "# To extend a run, add the next entry" in params.read_text()


@pytest.mark.parametrize("k", [0, -1, True, 1.5])
def test_extend_refuses_a_bad_count(params, k):
    before = params.read_bytes()
    with pytest.raises(ConfigError, match=r"params\.yaml: iterations to add = .* is not allowed; expected an integer >= 1"):
        extend_iterations(params, k)
    assert params.read_bytes() == before


def test_extend_refuses_an_invalid_file(params):
    params.write_text(params.read_text().replace("group_size: 8", "group_size: 1"))
    before = params.read_bytes()
    with pytest.raises(ConfigError, match="rollout.group_size = 1 is not allowed; expected an integer >= 2"):
        extend_iterations(params, 1)
    assert params.read_bytes() == before


def test_edit_sets_dotted_keys_and_keeps_every_comment(params):
    before = params.read_text()
    changed = edit_params(params, {"rollout.group_size": 4, "loss.beta": 0.05, "optim.learning_rate": 1e-5,
                                   "loss.clip_high": 0.28, "train.iterations": iterations_mapping(1)})
    assert changed == {"rollout.group_size": (8, 4), "loss.beta": (0.04, 0.05), "optim.learning_rate": (5e-4, 1e-5),
                       "loss.clip_high": (None, 0.28), "train.iterations": ({"1": 0, "2": 1}, {"1": 0})}
    diff = dict(_changed_lines(before, params.read_text()))
    assert diff == {
        "  group_size: 8               # G completions per prompt": "  group_size: 4               # G completions per prompt",
        "  beta: 0.04                  # KL penalty to the reference (DeepSeekMath)":
            "  beta: 0.05                  # KL penalty to the reference (DeepSeekMath)",
        "  learning_rate: 5.0e-4       # LoRA's; full fine-tuning (model.lora: null) wants about 10x less: "
        "examples/full_finetune.yaml":
            "  learning_rate: 1.0e-05      # LoRA's; full fine-tuning (model.lora: null) wants about 10x less: "
            "examples/full_finetune.yaml",  # 1e-05 would read as a string in YAML 1.1
        "  clip_high: null             # null = clip_low; 0.28 = DAPO clip-higher":
            "  clip_high: 0.28             # null = clip_low; 0.28 = DAPO clip-higher",
        '  iterations: {"1": 0, "2": 1}': '  iterations: {"1": 0}',
    }
    params_read = yaml.safe_load(params.read_text())  # what DVC and the stages read
    assert params_read["optim"]["learning_rate"] == 1e-5 and params_read["train"]["iterations"] == {"1": 0}
    assert params_read["prompts"]["path"] is None


def test_edit_with_the_current_values_writes_nothing(params):
    before = params.stat().st_mtime_ns, params.read_bytes()
    assert edit_params(params, {"rollout.group_size": 8, "loss.beta": 0.04, "loss.clip_high": None,
                                "train.iterations": {"1": 0, "2": 1}}) == {}
    assert (params.stat().st_mtime_ns, params.read_bytes()) == before
    # the same number of another type is a change: 1 is not 1.0
    assert edit_params(params, {"optim.max_grad_norm": 2}) == {"optim.max_grad_norm": (1.0, 2)}


@pytest.mark.parametrize("changes,fragments", [
    ({"rollout.group_size": 1}, ["rollout.group_size = 1 is not allowed; expected an integer >= 2"]),
    ({"rollout.backend": "tgi"}, ["rollout.backend = 'tgi' is not allowed; expected one of auto, hf, vllm"]),
    ({"rollout.group_sise": 8}, ["unknown key rollout.group_sise = 8", "did you mean rollout.group_size?",
                                 "allowed keys in rollout:"]),
    ({"rolout.group_size": 8}, ["unknown key rolout (in rolout.group_size = 8) (did you mean rollout?)",
                                "allowed keys in the top level: model, prompts, rollout"]),
    ({"rollout.group_size.x": 8}, ["rollout.group_size.x = 8 is not allowed; rollout.group_size = 8 is a value"]),
    ({"rollout..group_size": 8}, ["key 'rollout..group_size' (= 8) is not allowed; expected dotted names"]),
    ({"train.iterations": {"1": 0, "3": 2}}, ["train.iterations = {1: 0, 3: 2} is not allowed; expected consecutive"]),
    ({"train.iterations": {1: 0, 2: 0}}, ["train.iterations has key 1 unquoted"]),
])
def test_a_bad_edit_raises_one_line_and_writes_nothing(params, changes, fragments):
    before = params.read_bytes()
    with pytest.raises(ConfigError) as info:
        edit_params(params, {"loss.beta": 0.05, **changes})  # a good change beside the bad one: not written either
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{params}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert params.read_bytes() == before
    assert sorted(p.name for p in params.parent.iterdir()) == ["params.yaml"]


def test_iterations_with_integer_keys_are_written_quoted(params):
    assert edit_params(params, {"train.iterations": {1: 0, 2: 1, 3: 2}}) == {
        "train.iterations": ({"1": 0, "2": 1}, {"1": 0, "2": 1, "3": 2})}
    assert '  iterations: {"1": 0, "2": 1, "3": 2}\n' in params.read_text()


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="parameters file not found"):
        edit_params(tmp_path / "params.yaml", {"loss.beta": 0.05})
    (tmp_path / "params.yaml").write_text("loss: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        edit_params(tmp_path / "params.yaml", {"loss.beta": 0.05})
    assert iteration_keys(tmp_path / "params.yaml") == [] and iteration_keys(tmp_path / "missing.yaml") == []
