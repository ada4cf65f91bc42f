"""Verifiable rewards: functions (Sample, RewardSettings) -> float, registered by name.

`correctness` checks the final answer with math-verify (numbers, "1,000", fractions, LaTeX). With
`strict_answer` (the default) only the '#### N' line the prompts ask for counts; otherwise "the answer is N",
\\boxed{N}, and as a last resort the last number in the text are accepted too. The lenient fallback pays a
completion that never states an answer (one cut off mid-calculation ends in some number), so a policy
trained on it learns to drop the format.
`format` rewards ending with an explicit final-answer line, the format the prompts ask for.
`overlong` is DAPO's soft overlong penalty (eq. 13), with L_max = rollout.max_new_tokens and
L_cache = reward.overlong_buffer:

    R(y) = 0                              |y| <= L_max - L_cache
           ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
           -1                             |y| > L_max
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

from grpo.registry import Registry

# math-verify stops a parse or a comparison after this many seconds (SIGALRM: stages score in their main
# thread). Without it, a completion or answer such as 10^{10^{10^{10}}} hangs scoring for good.
MATH_VERIFY_TIMEOUT_S = 5


@dataclass(frozen=True)
class Sample:
    """One completion as a reward function sees it."""

    completion: str
    ground_truth: str
    completion_tokens: int  # sampled tokens, EOS included
    finish_reason: str  # "stop" (EOS) or "length" (cut at max_new_tokens)


@dataclass(frozen=True)
class RewardSettings:
    strict_answer: bool  # reward.strict_answer
    max_completion_tokens: int  # rollout.max_new_tokens (DAPO's L_max)
    overlong_buffer: int  # reward.overlong_buffer (DAPO's L_cache)


RewardFn = Callable[[Sample, RewardSettings], float]
REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")

STATED_ANSWER = re.compile(r"####\s*([^\n]+)")  # "#### 42": the format the prompts ask for (GSM8K's)
# accepted too when not strict: "The answer is 42", "\boxed{42}"
_LENIENT_PATTERNS = [re.compile(r"answer is[:\s]*\$?([^\n]+)", re.IGNORECASE), re.compile(r"\\boxed\{([^{}]+)\}")]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str, *, strict: bool = True) -> str | None:
    """The completion's stated final answer: the number of its last '#### X' line. Not strict: else its last
    'answer is X' / boxed X, else its last number. None if it states none."""
    for pattern in [STATED_ANSWER] + ([] if strict else _LENIENT_PATTERNS):
        matches = pattern.findall(text)
        if matches:
            numbers = _NUMBER.findall(matches[-1])
            return numbers[0] if numbers else (None if strict else matches[-1].strip())
    if strict:
        return None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def gsm8k_ground_truth(answer: str) -> str:
    """'... #### 1,000' -> '1000' (GSM8K's answer field ends with the final answer after '####')."""
    if "####" not in answer:
        raise ValueError(f"answer has no '#### N' final line: {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


@REWARD_FUNCTIONS.register("correctness")
def correctness(sample: Sample, settings: RewardSettings) -> float:
    from math_verify import parse, verify

    # math-verify logs each timeout and unparsable answer; the reward (0) says enough
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    answer = final_answer(sample.completion, strict=settings.strict_answer)
    if answer is None:
        return 0.0
    gold = parse(sample.ground_truth, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    pred = parse(answer.replace(",", ""), parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    return 1.0 if verify(gold, pred, timeout_seconds=MATH_VERIFY_TIMEOUT_S) else 0.0


@REWARD_FUNCTIONS.register("format")
def format_reward(sample: Sample, settings: RewardSettings) -> float:
    """1 if the completion states its answer as '#### N' (or, not strict, 'The answer is N') on its last
    non-empty line."""
    lines = [line for line in sample.completion.strip().splitlines() if line.strip()]
    if not lines:
        return 0.0
    last = lines[-1]
    patterns = [STATED_ANSWER] + ([] if settings.strict_answer else _LENIENT_PATTERNS[:1])
    return 1.0 if any(p.search(last) for p in patterns) and _NUMBER.search(last) else 0.0


@REWARD_FUNCTIONS.register("overlong")
def overlong_penalty(sample: Sample, settings: RewardSettings) -> float:
    """DAPO's soft overlong punishment: 0, then linearly down to -1 over the last overlong_buffer tokens."""
    limit, buffer = settings.max_completion_tokens, settings.overlong_buffer
    length = sample.completion_tokens
    if length <= limit - buffer:
        return 0.0
    if length <= limit:
        return ((limit - buffer) - length) / buffer
    return -1.0
