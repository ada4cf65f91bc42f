"""Verifiable rewards: functions (completion, ground_truth) -> float, registered by name.

`correctness` checks the final answer with math-verify (numbers, "1,000", fractions, LaTeX, \\boxed{}).
`format` rewards ending with an explicit final-answer line, the format the prompts ask for.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

from grpo.registry import Registry

RewardFn = Callable[[str, str], float]
REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")

# "#### 42" (GSM8K), "The answer is 42", "\boxed{42}"
_ANSWER_PATTERNS = [
    re.compile(r"####\s*([^\n]+)"),
    re.compile(r"answer is[:\s]*\$?([^\n]+)", re.IGNORECASE),
    re.compile(r"\\boxed\{([^{}]+)\}"),
]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The completion's stated final answer: the last '#### X' / 'answer is X' / boxed X, else its last number."""
    for pattern in _ANSWER_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            numbers = _NUMBER.findall(matches[-1])
            return numbers[0] if numbers else matches[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def gsm8k_ground_truth(answer: str) -> str:
    """'... #### 1,000' -> '1000' (GSM8K's answer field ends with the final answer after '####')."""
    if "####" not in answer:
        raise ValueError(f"answer has no '#### N' final line: {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _quiet_math_verify():
    # math-verify warns on every call that its signal-based timeout is off; we turn it off on purpose,
    # because signals only work in the main thread and Prefect runs tasks in worker threads.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


@REWARD_FUNCTIONS.register("correctness")
def correctness(completion: str, ground_truth: str) -> float:
    from math_verify import parse, verify

    _quiet_math_verify()
    answer = final_answer(completion)
    if answer is None:
        return 0.0
    gold = parse(ground_truth, parsing_timeout=None)
    pred = parse(answer.replace(",", ""), parsing_timeout=None)
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


@REWARD_FUNCTIONS.register("format")
def format_reward(completion: str, ground_truth: str) -> float:
    """1 if the completion states its answer as '#### N' or 'The answer is N' on its last non-empty line."""
    lines = [line for line in completion.strip().splitlines() if line.strip()]
    if not lines:
        return 0.0
    last = lines[-1]
    return 1.0 if any(p.search(last) for p in _ANSWER_PATTERNS[:2]) and _NUMBER.search(last) else 0.0
