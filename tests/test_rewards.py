"""Rewards: the graded correctness (strict, graded, lenient), the format reward, DAPO's soft overlong penalty, math-verify's
timeout, and scoring that records a reward function's error instead of dying."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from grpo.config import load_params
from grpo.environments.answers import final_answer
from grpo.environments.rewards import REWARD_FUNCTIONS, RewardSettings, Sample, correctness, format_reward, overlong_penalty
from grpo.environments.scoring import score_completions
from tests.project import ROOT, reward_settings

STRICT = reward_settings(unformatted_credit=0.0, max_completion_tokens=48, overlong_buffer=16)
GRADED = reward_settings(unformatted_credit=0.5, max_completion_tokens=48, overlong_buffer=16)  # the default
LENIENT = reward_settings(unformatted_credit=1.0, max_completion_tokens=48, overlong_buffer=16)


def sample(text: str, truth: str = "42", tokens: int = 10, finish: str = "stop") -> Sample:
    return Sample(text, truth, tokens, finish)


def test_the_default_grades_correctness():
    assert load_params(ROOT / "params.yaml").reward.unformatted_credit == 0.5


@pytest.mark.parametrize("text,finish,strict,graded,lenient", [
    ("20 + 22 = 42\n#### 42", "stop", 1.0, 1.0, 1.0),  # right, stated as asked
    ("So the total is 42.\n####42", "stop", 1.0, 1.0, 1.0),
    ("#### 1,000", "stop", 0.0, 0.0, 0.0),  # formatted and wrong: nothing, however it is read
    ("#### 41\nwait, 20 + 22 = 42", "stop", 0.0, 0.0, 0.0),  # the stated answer is 41
    ("The answer is 42", "stop", 0.0, 0.5, 1.0),  # right, not as asked: the credit
    ("\\boxed{42}", "stop", 0.0, 0.5, 1.0),
    ("So 20 + 22 = 42", "stop", 0.0, 0.5, 1.0),  # the last number of a completion that ended
    # cut off mid-calculation: it never states an answer, its last number pays nothing
    ("She has 20 apples and gets 22 more, so 20 + 22 = 42 and then", "length", 0.0, 0.0, 0.0),
    ("20 + 22 = 42\n#### 42", "length", 1.0, 1.0, 1.0),  # the line was written before the cut
    ("#### forty-two", "stop", 0.0, 0.0, 0.0),
    ("", "stop", 0.0, 0.0, 0.0),
])
def test_correctness_pays_most_for_the_answer_as_asked(text, finish, strict, graded, lenient):
    for settings, expected in ((STRICT, strict), (GRADED, graded), (LENIENT, lenient)):
        assert correctness(sample(text, finish=finish), settings) == expected, settings.reward.unformatted_credit


def test_final_answer_reads_the_last_stated_line():
    assert final_answer("#### 3\n#### 5") == "5"
    assert final_answer("no answer, 7 and 8") is None
    assert final_answer("no answer, 7 and 8", strict=False) == "8"
    assert correctness(sample("#### 1,000", truth="1000"), STRICT) == 1.0


def test_format_reward_wants_the_final_line():
    assert format_reward(sample("20 + 22 = 42\n#### 42"), GRADED) == 1.0
    assert format_reward(sample("#### 7"), GRADED) == 1.0  # right or wrong
    assert format_reward(sample("#### 42\nthat is all"), GRADED) == 0.0
    assert format_reward(sample("The answer is 42"), LENIENT) == 0.0


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
            "print(correctness(Sample('#### 5', '$10^{10^{10^{10}}}$', 3, 'stop'), reward_settings()))")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.0"
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("unformatted_credit", [0.0, 0.5, 1.0])
def test_evaluate_reports_the_answer_as_asked_and_the_shortcuts_whatever_the_training_reward(unformatted_credit):
    """eval/accuracy is the answer as the prompt asks for it, whatever the training reward pays; a dropped
    format (lenient accuracy, format rate) and a copied number (copied_answer_rate) are measured beside it."""
    import dataclasses

    from grpo.environments.evaluation import answer_scores

    samples = [Sample("3 + 4 = 7\n#### 7", "7", 9, "stop"),  # right, stated as asked
               Sample("3 + 4 = 7. The answer is 7", "7", 10, "stop"),  # right, not as asked
               Sample("#### 8", "7", 3, "stop"),  # wrong, formatted
               Sample("#### 3", "7", 3, "stop")]  # wrong: a number of the question
    questions = ["What is 3 + 4?"] * 4
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, reward=dataclasses.replace(params.reward, unformatted_credit=unformatted_credit))
    columns, metrics = answer_scores(samples, questions, params)
    assert metrics["eval/accuracy"] == metrics["eval/accuracy_strict"] == pytest.approx(1 / 4)
    assert metrics["eval/accuracy_lenient"] == pytest.approx(2 / 4)
    assert metrics["eval/format_rate"] == pytest.approx(3 / 4)
    assert columns["copied_answer"] == [False, False, False, True] and metrics["eval/copied_answer_rate"] == 0.25
