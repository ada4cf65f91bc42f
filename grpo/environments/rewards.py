"""Verifiable rewards: functions (Sample, RewardSettings) -> float, registered by name.

`correctness` checks the final answer (grpo.environments.answers) with math-verify (numbers, "1,000", fractions,
LaTeX). With reward.strict_answer only the '#### N' line the prompts ask for counts; otherwise "the answer is N",
\\boxed{N}, and as a last resort the last number in the text are accepted too. The lenient fallback pays a
completion that never states an answer (one cut off mid-calculation ends in some number), so a policy
trained on it learns to drop the format.
`format` rewards ending with an explicit final-answer line, the format the prompts ask for.
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
`human` is a person's rating of the completion, mapped to [0, 1] (grpo.environments.human); a completion without
one stops the scoring with a message, or with reward.human.unrated: model gets the reward model's score.
`reward_model` is the score of the reward model trained on the ratings so far (grpo.models.reward_model), in [0, 1].

A reward returns a float, or a RewardResult(score, error) when it has a reason to record. A reward may also
register a batch form (BATCH_REWARD_FUNCTIONS: (samples, settings) -> one result per sample), which scoring
calls once for all samples instead of the per-sample function: code_tests's runs the programs in parallel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from grpo.environments import code_tasks, reasoning_gym_tasks
from grpo.environments.human import IterationRatings
from grpo.environments.answers import LENIENT_ANSWERS, NUMBER, STATED_ANSWER, final_answer
from grpo.config import RewardConfig
from grpo.errors import ConfigError, InputError
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
    key: Optional[tuple[str, int]] = None  # (group_id, sample_index) of a rollouts row: what `human` looks up
    prompt: str = ""  # the rendered prompt (the reward model reads prompt + completion)


@dataclass(frozen=True)
class RewardSettings:
    """What the reward functions read: params.yaml's reward section as it is, and the completions' length limit."""

    reward: RewardConfig  # strict_answer, overlong_buffer (DAPO's L_cache), code_tests, sandbox, human
    max_completion_tokens: int  # rollout.max_new_tokens (DAPO's L_max)
    ratings: Optional[IterationRatings] = None  # `human`: the iteration's ratings (the score stage reads them)
    # `reward_model` (and `human`'s unrated completions with unrated: model): samples -> scores in [0, 1]
    reward_model: Optional[Callable[[Sequence["Sample"]], list[float]]] = None


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

@REWARD_FUNCTIONS.register("correctness")
def correctness(sample: Sample, settings: RewardSettings) -> float:
    from math_verify import parse, verify

    # math-verify logs each timeout and unparsable answer; the reward (0) says enough
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    answer = final_answer(sample.completion, strict=settings.reward.strict_answer)
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
    patterns = [STATED_ANSWER] + ([] if settings.reward.strict_answer else LENIENT_ANSWERS[:1])
    return 1.0 if any(p.search(last) for p in patterns) and NUMBER.search(last) else 0.0


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


@REWARD_FUNCTIONS.register("human")
def human(sample: Sample, settings: RewardSettings) -> float:
    """A person's rating of the completion, in [0, 1] (grpo.environments.human)."""
    return human_batch([sample], settings)[0]


@BATCH_REWARD_FUNCTIONS.register("human")
def human_batch(samples: Sequence[Sample], settings: RewardSettings) -> list[float]:
    """The ratings of the samples' completions; unrated ones stop the scoring (InputError saying how many await
    ratings and how to rate them), or with reward.human.unrated: model get the reward model's scores."""
    if settings.ratings is None:
        raise ConfigError("the human reward needs the iteration's ratings: score with pipeline/score.py --ratings")
    values = [settings.ratings.values.get(s.key) for s in samples]
    unrated = [i for i, v in enumerate(values) if v is None]
    if unrated and settings.reward.human.unrated != "model":
        raise InputError(settings.ratings.awaiting([samples[i].key for i in unrated], len(samples)))
    if unrated:
        for i, score in zip(unrated, reward_model_batch([samples[i] for i in unrated], settings)):
            values[i] = score
    return values


@REWARD_FUNCTIONS.register("reward_model")
def reward_model(sample: Sample, settings: RewardSettings) -> float:
    """The reward model's score of the completion, in [0, 1] (grpo.models.reward_model)."""
    return reward_model_batch([sample], settings)[0]


@BATCH_REWARD_FUNCTIONS.register("reward_model")
def reward_model_batch(samples: Sequence[Sample], settings: RewardSettings) -> list[float]:
    if settings.reward_model is None:
        raise ConfigError("the reward_model reward needs a trained reward model: score with pipeline/score.py "
                          "--reward-model data/reward_models/<k> (stage reward-model@k)")
    return [float(v) for v in settings.reward_model(list(samples))]
