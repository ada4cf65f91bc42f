import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo.contracts import ADVANTAGES, PROMPTS, ROLLOUTS, SCORED, ContractError, read_table, write_table

ROOT = Path(__file__).resolve().parents[1]


def rollout_rows(n=2):
    return [
        {
            "iteration": 1, "prompt_id": "p0", "group_id": "1-p0", "sample_index": i, "prompt": "What is 2+2?",
            "completion": "#### 4", "prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5],
            "completion_logprobs": [-0.1, -0.2], "finish_reason": "stop", "completion_tokens": 2,
            "ground_truth": "4", "data_source": "synthetic", "checkpoint_id": "base", "backend": "hf",
            "temperature": 1.0, "top_p": 1.0, "seed": 7, "metadata": '{"task_id": "t0"}',
        }
        for i in range(n)
    ]


def test_rollouts_round_trip_with_contract_types(tmp_path):
    path = write_table(pa.Table.from_pylist(rollout_rows()), tmp_path / "rollouts.parquet", ROLLOUTS)
    table = read_table(path, ROLLOUTS)
    assert table.schema.field("completion_logprobs").type == pa.list_(pa.float32())
    assert table.schema.field("sample_index").type == pa.int64()
    assert table.column_names[: len(ROLLOUTS.column_names())] == ROLLOUTS.column_names()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rollout_rows()).drop(["completion_logprobs"]), path)
    with pytest.raises(ContractError, match=r"bad\.parquet \(rollouts contract\): missing column 'completion_logprobs'"):
        read_table(path, ROLLOUTS)


def test_wrong_type_nulls_and_row_rules(tmp_path):
    rows = rollout_rows()
    for r in rows:
        r["completion_tokens"] = "two"
    with pytest.raises(ContractError, match="column 'completion_tokens' has type string, expected int64"):
        write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", ROLLOUTS)
    rows = rollout_rows()
    rows[1]["ground_truth"] = None
    with pytest.raises(ContractError, match="column 'ground_truth' has 1 null value"):
        write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", ROLLOUTS)
    rows = rollout_rows()
    rows[0]["finish_reason"] = "abort"
    with pytest.raises(ContractError, match="finish_reason.*abort"):
        write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", ROLLOUTS)
    rows = rollout_rows()
    rows[0]["completion_logprobs"] = [-0.1]
    with pytest.raises(ContractError, match="'completion_logprobs' has a different length"):
        write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", ROLLOUTS)
    assert not (tmp_path / "x.parquet").exists()


def test_scored_and_advantages_reward_columns(tmp_path):
    rows = rollout_rows()
    for r in rows:
        r.update(reward_correctness=1, reward=1.0, reward_error=None)
    path = write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet", SCORED)
    assert read_table(path, SCORED).schema.field("reward_correctness").type == pa.float64()
    for r in rows:
        r["reward_format"] = "yes"
    with pytest.raises(ContractError, match="column 'reward_format' has type string, expected double"):
        write_table(pa.Table.from_pylist(rows), tmp_path / "s2.parquet", SCORED)
    with pytest.raises(ContractError, match="advantages contract.*missing column 'group_reward_mean'"):
        read_table(tmp_path / "s.parquet", ADVANTAGES)


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=PROMPTS.schema), empty)
    with pytest.raises(ContractError, match="empty.parquet .*no rows"):
        read_table(empty, PROMPTS)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ContractError, match="junk.parquet: not a readable Parquet file"):
        read_table(junk, PROMPTS)
    with pytest.raises(ContractError, match="gone.parquet: file not found"):
        read_table(tmp_path / "gone.parquet", PROMPTS)


def test_killed_writer_leaves_old_file_and_no_complete_looking_file(tmp_path):
    target = tmp_path / "rollouts.parquet"
    write_table(pa.Table.from_pylist(rollout_rows(2)), target, ROLLOUTS)
    before = target.read_bytes()
    ready = tmp_path / "ready"
    script = f"""
import time, pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
from grpo.contracts import atomic_write
def slow_write(tmp):
    with pq.ParquetWriter(tmp, pa.schema([('x', pa.int64())])) as w:
        w.write_table(pa.table({{'x': [1, 2, 3]}}))
        Path({str(ready)!r}).touch()
        time.sleep(60)
atomic_write({str(target)!r}, slow_write)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 60
    while not ready.exists():
        assert time.time() < deadline and proc.poll() is None, "writer did not start"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == before  # the previous complete file is untouched
    assert read_table(target, ROLLOUTS).num_rows == 2
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in {"rollouts.parquet", "ready"}]
    assert all(name.startswith(".rollouts.parquet.") and name.endswith(".tmp") for name in leftovers)
