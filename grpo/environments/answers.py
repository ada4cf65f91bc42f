"""The answer format of the dataset environments, in one place: the prompts ask for a last line '#### N'
(GSM8K's), the ground truth of a GSM8K-format file ends with one, and the rewards read it back.

    ANSWER_INSTRUCTION          what the prompt asks for
    final_answer(text, strict)  the number a completion states: its last '#### N' line; not strict, else
                                "the answer is N", \\boxed{N}, else its last number
    ground_truth_number(text)   N of a ground truth's '#### N' tail, exactly a number (42, -3, 1,000, 2.5), or None
"""

from __future__ import annotations

import re

MARKER = "####"
ANSWER_INSTRUCTION = f"Give the final answer on the last line as: {MARKER} <number>"

STATED_ANSWER = re.compile(MARKER + r"\s*([^\n]+)")  # "#### 42": the line the prompts ask for
# accepted too when not strict: "The answer is 42", "\boxed{42}"
LENIENT_ANSWERS = [re.compile(r"answer is[:\s]*\$?([^\n]+)", re.IGNORECASE), re.compile(r"\\boxed\{([^{}]+)\}")]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")  # a number anywhere in a completion
# a ground truth's N: digits, optionally a minus sign, thousands commas (1,000) and decimals (2.5)
_EXACT_NUMBER = re.compile(r"\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*")


def final_answer(text: str, *, strict: bool = True) -> str | None:
    """The completion's stated final answer: the number of its last '#### X' line. Not strict: else its last
    'answer is X' / boxed X, else its last number. None if it states none."""
    for pattern in [STATED_ANSWER] + ([] if strict else LENIENT_ANSWERS):
        matches = pattern.findall(text)
        if matches:
            numbers = NUMBER.findall(matches[-1])
            return numbers[0] if numbers else (None if strict else matches[-1].strip())
    if strict:
        return None
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def ground_truth_number(text: str) -> str | None:
    """'1,000' -> '1000' for the text after a ground truth's last '####' when it is exactly one number
    (surrounding whitespace allowed), else None."""
    number = _EXACT_NUMBER.fullmatch(text)
    return None if number is None else number.group(1).replace(",", "")
