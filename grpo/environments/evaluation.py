"""How the evaluate stage scores a checkpoint's greedy completions of the held-out prompts, by the kind of their
ground truth (grpo.environments.scoring.ground_truth_kind): each scorer returns per-problem columns and metrics.

    answer         eval/accuracy (correctness as reward.strict_answer reads it), eval/accuracy_strict (a last
                   line '#### N', right), eval/accuracy_lenient, eval/format_rate (a last line '#### N'),
                   eval/copied_answer_rate (a wrong final answer that is one of the question's own numbers)
    code_tests     eval/pass_rate: the fraction whose greedy program passes every test (code_tests with
                   all_or_nothing, in the sandbox, with reward.code_tests' limits and reward.sandbox)
    reasoning_gym  eval/accuracy: the mean of the generators' verifier scores; eval/format_rate: the fraction
                   that state an answer (<answer>...</answer> or '#### ...')
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from grpo.config import Params
from grpo.environments.answers import final_answer, numbers_in
from grpo.environments.reasoning_gym_tasks import extract_answer
from grpo.environments.rewards import RewardSettings, Sample
from grpo.environments.scoring import reward_settings, score_completions
from grpo.registry import Registry

# (samples, the questions they answer, params) -> (per-problem columns, metrics)
HeldOutScorer = Callable[[list[Sample], list[str], Params], "tuple[dict[str, list], dict[str, float]]"]
HELD_OUT_SCORERS: Registry[HeldOutScorer] = Registry("held-out scorer")


@HELD_OUT_SCORERS.register("answer")
def answer_scores(samples: list[Sample], questions: list[str], params: Params) -> tuple[dict, dict]:
    """Correctness as the training reward counts it (reward.strict_answer), leniently for comparison, the
    format, and a shortcut a policy can learn, copying a number of the question: (per-problem columns,
    metrics)."""
    settings = {strict: RewardSettings(dataclasses.replace(params.reward, strict_answer=strict),
                                     params.eval.max_new_tokens)
                for strict in (True, False)}
    # format reads the '#### N' line whatever strict_answer says: the lenient pass needs correctness only
    scores = {True: score_completions(samples, {"correctness": 1.0, "format": 1.0}, settings[True]),
              False: score_completions(samples, {"correctness": 1.0}, settings[False])}
    correct = {strict: [v == 1.0 for v in scores[strict]["reward_correctness"]] for strict in (True, False)}
    columns = {"correct": correct[params.reward.strict_answer], "correct_strict": correct[True],
               "correct_lenient": correct[False], "format_ok": [v == 1.0 for v in scores[True]["reward_format"]]}
    answers = [final_answer(s.completion, strict=False) for s in samples]
    columns["copied_answer"] = [answer is not None and not right and answer.replace(",", "") in numbers_in(question)
                                for answer, right, question in zip(answers, correct[False], questions)]
    return columns, {"eval/accuracy": _mean(columns["correct"]), "eval/accuracy_strict": _mean(columns["correct_strict"]),
                     "eval/accuracy_lenient": _mean(columns["correct_lenient"]),
                     "eval/format_rate": _mean(columns["format_ok"]),
                     "eval/copied_answer_rate": _mean(columns["copied_answer"])}


@HELD_OUT_SCORERS.register("code_tests")
def code_scores(samples: list[Sample], questions: list[str], params: Params) -> tuple[dict, dict]:
    """Pass@1 of the greedy programs: every test must pass (all_or_nothing), whatever the training reward
    counts. The reason a program fails is kept per problem ("error")."""
    reward = dataclasses.replace(params.reward, code_tests=dataclasses.replace(params.reward.code_tests, all_or_nothing=True))
    settings = RewardSettings(reward, max_completion_tokens=params.rollout.max_new_tokens)
    scores = score_completions(samples, {"code_tests": 1.0}, settings)
    columns = {"correct": [v == 1.0 for v in scores["reward_code_tests"]], "error": scores["reward_error"]}
    return columns, {"eval/pass_rate": _mean(columns["correct"])}


@HELD_OUT_SCORERS.register("reasoning_gym")
def reasoning_gym_scores(samples: list[Sample], questions: list[str], params: Params) -> tuple[dict, dict]:
    """The generators' own verifiers (some give partial credit: accuracy is the mean score)."""
    scores = score_completions(samples, {"reasoning_gym": 1.0}, reward_settings(params))
    columns = {"score": scores["reward_reasoning_gym"], "correct": [v == 1.0 for v in scores["reward_reasoning_gym"]],
               "answer_stated": [extract_answer(s.completion) is not None for s in samples],
               "error": scores["reward_error"]}
    return columns, {"eval/accuracy": _mean(columns["score"]), "eval/format_rate": _mean(columns["answer_stated"])}


def _mean(values) -> float:
    return float(sum(values) / len(values)) if len(values) else 0.0
