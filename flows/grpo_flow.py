"""Prefect flows that run GRPO iterations by running the DVC stages of dvc.yaml, one task per stage.

DVC stays the single source of truth for what is fresh: each task runs `dvc repro --single-item <stage>`,
which runs the stage only when its deps, params or outs changed (or restores it from the run-cache), so a
stage run here and one run by `dvc repro` in a shell share one cache. The flows never re-implement a
stage; they read the stages' output files only to publish artifacts.

    python -m flows.grpo_flow --iterations 4 --group-size 8 --learning-rate 1e-5   # local run, no server needed
    python -m flows.grpo_flow --extend 2                                            # add 2 iterations and run them
    python -m flows.serve                                                           # deployments for the Prefect UI

Per flow run:
  1. parameter overrides are written into params.yaml (validated first, comments kept, written atomically);
  2. check-inputs, prepare-model, prepare-prompts, evaluate-base, then generate@k, score@k, advantages@k,
     update@k, evaluate@k for every iteration k in params.yaml train.iterations, then report, each a task
     whose output is streamed line by line into the Prefect run log. A stage that crashed (a traceback,
     a signal, any exit status but 2) is retried (every DVC stage is idempotent: DVC clears its outputs and
     every output is written atomically); a stage stopped by a user error (it printed `error: ...` and
     exited with status 2, grpo.errors.USER_ERROR_EXIT: a bad parameter or input file, a NaN loss) is not,
     as the same inputs give the same error: the flow run fails at once with that line;
  3. artifacts: for each iteration this run (re)computed, a table of its metrics and a markdown sample of
     completions (best and worst of a few groups, with rewards and advantages); a progress artifact across
     the run's iterations; after report, the history table of every iteration.

One workspace runs one flow run at a time (a file lock under .dvc/tmp/; a second flow run waits for it),
and every dvc command holds a second lock, so two dvc commands from flows never run at once in one
workspace (DVC itself refuses to run while another dvc command holds its repo lock).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE

from grpo.config import ConfigError, params_from_dict
from grpo.errors import USER_ERROR_EXIT

BASE_STAGES = ["check-inputs", "prepare-model", "prepare-prompts", "evaluate-base"]
ITERATION_STAGES = ["generate", "score", "advantages", "update", "evaluate"]
FINAL_STAGES = ["report"]

# flow parameter -> params.yaml key
NAMED_OVERRIDES = {"group_size": "rollout.group_size", "learning_rate": "optim.learning_rate", "beta": "loss.beta"}

RUN_LOCK = ".dvc/tmp/prefect-run.lock"  # one flow run per workspace at a time
DVC_LOCK = ".dvc/tmp/prefect-dvc.lock"  # one dvc command per workspace at a time
LOCK_LOG_EVERY = 30.0  # seconds between "still waiting for the lock" lines
PROGRESS_LOG_EVERY = 10.0  # seconds between two log lines of one progress bar

# the metrics shown in the history table (data/report/history.csv has every metric)
HISTORY_COLUMNS = ["iteration", "reward", "reward_std", "frac_reward_zero_std", "rewards/correctness/mean",
                   "eval/accuracy", "kl", "loss", "grad_norm", "entropy", "clip_ratio/region_mean",
                   "completions/mean_length"]
SAMPLE_GROUPS = 3  # groups shown in the completions sample of an iteration
SAMPLE_CHARS = 300  # completion text shown per cell


class StageError(RuntimeError):
    """A DVC stage failed; str(e) names the stage and carries the stage's own error line."""


class StageUserError(StageError):
    """The stage stopped on a user error (grpo.errors.UserError): it printed one line `error: ...` and exited
    with status USER_ERROR_EXIT. The same inputs give the same error, so it is not retried."""


class StageCrash(StageError):
    """The stage crashed (a traceback, an exit status other than USER_ERROR_EXIT, a signal), or dvc failed
    around it: possibly transient (memory, a killed process), so it is retried."""


# ------------------------------------------------------------------------------------------ params.yaml


