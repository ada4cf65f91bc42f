"""Prompts from reasoning-gym's procedural generators (prompts.source reasoning_gym), scored by each
generator's own verifier (the `reasoning_gym` reward).

Entries: reasoning_gym.create_dataset("composite", ...) over prompts.reasoning_gym.datasets (generator name ->
sampling weight), with each generator's settings from prompts.reasoning_gym.config, `size` entries from the
generator seed `seed` (entry i is a function of (seed, i): the same params give the same entries). Repeated
questions are dropped (the first kept), so train and eval never share one.

A row's ground truth is what the verifier needs, as JSON: the generator's name and the whole entry,

    {"dataset": "chain_sum", "entry": {"question": "...", "answer": "6", "metadata": {...}}}

and its PROMPTS metadata names the generator and the entry's index: {"generator": "chain_sum", "index": 4}.

The answer in a completion (extract_answer): the text of its last `<answer>...</answer>` (reasoning-gym's own
convention), else the rest of its last line that starts with `#### ` (what the prompts ask for, as for the
arithmetic prompts). The verifier, `score_answer(answer, entry)` of the generator's dataset class, gives a
score in [0, 1]; some generators give partial credit. A completion that states no answer scores 0.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Callable

from grpo.errors import ConfigError

# appended to each question (grpo.environments.prompts.render_prompt)
REASONING_GYM_INSTRUCTION = "Give the final answer on the last line as: #### <answer>"

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_STATED_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)


def check_reasoning_gym() -> None:
    """ConfigError when the reasoning-gym package cannot be imported."""
    try:
        import reasoning_gym  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"prompts.source reasoning_gym / reward reasoning_gym need the reasoning-gym package "
                          f"(pip install reasoning-gym): {e}") from None


def reasoning_gym_rows(datasets: dict[str, float], config: dict[str, dict], size: int, seed: int) -> list[dict]:
    """`size` entries of the weighted mix of generators, repeated questions dropped: rows {"row" (1-based entry
    number), "question", "ground_truth", "metadata", "instruction"}. ConfigError naming the parameter for an
    unknown generator or a bad setting."""
    check_generators(datasets, config, seed)
    import reasoning_gym
    from reasoning_gym.composite import DatasetSpec

    specs = [DatasetSpec(name, float(weight), _plain(config.get(name, {}))) for name, weight in datasets.items()]
    mix = reasoning_gym.create_dataset("composite", size=size, seed=seed, datasets=specs)
    rows, seen = [], set()
    for i in range(size):
        entry = mix[i]
        key = " ".join(entry["question"].split())
        if key in seen:
            continue
        seen.add(key)
        generator = entry["metadata"]["source_dataset"]
        rows.append({"row": i + 1, "question": entry["question"], "ground_truth": ground_truth(generator, entry),
                     "metadata": json.dumps({"generator": generator, "index": int(entry["metadata"]["source_index"])}),
                     "instruction": REASONING_GYM_INSTRUCTION})
    return rows


def check_generators(datasets: dict[str, float], config: dict[str, dict], seed: int) -> None:
    """ConfigError naming the parameter for an unknown generator or settings it does not accept (each
    generator with settings is built once, with one entry)."""
    check_reasoning_gym()
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    for name in datasets:
        if name not in DATASETS or name == "composite":
            raise ConfigError(f"prompts.reasoning_gym.datasets.{name}: no such reasoning-gym generator; known: "
                              f"{', '.join(sorted(set(DATASETS) - {'composite'}))}")
    for name, settings in config.items():
        try:
            reasoning_gym.create_dataset(name, size=1, seed=seed, **_plain(settings))
        except Exception as e:  # TypeError (unknown setting), AssertionError/ValueError (its validate())
            raise ConfigError(f"prompts.reasoning_gym.config.{name} = {dict(settings)} is not accepted by the "
                              f"generator: {type(e).__name__}: {e}") from None


def ground_truth(generator: str, entry: dict) -> str:
    """The JSON the verifier reads back (module docstring). Metadata values JSON has no type for (a set, a
    tuple) come back as lists; a value JSON cannot hold at all is kept as its repr."""
    kept = {"question": entry["question"], "answer": entry["answer"], "metadata": entry["metadata"]}
    return json.dumps({"dataset": generator, "entry": kept}, default=_jsonable)


def parse_ground_truth(text: str) -> tuple[str, dict]:
    """(generator name, entry) from a reasoning_gym ground truth; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"reasoning_gym ground truth is not JSON ({e}): {text[:80]!r}") from None
    if not (isinstance(data, dict) and isinstance(data.get("dataset"), str) and isinstance(data.get("entry"), dict)):
        raise ValueError(f"reasoning_gym ground truth must be an object with 'dataset' (a string) and 'entry' "
                         f"(an object): {text[:80]!r}")
    return data["dataset"], data["entry"]


def extract_answer(completion: str) -> str | None:
    """The last <answer>...</answer>'s text, else the rest of the last '#### ' line; None if neither."""
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    stated = _STATED_LINE.findall(completion)
    return stated[-1] if stated else None


def score_completion(completion: str, ground_truth_text: str) -> float:
    """The generator's verifier on the completion's answer (0 when it states none). ValueError for bad
    ground truth."""
    name, entry = parse_ground_truth(ground_truth_text)
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    return float(_verifier(name)(answer, entry))


@lru_cache(maxsize=None)
def _verifier(name: str) -> Callable[[str, dict], float]:
    check_reasoning_gym()
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(name)
    except ValueError as e:
        raise ValueError(f"reasoning_gym ground truth names an unknown generator: {e}") from None


def _plain(settings: dict) -> dict:
    """Settings as the generators' config dataclasses take them (lists as tuples, like their defaults)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)
