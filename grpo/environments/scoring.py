"""Offline reward scoring: every weighted reward function on every completion, combined by weight.

    reward = sum_k weight_k * reward_k(sample)

A function that raises scores 0 for that completion, and the error is kept in `reward_error` (never
silently dropped): the rollout stays inspectable and the run goes on. A function that returns a
RewardResult with an error (code_tests: a failed test, a timeout, a killed program) has that error kept there
too. A UserError (ConfigError: the sandbox cannot run) is not a per-row problem: it stops the scoring.

A reward with a batch form (grpo.environments.rewards.BATCH_REWARD_FUNCTIONS) is called once with every sample (code_tests
runs the programs in parallel); the others once per sample.
"""

from __future__ import annotations

import json
import time
from typing import Mapping, Sequence

from grpo.errors import UserError
from grpo.environments.reasoning_gym_tasks import check_reasoning_gym
from grpo.environments.rewards import BATCH_REWARD_FUNCTIONS, REWARD_FUNCTIONS, RewardResult, RewardSettings, Sample
from grpo.environments.sandbox import check_sandbox


def score_completions(samples: Sequence[Sample], weights: Mapping[str, float], settings: RewardSettings,
                      *, seconds: dict[str, float] | None = None) -> dict[str, list]:
    """Columns reward_<name> (one per weighted function), reward and reward_error. `seconds`, when given, is
    filled with the wall time each function took over all samples."""
    per_function = {}  # name -> [(value, error or None)] per sample
    for name in weights:
        start = time.perf_counter()
        per_function[name] = _score_one_function(name, samples, settings)
        if seconds is not None:
            seconds[name] = time.perf_counter() - start
    columns: dict[str, list] = {f"reward_{name}": [value for value, _ in results]
                                for name, results in per_function.items()}
    columns["reward"], columns["reward_error"] = [], []
    for i in range(len(samples)):
        columns["reward"].append(sum(weights[name] * per_function[name][i][0] for name in weights))
        errors = [f"{name}: {per_function[name][i][1]}" for name in weights if per_function[name][i][1]]
        columns["reward_error"].append("; ".join(errors) if errors else None)
    return columns


def _score_one_function(name: str, samples: Sequence[Sample], settings: RewardSettings) -> list[tuple[float, str | None]]:
    if name in BATCH_REWARD_FUNCTIONS:
        try:
            return [_as_pair(result) for result in BATCH_REWARD_FUNCTIONS.get(name)(samples, settings)]
        except UserError:
            raise
        except Exception as e:  # a reward bug must not kill the run; every row records it
            return [(0.0, f"{type(e).__name__}: {e}")] * len(samples)
    fn = REWARD_FUNCTIONS.get(name)
    results = []
    for sample in samples:
        try:
            results.append(_as_pair(fn(sample, settings)))
        except UserError:
            raise
        except Exception as e:  # a reward bug must not kill the run; it is recorded per row
            results.append((0.0, f"{type(e).__name__}: {e}"))
    return results


def _as_pair(result: float | RewardResult) -> tuple[float, str | None]:
    if isinstance(result, RewardResult):
        return float(result.score), result.error
    return float(result), None


def reward_settings(params, *, ratings=None, reward_model=None) -> RewardSettings:
    """The reward functions' settings from the typed params (grpo.config.Params); `ratings` and `reward_model`
    for the human and reward_model rewards (see RewardSettings)."""
    return RewardSettings(params.reward, max_completion_tokens=params.rollout.max_new_tokens, ratings=ratings,
                          reward_model=reward_model)


def needs_reward_model(reward) -> bool:
    """Whether scoring with params.reward calls the reward model: weighted, or scoring unrated completions."""
    return "reward_model" in reward.weights or ("human" in reward.weights and reward.human.unrated == "model")


def check_reward_requirements(reward) -> None:
    """What the weighted rewards need to run here (params.reward): code_tests with reward.sandbox bwrap needs a
    working bwrap, reasoning_gym the reasoning-gym package. ConfigError naming the cause, never a fallback."""
    if "code_tests" in reward.weights and reward.sandbox == "bwrap":
        check_sandbox()
    if "reasoning_gym" in reward.weights:
        check_reasoning_gym()


def ground_truth_kind(ground_truth: str) -> str:
    """Which reward reads this ground truth: "code_tests" for a code task's JSON {"test", "entry_point", ...},
    "reasoning_gym" for a reasoning-gym entry's JSON {"dataset", "entry"}, else "answer" (a final answer)."""
    try:
        data = json.loads(ground_truth)
    except ValueError:
        return "answer"
    if isinstance(data, dict) and "test" in data and "entry_point" in data:
        return "code_tests"
    if isinstance(data, dict) and "dataset" in data and "entry" in data:
        return "reasoning_gym"
    return "answer"


def samples_from_table(table) -> list[Sample]:
    """Samples from a rollouts table (pyarrow or pandas) with the ROLLOUTS columns."""
    names = ("completion", "ground_truth", "completion_tokens", "finish_reason", "group_id", "sample_index", "prompt")
    columns = {name: (table[name].to_pylist() if hasattr(table[name], "to_pylist") else list(table[name]))
               for name in names}
    return [Sample(c, truth, tokens, finish, key=(group, index), prompt=prompt)
            for c, truth, tokens, finish, group, index, prompt in zip(*(columns[n] for n in names), strict=True)]