def iteration_keys(params_path: Path) -> list[str]:
    """The iterations of params.yaml train.iterations ("k": k-1), in order. Read without validating the rest:
    a bad parameter is check-inputs' to report, in its task's log."""
    try:
        data = yaml.safe_load(Path(params_path).read_text()) or {}
        iterations = (data.get("train") or {}).get("iterations") or {}
        return sorted((str(k) for k in iterations if str(k).isdigit()), key=int)
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def stage_names(keys: list[str]) -> list[str]:
    """Every stage of dvc.yaml in the order a flow run runs them."""
    return BASE_STAGES + [f"{s}@{k}" for k in keys for s in ITERATION_STAGES] + FINAL_STAGES


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: keeps comments, key order and flow style
    y.preserve_quotes = True
    y.width = 4096

    def null(representer, _):
        return representer.represent_scalar("tag:yaml.org,2002:null", "null")

    def real(representer, value: float):
        # YAML 1.1 readers (PyYAML) read 1e-05 as a string: write 1.0e-05, as params.yaml does
        if math.isnan(value) or math.isinf(value):
            text = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        else:
            text = repr(value)
            mantissa, e, exponent = text.partition("e")
            if e and "." not in mantissa:
                text = f"{mantissa}.0e{exponent}"
        return representer.represent_scalar("tag:yaml.org,2002:float", text)

    y.representer.add_representer(type(None), null)
    y.representer.add_representer(float, real)
    return y


def _iterations_node(n: int):
    """{"1": 0, "2": 1, ..., "n": n-1} as one flow-style line with quoted keys (DVC skips non-string keys)."""
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    node = CommentedMap((DoubleQuotedScalarString(str(k)), k - 1) for k in range(1, n + 1))
    node.fa.set_flow_style()
    return node


