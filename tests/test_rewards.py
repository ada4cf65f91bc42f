"""Rewards: the strict and lenient correctness, the format reward, DAPO's soft overlong penalty, math-verify's
timeout, and scoring that records a reward function's error instead of dying."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from grpo.environments.answers import final_answer
from grpo.environments.rewards import REWARD_FUNCTIONS, RewardSettings, Sample, correctness, format_reward, overlong_penalty
from grpo.environments.scoring import score_completions
from tests.project import ROOT, reward_settings

STRICT = reward_settings(strict_answer=True, max_completion_tokens=48, overlong_buffer=16)
LENIENT = reward_settings(strict_answer=False, max_completion_tokens=48, overlong_buffer=16)


def sample(text: str, truth: str = "42", tokens: int = 10, finish: str = "stop") -> Sample:
    return Sample(text, truth, tokens, finish)


@pytest.mark.parametrize("text,strict,lenient", [
    ("20 + 22 = 42\n#### 42", 1.0, 1.0),
    ("#### 1,000", 0.0, 0.0),
    ("So the total is 42.\n####42", 1.0, 1.0),
    ("The answer is 42", 0.0, 1.0),
    ("\\boxed{42}", 0.0, 1.0),
    # cut off mid-calculation: never states an answer; only the lenient last-number fallback pays it
    ("She has 20 apples and gets 22 more, so 20 + 22 = 42 and then", 0.0, 1.0),
    ("#### 41\nwait, 20 + 22 = 42", 0.0, 0.0),  # the stated answer is 41
    ("#### 42\nI hope that helps!", 0.0, 1.0),  # right, but not on the last line as the prompt asks
    ("#### forty-two", 0.0, 0.0),
    ("", 0.0, 0.0),
])
def test_correctness_strict_and_lenient(text, strict, lenient):
    assert correctness(sample(text), STRICT) == strict
    assert correctness(sample(text), LENIENT) == lenient


def test_final_answer_reads_the_last_stated_line():
    assert final_answer("#### 3\n#### 5") == "5"
    assert final_answer("no answer, 7 and 8") is None
    assert final_answer("no answer, 7 and 8", strict=False) == "8"
    assert correctness(sample("#### 1,000", truth="1000"), STRICT) == 1.0


def test_format_reward_wants_the_final_line():
    assert format_reward(sample("20 + 22 = 42\n#### 42"), STRICT) == 1.0
    assert format_reward(sample("#### 42\nthat is all"), STRICT) == 0.0
    assert format_reward(sample("The answer is 42"), STRICT) == 0.0
    assert format_reward(sample("The answer is 42"), LENIENT) == 1.0


@pytest.mark.parametrize("tokens,expected", [(1, 0.0), (32, 0.0), (33, -1 / 16), (40, -0.5), (48, -1.0), (60, -1.0)])
def test_soft_overlong_penalty_is_dapos(tokens, expected):
    # L_max = 48, L_cache = 16: 0 up to 32 tokens, then linearly down to -1 at 48
    assert overlong_penalty(sample("x", tokens=tokens), STRICT) == pytest.approx(expected)


def test_scoring_weights_rewards_and_records_errors():
    def broken(s: Sample, settings: RewardSettings) -> float:
        raise RuntimeError("reward bug")

    if "test_broken" not in REWARD_FUNCTIONS:
        REWARD_FUNCTIONS.register("test_broken")(broken)
    columns = score_completions([sample("#### 42", tokens=40), sample("#### 7", tokens=5)],
                                {"correctness": 1.0, "overlong": 1.0, "test_broken": 1.0}, STRICT)
    assert columns["reward_correctness"] == [1.0, 0.0]
    assert columns["reward_overlong"] == [-0.5, 0.0]
    assert columns["reward"] == [0.5, 0.0]
    assert columns["reward_error"] == ["test_broken: RuntimeError: reward bug"] * 2


@pytest.mark.slow
def test_math_verify_times_out_instead_of_hanging():
    """A ground truth whose evaluation never ends (10^10^10^10) scores 0 after math-verify's timeout; with the
    timeouts off, scoring hangs (the subprocess would hit the 120 s limit)."""
    code = ("from grpo.environments.rewards import Sample, correctness\n"
            "from tests.project import reward_settings\n"
            "print(correctness(Sample('#### 5', '$10^{10^{10^{10}}}$', 3, 'stop'), reward_settings(strict_answer=True)))")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.0"
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("strict", [True, False])
def test_evaluate_reports_strict_and_lenient_accuracy_whatever_the_training_reward(strict):
    """eval/accuracy follows reward.strict_answer; eval/accuracy_strict, eval/accuracy_lenient, the format rate and
    the rate of answers copied from the question never move."""
    import dataclasses

    from grpo.config import load_params
    from grpo.environments.evaluation import answer_scores

    samples = [Sample("3 + 4 = 7\n#### 7", "7", 9, "stop"),  # right, stated as asked
               Sample("3 + 4 = 7. The answer is 7", "7", 10, "stop"),  # right, not as asked
               Sample("#### 8", "7", 3, "stop"),  # wrong, formatted
               Sample("#### 4", "7", 3, "stop")]  # wrong: a number of the question, copied
    questions = ["What is 3 + 4?"] * 4
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, reward=dataclasses.replace(params.reward, strict_answer=strict))
    columns, metrics = answer_scores(samples, questions, params)
    assert metrics["eval/accuracy_strict"] == pytest.approx(1 / 4)
    assert metrics["eval/accuracy_lenient"] == pytest.approx(2 / 4)
    assert metrics["eval/accuracy"] == pytest.approx(1 / 4 if strict else 2 / 4)
    assert columns["correct_strict"] == [True, False, False, False] and metrics["eval/format_rate"] == pytest.approx(3 / 4)
    assert columns["copied_answer"] == [False, False, False, True] and metrics["eval/copied_answer_rate"] == 0.25
