"""Row-level validation of prompts files (grpo.environments.prompts): every bad row is reported in one InputError that
names the file, the line (JSONL) or row (Parquet), the column and what is wrong; duplicates; too-long
prompts; the check-inputs and prepare-prompts stages on top."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from grpo.errors import InputError
from grpo.environments.prompt_files import MAX_LISTED, file_rows, parse_answer, read_prompt_file, split_rows
from grpo.environments.prompts import build_prompt_rows, context_limit, model_context, render_prompt, skip_too_long

ROOT = Path(__file__).resolve().parents[1]
GOOD = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}]


def _jsonl(path: Path, *lines) -> Path:
    """Write lines: dicts as JSON, str/bytes as they are."""
    out = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        out += (line if isinstance(line, bytes) else line.encode()) + b"\n"
    path.write_bytes(out)
    return path


def _error(path, *, gsm8k: bool = False, question: str = "question", answer: str = "answer") -> str:
    with pytest.raises(InputError) as info:
        read_prompt_file(path, question, answer, gsm8k=gsm8k)
    return str(info.value)


# --------------------------------------------------------------------------------------------- good rows


def test_good_file_rows_keep_physical_line_numbers_and_answers_as_strings(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], "", "   ", {"question": "Q3", "answer": 7},
                  {"question": "Q4", "answer": 2.5}, {"question": "Q5", "answer": 3.0},
                  {"question": "Q6", "answer": "Work...\n#### 1,000"}, {"question": "Q7", "answer": "\\frac{1}{2}"})
    prompts = read_prompt_file(path, "question", "answer")
    assert [(r["row"], r["ground_truth"]) for r in prompts.rows] == [
        (1, "2"), (4, "7"), (5, "2.5"), (6, "3"), (7, "1000"), (8, "\\frac{1}{2}")]
    assert prompts.unit == "line" and prompts.duplicates == [] and prompts.data_source == "p"


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\r\n" + json.dumps(GOOD[1]).encode() + b"\r\n")
    assert [r["row"] for r in read_prompt_file(path, "question", "answer").rows] == [1, 2]


@pytest.mark.parametrize("answer,truth", [("so 18.\n#### 18", "18"), ("x\n####  -3 ", "-3"), ("y\n#### 1,234,567", "1234567"),
                                          ("z\n#### 2.75\n", "2.75")])
def test_gsm8k_final_line_numbers(answer, truth):
    assert parse_answer(answer, gsm8k=True) == (truth, None)


def test_repo_gsm8k_sample_is_valid():
    prompts = read_prompt_file(ROOT / "data/raw/gsm8k_test_sample.jsonl", "question", "answer", gsm8k=True)
    assert len(prompts.rows) == 20 and prompts.rows[0]["ground_truth"] == "18"


def test_metadata_names_the_1_based_line_and_file(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], "", GOOD[1])
    rows = file_rows(path, "question", "answer", seed=0, num_train=5, num_eval=1, data_source="p")
    assert sorted(json.loads(r["metadata"])["row"] for r in rows) == [1, 3]
    assert {json.loads(r["metadata"])["source_file"] for r in rows} == {"p.jsonl"}


# ----------------------------------------------------------------------------------------- one bad row


@pytest.mark.parametrize(
    "bad,column,what",
    [
        ({"answer": "3"}, "question", "missing"),
        ({"question": None, "answer": "3"}, "question", "is null; expected a non-empty string"),
        ({"question": 12, "answer": "3"}, "question", "is a number (12); expected a non-empty string"),
        ({"question": "", "answer": "3"}, "question", "is empty; expected a non-empty string"),
        ({"question": " \t ", "answer": "3"}, "question", "is blank (whitespace only); expected a non-empty string"),
        ({"question": "Q"}, "answer", "missing"),
        ({"question": "Q", "answer": None}, "answer", "is null; expected a non-empty string or a number"),
        ({"question": "Q", "answer": ""}, "answer", "is empty; expected a non-empty string or a number"),
        ({"question": "Q", "answer": True}, "answer", "is a boolean (true); expected a non-empty string or a number"),
        ({"question": "Q", "answer": [1, 2]}, "answer", "is a list ([1, 2]); expected a non-empty string or a number"),
        ({"question": "Q", "answer": {"v": 1}}, "answer", 'is an object ({"v": 1}); expected a non-empty string or a number'),
        ({"question": "Q", "answer": float("nan")}, "answer", "is a number (NaN); expected a finite number"),
        ({"question": "Q", "answer": "so\n#### "}, "answer", "'####' is followed by nothing; expected '#### N' with N a number"),
        ({"question": "Q", "answer": "so\n#### five"}, "answer", "'####' is followed by \"five\"; expected '#### N'"),
    ],
)
def test_one_bad_row_names_file_line_column_and_problem(tmp_path, bad, column, what):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], GOOD[1], bad)
    message = _error(path)
    assert message.startswith(f"{path}: line 3, column '{column}': {what}"), message
    assert "\n" not in message  # one bad row: one line


def test_non_utf8_bytes_on_line_2(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], b'{"question": "caf\xe9?", "answer": "1"}', GOOD[1])
    message = _error(path)
    assert message == (f"{path}: line 2: not valid UTF-8 (invalid continuation byte: byte 0xe9 at byte 18 "
                       "of the line); save the file as UTF-8"), message


def test_malformed_json_on_line_4(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], GOOD[1], {"question": "Q", "answer": "1"}, '{"question": "Q4", "answer": "1",}')
    assert _error(path) == f"{path}: line 4: not valid JSON (Expecting property name enclosed in double quotes at column 34)"


def test_json_that_is_not_an_object(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], GOOD[1], '["Q", "1"]')
    assert _error(path) == f'{path}: line 3: is a list (["Q", "1"]), not a JSON object'


def test_gsm8k_answer_without_final_line(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", {"question": "Q1", "answer": "1 + 1 = 2\n#### 2"},
                  {"question": "Q2", "answer": "She has 3 + 4 = 7 apples."}, {"question": "Q3", "answer": "#### 3"})
    message = _error(path, gsm8k=True)
    assert message.startswith(f"{path}: line 2, column 'answer': has no final line '#### N' (GSM8K format"), message
    assert message.endswith('it ends with "She has 3 + 4 = 7 apples."')
    # with source file the same answer is a bare value, taken as it is
    assert read_prompt_file(path, "question", "answer").rows[1]["ground_truth"] == "She has 3 + 4 = 7 apples."


def test_gsm8k_answer_must_be_on_its_own_line_and_numeric(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", GOOD[0] | {"answer": "#### 2"}, {"question": "Q2", "answer": "so #### 7"},
                  {"question": "Q3", "answer": "x\n#### 3,5"}, {"question": "Q4", "answer": 4})
    message = _error(path, gsm8k=True)
    assert message.splitlines() == [
        f"{path}: 3 bad lines:",
        "  line 2, column 'answer': '#### N' is not on a line of its own (GSM8K format: the solution, then a final line '#### N')",
        "  line 3, column 'answer': '####' is followed by \"3,5\"; expected '#### N' with N a number (like 42, -3, 1,000 or 2.5)",
        "  line 4, column 'answer': has no final line '#### N' (GSM8K format: the solution, then '#### <number>'); it ends with \"4\"",
    ]


# --------------------------------------------------------------------------------------- file-level errors


def test_missing_column_keeps_its_message(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", {"question": "1+1?", "solution": "2"}, {"question": "2+2?", "solution": "4"})
    assert _error(path) == f"{path}: column 'answer' not found (prompts.answer_column); columns: question, solution"


def test_empty_file_and_blank_lines_only(tmp_path):
    for content in (b"", b"\n  \n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        assert _error(path) == f"{path}: the prompts file has no rows"


def test_missing_file_and_unsupported_suffix(tmp_path):
    assert _error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: prompts file not found (prompts.path)"
    csv = tmp_path / "p.csv"
    csv.write_text("question,answer\n")
    assert _error(csv).startswith(f"{csv}: unsupported prompts file type '.csv'; expected .jsonl")


def test_one_row_is_not_enough(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], GOOD[0])
    assert _error(path) == f"{path}: needs at least 2 rows (one train, one eval), has 1 after dropping 1 duplicates"


# ------------------------------------------------------------------------------------------ many bad rows


def test_all_bad_rows_are_listed_in_one_error(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], {"question": "Q2"}, GOOD[1], "{oops", {"question": "", "answer": None},
                  b'{"question": "\xff"}')
    assert _error(path).splitlines() == [
        f"{path}: 4 bad lines (5 problems):",
        "  line 2, column 'answer': missing",
        "  line 4: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "  line 5, column 'question': is empty; expected a non-empty string",
        "  line 5, column 'answer': is null; expected a non-empty string or a number",
        "  line 6: not valid UTF-8 (invalid start byte: byte 0xff at byte 15 of the line); save the file as UTF-8",
    ]


def test_listing_stops_after_max_listed(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", *GOOD, *[{"question": f"Q{i}", "answer": None} for i in range(MAX_LISTED + 5)])
    lines = _error(path).splitlines()
    assert lines[0] == f"{path}: {MAX_LISTED + 5} bad lines:"
    assert lines[1].startswith("  line 3, column 'answer': is null")
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1] == "  ... and 5 more"


# ------------------------------------------------------------------------------------------------ Parquet


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_rows_are_1_based(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"q": ["A?", "B?", "C?", "D?"], "a": ["1", "2", None, "  "]})
    assert _error(path, question="q", answer="a").splitlines() == [
        f"{path}: 2 bad rows:",
        "  row 3, column 'a': is null; expected a non-empty string or a number",
        "  row 4, column 'a': is blank (whitespace only); expected a non-empty string or a number",
    ]
    good = _parquet(tmp_path / "g.parquet", {"q": ["A?", "B?"], "a": [1, 2]})
    prompts = read_prompt_file(good, "q", "a")
    assert prompts.unit == "row" and [(r["row"], r["ground_truth"]) for r in prompts.rows] == [(1, "1"), (2, "2")]


def test_parquet_wrong_types_missing_column_unreadable_and_empty(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"question": [1, 2], "answer": ["1", "2"]})
    assert _error(path).splitlines()[1:] == [
        "  row 1, column 'question': is a number (1); expected a non-empty string",
        "  row 2, column 'question': is a number (2); expected a non-empty string",
    ]
    path = _parquet(tmp_path / "m.parquet", {"question": ["A?"], "solution": ["1"]})
    assert _error(path) == f"{path}: column 'answer' not found (prompts.answer_column); columns: question, solution"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    assert _error(broken).startswith(f"{broken}: not a readable Parquet file (")
    empty = _parquet(tmp_path / "e.parquet", {"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    assert _error(empty) == f"{empty}: the prompts file has no rows"


# ----------------------------------------------------------------------------------------------- duplicates


def test_duplicates_with_the_same_answer_are_dropped(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], GOOD[1], {"question": "  What is 1 +  1?\n", "answer": "2"},
                  {"question": "What is 2 + 2?", "answer": 4})
    prompts = read_prompt_file(path, "question", "answer")
    assert [r["row"] for r in prompts.rows] == [1, 2]
    assert prompts.duplicates == [(3, 1), (4, 2)]
    assert prompts.duplicates_note() == (f"{path}: dropped 2 duplicate questions (lines 3, 4: same question and answer "
                                         "as an earlier line, which is kept)")


def test_duplicates_with_different_answers_are_rejected_naming_both_lines(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", GOOD[0], GOOD[1], {"question": "Q3", "answer": "3"},
                  {"question": "What is 1 + 1? ", "answer": "3"})
    assert _error(path) == (f"{path}: line 4, column 'question': repeats the question of line 1 with a different "
                            "answer ('3' here, '2' on line 1)")


def test_duplicates_never_straddle_train_and_eval(tmp_path):
    # 10 questions, each 3 times; whatever the seed, a question is in at most one split, once
    lines = [{"question": f"Question {i % 10}?" + " " * (i // 10), "answer": str(i % 10)} for i in range(30)]
    path = _jsonl(tmp_path / "p.jsonl", *lines)
    for seed in range(5):
        rows = file_rows(path, "question", "answer", seed=seed, num_train=100, num_eval=4, data_source="p")
        questions = [" ".join(r["question"].split()) for r in rows]
        assert len(rows) == 10 and len(set(questions)) == 10
        assert sum(r["split"] == "eval" for r in rows) == 4
        assert {json.loads(r["metadata"])["row"] for r in rows} == set(range(1, 11))  # first occurrences


# ------------------------------------------------------------------------------------------ prompt length


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _tokens(tokenizer, question: str) -> int:
    return len(tokenizer(render_prompt(tokenizer, question), add_special_tokens=False)["input_ids"])


def test_too_long_prompts_are_skipped_at_the_exact_limit(tokenizer):
    rows = [{"row": 1, "question": "What is 1 + 1?", "ground_truth": "2"},
            {"row": 3, "question": "What is 2 + 2? " + "Think hard. " * 30, "ground_truth": "4"}]
    short, long = (_tokens(tokenizer, r["question"]) for r in rows)
    assert long > short
    # a prompt of exactly context - max_new_tokens tokens fits; one token more does not
    kept, skipped = skip_too_long(rows, tokenizer, "", context=long + 10, max_new_tokens=10, source_file="p.jsonl")
    assert [r["row"] for r in kept] == [1, 3] and skipped == []
    kept, skipped = skip_too_long(rows, tokenizer, "", context=long + 9, max_new_tokens=10, source_file="p.jsonl")
    assert [r["row"] for r in kept] == [1]
    assert kept[0]["prompt"] == render_prompt(tokenizer, rows[0]["question"])
    assert skipped == [{"row": 3, "source_file": "p.jsonl", "question": rows[1]["question"], "prompt_tokens": long,
                        "max_prompt_tokens": long - 1, "context": long + 9, "max_new_tokens": 10}]


def test_every_prompt_too_long_is_an_error(tokenizer):
    rows = [{"row": 1, "question": "What is 1 + 1?", "ground_truth": "2"}]
    n = _tokens(tokenizer, rows[0]["question"])
    with pytest.raises(InputError) as info:
        skip_too_long(rows * 2, tokenizer, "", context=n + 47, max_new_tokens=48, source="p.jsonl")
    assert str(info.value) == (f"p.jsonl: all 2 prompts are too long for the model ({n} to {n} tokens); "
                               f"at most {n - 1} fit (context {n + 47} - max_new_tokens 48)")


def test_model_context_from_the_config_capped_by_vllm(tiny_model_dir):
    assert model_context(tiny_model_dir, "hf", 512) == 1024  # tests/conftest.py: max_position_embeddings=1024
    assert model_context(tiny_model_dir, "vllm", 512) == 512
    assert model_context(tiny_model_dir, "vllm", 4096) == 1024
    assert context_limit(8192, "auto", 1024) == 1024
    with pytest.raises(InputError, match="no max_position_embeddings"):
        context_limit(None, "hf", 1024)


class _Prompts:
    source, path, question_column, answer_column, system_prompt = "file", "", "question", "answer", ""
    tests_column = None
    num_train, num_eval = 4, 2


def test_long_prompts_are_dropped_before_the_split(tmp_path, tokenizer):
    # 9 rows, 3 of them too long: the 6 others still give num_eval=2 and num_train=4
    lines = [{"question": f"What is {i} + 1?" + (" Think very hard." * 300 if i % 3 == 0 else ""), "answer": str(i + 1)}
             for i in range(9)]
    prompts = _Prompts()
    prompts.path = str(_jsonl(tmp_path / "p.jsonl", *lines))
    prepared = build_prompt_rows(prompts, 0, tokenizer, context=1024, max_new_tokens=48)
    assert sorted(r["row"] for r in prepared.skipped) == [1, 4, 7]
    assert all(r["prompt_tokens"] > 1024 - 48 for r in prepared.skipped)
    assert sum(r["split"] == "eval" for r in prepared.rows) == 2 and sum(r["split"] == "train" for r in prepared.rows) == 4
    assert not any("Think" in r["question"] for r in prepared.rows)


def test_split_needs_two_usable_rows():
    with pytest.raises(InputError, match="p.jsonl: needs at least 2 usable rows"):
        split_rows([{"row": 1, "question": "Q", "ground_truth": "1"}], 0, 5, 1, "p", "p.jsonl", "p.jsonl")


# ------------------------------------------------------------------------------------------------ stages


def _params(tmp_path, **prompts) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["prompts"].update(prompts)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_check_inputs_stops_on_a_bad_row(tmp_path, capsys):
    from pipeline import check_inputs
    from pipeline.stage import run

    bad = _jsonl(tmp_path / "p.jsonl", *GOOD, {"question": "Q", "answer": None})
    with pytest.raises(SystemExit) as exit_info:
        run(check_inputs.main, ["--params", str(_params(tmp_path, source="file", path=str(bad))),
                                "--out", str(tmp_path / "inputs.ok")])
    assert exit_info.value.code == 2
    assert f"error: {bad}: line 3, column 'answer': is null" in capsys.readouterr().err
    assert not (tmp_path / "inputs.ok").exists()


def test_prepare_prompts_writes_the_skipped_rows(tmp_path, tiny_model_dir):
    from pipeline import prepare_prompts

    lines = [{"question": f"What is {i} + 1?" + (" Think very hard." * 300 if i == 2 else ""), "answer": str(i + 1)}
             for i in range(6)] + [{"question": "What is 0 + 1?", "answer": "1"}]
    source = _jsonl(tmp_path / "p.jsonl", *lines)
    params = _params(tmp_path, source="file", path=str(source), num_train=3, num_eval=2)
    out, skipped = tmp_path / "prompts.parquet", tmp_path / "prompts.skipped.jsonl"
    prepare_prompts.main(["--params", str(params), "--model", str(tiny_model_dir), "--out", str(out),
                          "--skipped", str(skipped)])
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 5 and {r["split"] for r in rows} == {"train", "eval"}
    assert len({r["prompt_id"] for r in rows}) == 5
    records = [json.loads(line) for line in skipped.read_text().splitlines()]
    assert [(r["row"], r["source_file"]) for r in records] == [(3, "p.jsonl")]
    # nothing skipped: the file is still written, empty
    prepare_prompts.main(["--params", str(_params(tmp_path)), "--model", str(tiny_model_dir), "--out", str(out),
                          "--skipped", str(skipped)])
    assert skipped.exists() and skipped.read_text() == ""
