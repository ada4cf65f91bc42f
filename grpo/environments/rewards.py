"""Verifiable rewards: functions (Sample, RewardSettings) -> float, registered by name.

`correctness` checks the final answer (grpo.environments.answers) with math-verify (numbers, "1,000", fractions,
LaTeX), graded so that no shortcut pays:

    1                          a correct answer on a last line '#### N', as the prompt asks
    reward.unformatted_credit  a correct answer stated otherwise ("the answer is N", \\boxed{N}, else the last
                               number), in a completion that ended (EOS); 0.5 by default
    0                          a wrong answer, formatted or not; a completion cut off mid-calculation

A format reward pays '#### <any number>' (a policy learns to write the line and stop thinking); an ungraded
lenient reward pays a correct sum however stated (a policy learns to drop the line); this grading pays neither.
`format` rewards ending with an explicit '#### N' line, right or wrong (not in the default weights).
`overlong` is DAPO's soft overlong penalty (eq. 13), with L_max = rollout.max_new_tokens and
L_cache = reward.overlong_buffer:

    R(y) = 0                              |y| <= L_max - L_cache
           ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
           -1                             |y| > L_max

`code_tests` runs the program the completion writes against the task's unit tests in the sandbox
(grpo.environments.code_tasks, grpo.environments.sandbox); the ground truth is the JSON {"test", "entry_point"[, "prompt"]}. Score: 1/0
with all_or_nothing, else the fraction of tests passed; why it is not 1 (a failed test, a timeout, a kill) is
returned with it as a RewardResult and lands in the score stage's reward_error column.
`reasoning_gym` scores the stated answer with the reasoning-gym generator's own verifier
(grpo.environments.reasoning_gym_tasks).

A reward returns a float, or a RewardResult(score, error) when it has a reason to record. A reward may also
register a batch form (BATCH_REWARD_FUNCTIONS: (samples, settings) -> one result per sample), which scoring
calls once for all samples instead of the per-sample function: code_tests's runs the programs in parallel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

from grpo.environments import code_tasks, reasoning_gym_tasks
from grpo.environments.answers import answer_as_asked, final_answer
from grpo.config import RewardConfig
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
    """What the reward functions read: params.yaml's reward section as it is, and the completions' length limit."""

    reward: RewardConfig  # unformatted_credit, overlong_buffer (DAPO's L_cache), code_tests, sandbox
    max_completion_tokens: int  # rollout.max_new_tokens (DAPO's L_max)


@dataclass(frozen=True)
class RewardResult:
    """A score and why it is not full marks (a failed test, a timeout), for the reward_error column."""

    score: float
    error: str | None = None


RewardFn = Callable[[Sample, RewardSettings], "float | RewardResult"]
BatchRewardFn = Callable[[Sequence[Sample], RewardSettings], "list[float | RewardResult]"]
REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")
# name -> the batch form of the reward of that name in REWARD_FUNCTIONS (scoring prefers it)
BATCH_REWARD_FUNCTIONS: Registry[BatchRewardFn] = Registry("batch reward function")

def same_number(answer: str | None, ground_truth: str) -> bool:
    """Whether a stated answer equals the ground truth, by math-verify (1,000 = 1000, 0.5 = 1/2, LaTeX)."""
    from math_verify import parse, verify

    if answer is None:
        return False
    # math-verify logs each timeout and unparsable answer; the reward (0) says enough
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(ground_truth, parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    pred = parse(answer.replace(",", ""), parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    return bool(verify(gold, pred, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


@REWARD_FUNCTIONS.register("correctness")
def correctness(sample: Sample, settings: RewardSettings) -> float:
    """1 for a correct answer stated as the prompt asks (a last line '#### N'); reward.unformatted_credit for a
    correct answer stated otherwise ('the answer is N', boxed, else the last number) in a completion that ended;
    0 for a wrong answer however it is stated, and for a completion cut off at max_new_tokens without the line."""
    as_asked = answer_as_asked(sample.completion)
    if as_asked is not None:
        return 1.0 if same_number(as_asked, sample.ground_truth) else 0.0
    credit = settings.reward.unformatted_credit
    if credit == 0.0 or sample.finish_reason != "stop":
        return 0.0
    return credit if same_number(final_answer(sample.completion, strict=False), sample.ground_truth) else 0.0


@REWARD_FUNCTIONS.register("format")
def format_reward(sample: Sample, settings: RewardSettings) -> float:
    """1 if the completion's last non-empty line states an answer as '#### N', right or wrong."""
    return 0.0 if answer_as_asked(sample.completion) is None else 1.0


@REWARD_FUNCTIONS.register("overlong")
def overlong_penalty(sample: Sample, settings: RewardSettings) -> float:
    """DAPO's soft overlong punishment: 0, then linearly down to -1 over the last overlong_buffer tokens."""
    limit, buffer = settings.max_completion_tokens, settings.reward.overlong_buffer
    length = sample.completion_tokens
    if length <= limit - buffer:
        return 0.0
    if length <= limit:
        return ((limit - buffer) - length) / buffer
    return -1.0


@REWARD_FUNCTIONS.register("code_tests")
def code_tests(sample: Sample, settings: RewardSettings) -> RewardResult:
    """The unit tests the completion's program passes (grpo.environments.code_tasks), run in the sandbox."""
    return code_tests_batch([sample], settings)[0]


@BATCH_REWARD_FUNCTIONS.register("code_tests")
def code_tests_batch(samples: Sequence[Sample], settings: RewardSettings) -> list[RewardResult]:
    """code_tests on every sample, up to the machine's cores programs at once. A sample with bad ground truth
    gets 0 and the parse error; the others still run. ConfigError (the sandbox cannot run) stops it all."""
    results: list[RewardResult | None] = [None] * len(samples)
    runnable = []
    for i, sample in enumerate(samples):
        try:
            code_tasks.parse_ground_truth(sample.ground_truth)
            runnable.append(i)
        except ValueError as e:
            results[i] = RewardResult(0.0, f"ValueError: {e}")
    scores = code_tasks.score_many([samples[i].completion for i in runnable], [samples[i].ground_truth for i in runnable],
                                   all_or_nothing=settings.reward.code_tests.all_or_nothing,
                                   timeout_s=settings.reward.code_tests.timeout_s,
                                   memory_mb=settings.reward.code_tests.memory_mb, sandbox=settings.reward.sandbox)
    for i, (score, error) in zip(runnable, scores):
        results[i] = RewardResult(score, error)
    return results


@REWARD_FUNCTIONS.register("reasoning_gym")
def reasoning_gym_reward(sample: Sample, settings: RewardSettings) -> float:
    """The reasoning-gym generator's own verifier on the completion's stated answer (grpo.environments.reasoning_gym_tasks)."""
    return reasoning_gym_tasks.score_completion(sample.completion, sample.ground_truth)