def apply_overrides(params_path: str | Path, changes: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set dotted keys (e.g. {"rollout.group_size": 8}) in params.yaml; return {key: (old, new)} of what changed.

    The edited file is validated (grpo.config) before it replaces params.yaml, atomically; comments and
    layout are kept. A bad value raises ConfigError naming the key, and leaves params.yaml as it was."""
    path = Path(params_path)
    y = _yaml()
    original = path.read_text()
    doc = y.load(original)
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = doc
        for i, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{path}: unknown key {'.'.join(parents[: i + 1])} (in override {key} = {value!r})")
            node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {'.'.join(parents)} is not a mapping (in override {key} = {value!r})")
        old = node.get(leaf)  # a new key is set, and then rejected by validation with a did-you-mean hint
        if key == "train.iterations" and isinstance(value, dict):
            if _plain(old) == {str(k): v for k, v in value.items()}:
                continue
            value = _iterations_node(len(value)) if value == {str(k): k - 1 for k in range(1, len(value) + 1)} else value
        elif leaf in node and _plain(old) == value and type(_plain(old)) is type(value):
            continue
        node[leaf] = value
        changed[key] = (_plain(old), _plain(value))
    if not changed:
        return {}
    buffer = io.StringIO()
    y.dump(doc, buffer)
    text = buffer.getvalue()
    params_from_dict(yaml.safe_load(text) or {}, source=str(path))  # raises ConfigError on a bad value
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return changed


def _plain(value: Any) -> Any:
    """ruamel's round-trip types -> plain Python (for comparisons and logs)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------------ locks


@contextmanager
def workspace_lock(workspace: Path, relative: str, what: str, logger) -> Iterator[None]:
    """Hold a cross-process file lock under the workspace; log while waiting for another holder."""
    path = Path(workspace) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        start = time.monotonic()
        logger.info("waiting for %s (%s is held by another process)", what, path)
        while True:
            try:
                lock.acquire(timeout=LOCK_LOG_EVERY)
                break
            except Timeout:
                logger.info("still waiting for %s (%.0fs so far)", what, time.monotonic() - start)
        logger.info("got %s after %.1fs", what, time.monotonic() - start)
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------- stage tasks


def _dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # stage output arrives line by line, as it is printed
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _classify(lines: list[str]) -> str:
    text = "\n".join(lines)
    if "Running stage" in text:
        return "ran"
    if "is cached - skipping run" in text:
        return "restored"  # from DVC's run-cache: same deps and params ran before
    if "didn't change, skipping" in text:
        return "skipped"
    return "unknown"


def _error_line(lines: list[str]) -> str:
    """The stage's own error line (stages print 'error: ...'), else DVC's, else the last line."""
    for prefix in ("error:", "ERROR:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1]
    found = [line for line in lines if line.strip()]
    return found[-1] if found else "(no output)"


# `dvc repro` exits with 255 whatever made it fail; a stage command's own exit status is only in dvc's last
# line (dvc.stage.exceptions.StageCmdFailedError), a signal as its negative number:
#   ERROR: failed to reproduce 'check-inputs': failed to run: python -m pipeline.check_inputs ..., exited with 2
#   ERROR: failed to reproduce 'update@1': failed to run: python -m pipeline.update ..., exited with -9
DVC_FAILED = "ERROR: failed to reproduce "
DVC_CMD_STATUS = re.compile(r": failed to run: .*, exited with (-?\d+)$", re.DOTALL | re.MULTILINE)


def _dvc_error_start(lines: list[str]) -> int | None:
    starts = [i for i, line in enumerate(lines) if line.startswith(DVC_FAILED)]
    return starts[-1] if starts else None


def stage_exit_status(lines: list[str]) -> int | None:
    """The exit status of the stage's command, read from dvc's error line; None when dvc failed without
    running it to the end (a missing dependency, a bad dvc.yaml, dvc itself interrupted)."""
    start = _dvc_error_start(lines)
    if start is None:
        return None
    match = DVC_CMD_STATUS.search("\n".join(lines[start:]))  # a multi-line cmd spans several lines
    return int(match.group(1)) if match else None


def stage_failure(stage: str, code: int, lines: list[str]) -> StageError:
    """The exception for a failed `dvc repro --single-item <stage>` (exit status `code`, output `lines`):
    StageUserError when the stage's command exited with USER_ERROR_EXIT, else StageCrash."""
    status = stage_exit_status(lines)
    if status == USER_ERROR_EXIT:
        return StageUserError(f"stage {stage} failed: {_error_line(lines)} (a user error: not retried)")
    if status is None:
        return StageCrash(f"stage {stage} failed: {_error_line(lines)} (dvc repro exited with status {code})")
    if status < 0:
        try:
            return StageCrash(f"stage {stage} crashed: killed by {signal.Signals(-status).name}")
        except ValueError:
            return StageCrash(f"stage {stage} crashed: killed by signal {-status}")
    before = lines[: _dvc_error_start(lines)]
    last = _error_line(lines)
    if any(line.startswith("Traceback (most recent call last)") for line in before):
        last = next(line for line in reversed(before) if line.strip() and not line[0].isspace())  # the exception
    return StageCrash(f"stage {stage} crashed: {last} (exit status {status})")


def retry_crashes(task, task_run, state) -> bool:
    """run_stage's retry_condition_fn: retry a crash, never a user error (it would recur)."""
    return not isinstance(state.data, StageUserError)


def stream_command(cmd: list[str], cwd: Path, logger) -> tuple[int, list[str]]:
    """Run cmd, logging each line of its stdout+stderr as it arrives; kill its process group if interrupted.

    A progress bar redrawn in place (text ending in a carriage return) is logged at most every
    PROGRESS_LOG_EVERY seconds, and once finished; every other line is logged as it comes."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    last_progress = 0.0
    try:
        assert proc.stdout is not None
        # newline="": split on \n, \r and \r\n but keep the ending, to tell a redraw (\r) from a line
        for raw in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
            line = raw.rstrip()
            if not line:
                continue
            if raw.endswith("\r") and not raw.endswith("\r\n"):
                if time.monotonic() - last_progress < PROGRESS_LOG_EVERY:
                    continue
                last_progress = time.monotonic()
            lines.append(line)
            if line.startswith(("error:", "ERROR:")):
                logger.error("%s", line)
            elif line.startswith(("WARNING:", "warning:")):
                logger.warning("%s", line)
            else:
                logger.info("%s", line)
        return proc.wait(), lines
    finally:
        if proc.poll() is None:  # the task was cancelled or crashed: stop dvc and the stage with it
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


@task(name="dvc-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_crashes,
      cache_policy=NO_CACHE)
def run_stage(stage: str, workspace: str) -> dict:
    """`dvc repro --single-item <stage>` in the workspace: DVC runs the stage if it is stale, else skips it.

    Raises StageUserError (not retried) when the stage stopped on a user error, StageCrash (retried) else."""
    logger = get_run_logger()
    start = time.perf_counter()
    with workspace_lock(Path(workspace), DVC_LOCK, "the workspace's DVC lock", logger):
        code, lines = stream_command([sys.executable, "-m", "dvc", "repro", "--single-item", stage], Path(workspace), logger)
    if code != 0:
        error = stage_failure(stage, code, lines)
        if isinstance(error, StageUserError):
            logger.error("stage %s stopped on a user error: not retried (the same inputs give the same error); "
                         "fix it and start the flow again", stage)
        raise error
    return {"stage": stage, "status": _classify(lines), "seconds": round(time.perf_counter() - start, 2)}


# -------------------------------------------------------------------------------------------- artifacts


def _number(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def iteration_metrics_rows(workspace: Path, k: str) -> list[dict]:
    """One row per metric of iteration k: its stage, name and value (data/metrics/<k>/<stage>.json)."""
    rows = []
    for path in sorted((Path(workspace) / "data/metrics" / k).glob("*.json")):
        for name, value in sorted(json.loads(path.read_text()).items()):
            if name != "iteration":
                rows.append({"stage": path.stem, "metric": name, "value": _number(value)})
    return rows


def _cell(text: Any, limit: int = SAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())  # one line per table cell
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("<", "&lt;") or "(empty)"


def completions_markdown(workspace: Path, k: str, groups: int = SAMPLE_GROUPS) -> str:
    """The best and worst completion of a few prompt groups of iteration k, with rewards and advantages."""
    import pandas as pd

    ws = Path(workspace)
    df = pd.read_parquet(ws / "data/advantages" / f"{k}.parquet",
                         columns=["prompt_id", "group_id", "completion", "reward", "advantage", "ground_truth",
                                  "group_reward_mean", "group_reward_std", "finish_reason", "completion_tokens"])
    questions: dict[str, str] = {}
    prompts_path = ws / "data/prompts.parquet"
    if prompts_path.exists():
        prompts = pd.read_parquet(prompts_path, columns=["prompt_id", "question"])
        questions = dict(zip(prompts["prompt_id"], prompts["question"]))
    # most informative groups first: the largest reward spread, then a stable order
    order = (df.groupby("group_id", sort=True)["reward"].std(ddof=0).fillna(0.0)
             .sort_values(ascending=False, kind="stable").index[:groups])
    lines = [f"## Iteration {k}: sample completions",
             "",
             f"{len(df)} completions in {df['group_id'].nunique()} groups; mean reward {df['reward'].mean():.3f}. "
             f"The {len(order)} groups with the largest reward spread, best and worst completion of each "
             f"(advantage = (reward - group mean) / (group std + eps)).", ""]
    for i, group_id in enumerate(order, 1):
        g = df[df["group_id"] == group_id].sort_values(["reward", "advantage"], ascending=False, kind="stable")
        first = g.iloc[0]
        question = questions.get(first["prompt_id"], first["prompt_id"])
        lines += [f"### Group {i}: {_cell(question, 200)}",
                  "",
                  f"answer **{_cell(first['ground_truth'], 50)}**, {len(g)} completions, group reward mean "
                  f"{first['group_reward_mean']:.3f}, std {first['group_reward_std']:.3f}",
                  "",
                  "| | reward | advantage | tokens | finish | completion |",
                  "|---|---:|---:|---:|---|---|"]
        for label, row in (("best", g.iloc[0]), ("worst", g.iloc[-1])):
            lines.append(f"| {label} | {row['reward']:.3f} | {row['advantage']:+.3f} | {int(row['completion_tokens'])} "
                         f"| {row['finish_reason']} | {_cell(row['completion'])} |")
        lines.append("")
    return "\n".join(lines)


def history_rows(workspace: Path) -> list[dict]:
    """The headline metrics of every iteration so far (data/report/history.csv, written by the report stage)."""
    import pandas as pd

    path = Path(workspace) / "data/report/history.csv"
    if not path.exists():
        return []
    history = pd.read_csv(path)
    columns = [c for c in HISTORY_COLUMNS if c in history]
    return [{c: _number(v.item() if hasattr(v, "item") else v) for c, v in row.items()}
            for row in history[columns].to_dict(orient="records")]


def publish_iteration(workspace: Path, k: str) -> None:
    rows = iteration_metrics_rows(workspace, k)
    if rows:
        create_table_artifact(rows, key=f"grpo-iteration-{k}-metrics",
                              description=f"Iteration {k}: every metric of data/metrics/{k}/*.json")
    if (Path(workspace) / "data/advantages" / f"{k}.parquet").exists():
        create_markdown_artifact(completions_markdown(workspace, k), key=f"grpo-iteration-{k}-completions",
                                 description=f"Iteration {k}: best and worst completions of some groups")


# ------------------------------------------------------------------------------------------------ flows


def _workspace(workspace: str | None) -> Path:
    ws = Path(workspace).expanduser().resolve() if workspace else Path.cwd()
    if not (ws / "dvc.yaml").exists() or not (ws / "params.yaml").exists():
        raise FileNotFoundError(f"{ws}: not a GRPO workspace (needs dvc.yaml and params.yaml)")
    return ws


def run_iterations(ws: Path, changes: dict[str, Any] | Callable[[Path], dict[str, Any]], stage_retries: int,
                   retry_delay_seconds: float) -> dict:
    """The body of both flows: apply the parameter changes (a dict, or a function of params.yaml's path that
    returns one, computed under the workspace lock), run every stage, publish artifacts."""
    logger = get_run_logger()
    with workspace_lock(ws, RUN_LOCK, "the workspace (one flow run at a time)", logger):
        params_path = ws / "params.yaml"
        if callable(changes):  # grpo-extend: from train.iterations as they are once this run holds the lock
            changes = changes(params_path)
        before = iteration_keys(params_path)
        changed = apply_overrides(params_path, changes) if changes else {}
        for key, (old, new) in changed.items():
            logger.info("params.yaml: %s: %s -> %s", key, json.dumps(old), json.dumps(new))
        if changes and not changed:
            logger.info("params.yaml already has the requested values")
        keys = iteration_keys(params_path)
        if len(keys) < len(before):
            logger.warning("iterations reduced from %d to %d: outputs of iterations %d..%d stay in data/ "
                           "(the report reads every data/metrics/<k>/)", len(before), len(keys), len(keys) + 1, len(before))
        logger.info("workspace %s: %d iterations, %d stages", ws, len(keys), len(stage_names(keys)))

        progress = create_progress_artifact(0.0, key="grpo-progress", description=f"0 of {len(keys)} iterations done")
        stage = run_stage.with_options(retries=stage_retries, retry_delay_seconds=retry_delay_seconds)
        results = [stage(name, str(ws)) for name in BASE_STAGES]
        for i, k in enumerate(keys, 1):
            ran = [stage(f"{name}@{k}", str(ws)) for name in ITERATION_STAGES]
            results += ran
            if any(r["status"] != "skipped" for r in ran):
                publish_iteration(ws, k)
            update_progress_artifact(progress, 100.0 * i / len(keys),
                                     description=f"{i} of {len(keys)} iterations done (iteration {k})")
        results += [stage(name, str(ws)) for name in FINAL_STAGES]
        rows = history_rows(ws)
        if rows:
            create_table_artifact(rows, key="grpo-history",
                                  description="Every iteration so far (data/report/history.csv; iteration 0 is the base model)")
    summary = {
        "workspace": str(ws),
        "iterations": len(keys),
        "params_changed": {k: list(v) for k, v in changed.items()},
        "ran": [r["stage"] for r in results if r["status"] in ("ran", "restored")],
        "skipped": [r["stage"] for r in results if r["status"] == "skipped"],
    }
    logger.info("%d stages ran, %d were fresh (DVC skipped them)", len(summary["ran"]), len(summary["skipped"]))
    return summary


@flow(name="grpo-train")
def grpo_train(
    iterations: int | None = None,
    group_size: int | None = None,
    learning_rate: float | None = None,
    beta: float | None = None,
    overrides: dict[str, Any] | None = None,
    workspace: str | None = None,
    stage_retries: int = 2,
    retry_delay_seconds: float = 10.0,
) -> dict:
    """Start or continue a GRPO run: write the overrides into params.yaml, then run every DVC stage
    (DVC skips the fresh ones).

    Args:
        iterations: number of GRPO iterations (params.yaml train.iterations becomes 1..N); empty keeps it
        group_size: completions per prompt (rollout.group_size); empty keeps params.yaml's
        learning_rate: optimizer learning rate (optim.learning_rate); empty keeps params.yaml's
        beta: KL penalty coefficient (loss.beta); empty keeps params.yaml's
        overrides: any other params.yaml keys, dotted, e.g. {"rollout.max_new_tokens": 32}
        workspace: the project directory with dvc.yaml and params.yaml (default: the current directory)
        stage_retries: retries of a crashed stage (a stage stopped by a user error is not retried)
        retry_delay_seconds: seconds between a crashed stage and its retry
    """
    ws = _workspace(workspace)
    changes = dict(overrides or {})
    for name, value in (("group_size", group_size), ("learning_rate", learning_rate), ("beta", beta)):
        if value is not None:
            changes[NAMED_OVERRIDES[name]] = value
    if iterations is not None:
        if iterations < 1:
            raise ValueError(f"iterations = {iterations} is not allowed; expected an integer >= 1")
        changes["train.iterations"] = {str(k): k - 1 for k in range(1, iterations + 1)}
    return run_iterations(ws, changes, stage_retries, retry_delay_seconds)


@flow(name="grpo-extend")
def grpo_extend(
    add_iterations: int = 1,
    workspace: str | None = None,
    stage_retries: int = 2,
    retry_delay_seconds: float = 10.0,
) -> dict:
    """Extend the run by k iterations (params.yaml train.iterations gets "N+1": N, ...), then run every stage.

    Args:
        add_iterations: iterations to add to params.yaml train.iterations
        workspace: the project directory with dvc.yaml and params.yaml (default: the current directory)
        stage_retries: retries of a crashed stage (a stage stopped by a user error is not retried)
        retry_delay_seconds: seconds between a crashed stage and its retry
    """
    if add_iterations < 1:
        raise ValueError(f"add_iterations = {add_iterations} is not allowed; expected an integer >= 1")
    ws = _workspace(workspace)

    def extended(params_path: Path) -> dict:
        n = len(iteration_keys(params_path)) + add_iterations
        return {"train.iterations": {str(k): k - 1 for k in range(1, n + 1)}}

    return run_iterations(ws, extended, stage_retries, retry_delay_seconds)


# -------------------------------------------------------------------------------------------------- CLI


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. rollout.max_new_tokens=32")
    return key.strip(), yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, help="number of iterations (train.iterations = 1..N)")
    parser.add_argument("--extend", type=int, metavar="K", help="add K iterations to train.iterations (grpo-extend)")
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="any params.yaml key, e.g. --set rollout.max_new_tokens=32 (repeatable)")
    parser.add_argument("--workspace", default=None, help="project directory (default: the current directory)")
    parser.add_argument("--retries", type=int, default=2,
                        help="retries of a crashed stage (a user error, exit status 2, is not retried)")
    parser.add_argument("--retry-delay", type=float, default=10.0, help="seconds before a retry")
    args = parser.parse_args(argv)
    common = dict(workspace=args.workspace, stage_retries=args.retries, retry_delay_seconds=args.retry_delay)
    if args.extend is not None:
        if any(v is not None for v in (args.iterations, args.group_size, args.learning_rate, args.beta)) or args.set:
            parser.error("--extend takes no overrides: run a grpo-train flow for those")
        state = grpo_extend(add_iterations=args.extend, return_state=True, **common)
    else:
        state = grpo_train(iterations=args.iterations, group_size=args.group_size, learning_rate=args.learning_rate,
                           beta=args.beta, overrides=dict(args.set) or None, return_state=True, **common)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
