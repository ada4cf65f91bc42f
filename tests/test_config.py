from pathlib import Path

import pytest
import yaml

from grpo.config import ConfigError, Params, load_params, params_from_dict, params_to_dict
from grpo.variants import check_variant_names

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_loads():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.rollout.group_size >= 2
    assert params.advantage.eps == pytest.approx(1e-4)


def _write(tmp_path, edit):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _error(tmp_path, edit) -> str:
    path = _write(tmp_path, edit)
    with pytest.raises(ConfigError) as info:
        check_variant_names(load_params(path), str(path))  # what check-inputs runs
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    "section,key,value,fragments",
    [
        ("rollout", "group_size", 1, ["rollout.group_size = 1", "an integer >= 2"]),
        ("optim", "learning_rate", -0.001, ["optim.learning_rate = -0.001", "a float > 0"]),
        ("optim", "learning_rate", "fast", ["optim.learning_rate = 'fast'", "a float > 0"]),
        ("loss", "aggregation", "sum", ["loss.aggregation = 'sum'", "seq_mean_token_mean", "token_mean"]),
        ("loss", "kl_estimator", "k4", ["loss.kl_estimator = 'k4'", "one of k1, k2, k3"]),
        ("loss", "clip_low", 1.5, ["loss.clip_low = 1.5", "(0, 1)"]),
        ("loss", "clip_low", 0, ["loss.clip_low = 0", "(0, 1)"]),
        ("advantage", "scale", "grp", ["advantage.scale = 'grp'", "one of batch, group, none"]),
        ("rollout", "backend", "tgi", ["rollout.backend = 'tgi'", "auto, hf, vllm"]),
        ("rollout", "group_size", 2.5, ["rollout.group_size = 2.5", "an integer"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(tmp_path, section, key, value, fragments):
    message = _error(tmp_path, lambda d: d[section].__setitem__(key, value))
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_reward_name(tmp_path):
    message = _error(tmp_path, lambda d: d["reward"]["weights"].__setitem__("corectness", 1.0))
    assert "reward.weights.corectness = 1.0" in message and "one of code_tests, correctness, format, human, overlong, reasoning_gym, reward_model" in message


def test_misspelled_key_suggests_the_right_one(tmp_path):
    def edit(d):
        d["loss"]["betaa"] = d["loss"].pop("beta")

    message = _error(tmp_path, edit)
    assert "unknown key loss.betaa = 0.04" in message and "did you mean loss.beta?" in message


def test_missing_key(tmp_path):
    message = _error(tmp_path, lambda d: d["optim"].pop("max_grad_norm"))
    assert "missing key optim.max_grad_norm" in message and "a float > 0" in message


def test_missing_section(tmp_path):
    message = _error(tmp_path, lambda d: d.pop("loss"))
    assert "missing key loss" in message and "beta" in message


def test_cross_field_rule(tmp_path):
    message = _error(tmp_path, lambda d: d["optim"].__setitem__("micro_batch_size", 5))
    assert "optim.micro_batch_size = 5" in message and "divisor of optim.minibatch_size (16)" in message


def test_yaml_exponent_without_dot_is_read_as_a_number():
    data = params_to_dict(load_params(ROOT / "params.yaml"))
    data["optim"]["learning_rate"] = "3e-5"  # what YAML 1.1 gives for `3e-5`
    assert params_from_dict(data).optim.learning_rate == pytest.approx(3e-5)


def test_round_trip():
    params = load_params(ROOT / "params.yaml")
    assert params_from_dict(params_to_dict(params)) == params


def test_params_yaml_is_the_one_source_of_values():
    # no second set of defaults in code that could contradict params.yaml
    with pytest.raises(TypeError):
        Params()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: parameters file not found"):
        load_params(tmp_path / "nope.yaml")


# (library callable, its parameter) -> the params.yaml key the pipeline sets it from. A library default that
# differs from params.yaml would give a user calling the library one result and `dvc repro` another.
def _library_defaults():
    import inspect

    from grpo import group_advantages, kl_divergence, policy_loss
    from grpo.environments.code_tasks import code_tests_score, score_many
    from grpo.environments.sandbox import run_python

    pairs = [((group_advantages, "scale"), "advantage.scale"), ((group_advantages, "eps"), "advantage.eps"),
             ((kl_divergence, "estimator"), "loss.kl_estimator"),
             *[((policy_loss, name), f"loss.{name}")
               for name in ("beta", "clip_low", "clip_high", "kl_estimator", "aggregation", "importance")]]
    for fn in (code_tests_score, score_many, run_python):
        pairs += [((fn, "timeout_s"), "reward.code_tests.timeout_s"), ((fn, "memory_mb"), "reward.code_tests.memory_mb"),
                  ((fn, "sandbox"), "reward.sandbox")]
    return [(f"{fn.__name__}({name}=...)", inspect.signature(fn).parameters[name].default, key)
            for (fn, name), key in pairs]


@pytest.mark.parametrize("where, value, key", _library_defaults(), ids=lambda x: x if isinstance(x, str) else "")
def test_library_defaults_equal_params_yaml(where, value, key):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for part in key.split("."):
        data = data[part]
    assert value == data, f"{where} defaults to {value!r} but params.yaml {key} is {data!r}"
