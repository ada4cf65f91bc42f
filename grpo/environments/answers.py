"""The answer format of the dataset environments, in one place: the prompts ask for a last line '#### N'
(GSM8K's), the ground truth of a GSM8K-format file ends with one, and the rewards read it back.

    ANSWER_INSTRUCTION          what the prompt asks for
    final_answer(text, strict)  the number a completion states: strict, its last line when that is '#### N' (as
                                the prompt asks); not strict, its last '#### N' anywhere, else "the answer is
                                N", \\boxed{N}, else its last number
    ground_truth_number(text)   N of a ground truth's '#### N' tail, exactly a number (42, -3, 1,000, 2.5), or None
    numbers_in(text)            the numbers a text mentions, commas dropped ("1,000" -> "1000")
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
    """The completion's stated final answer. Strict: the number of its last non-empty line when that line is
    '#### X' (the answer stated the way the prompt asks), else None. Not strict: its last '#### X' line, else its
    last 'answer is X' / boxed X, else its last number; None if it states none."""
    if strict:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        match = STATED_ANSWER.search(lines[-1]) if lines else None
        numbers = NUMBER.findall(match.group(1)) if match else []
        return numbers[0] if numbers else None
    for pattern in [STATED_ANSWER, *LENIENT_ANSWERS]:
        matches = pattern.findall(text)
        if matches:
            numbers = NUMBER.findall(matches[-1])
            return numbers[0] if numbers else matches[-1].strip()
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def numbers_in(text: str) -> set[str]:
    return {n.replace(",", "") for n in NUMBER.findall(text)}


def ground_truth_number(text: str) -> str | None:
    """'1,000' -> '1000' for the text after a ground truth's last '####' when it is exactly one number
    (surrounding whitespace allowed), else None."""
    number = _EXACT_NUMBER.fullmatch(text)
    return None if number is None else number.group(1).replace(",", "")
