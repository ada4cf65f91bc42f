"""Prefect flows that run GRPO iterations by running the DVC stages of dvc.yaml, one task per stage.

DVC stays the single source of truth for what is fresh: each task runs `dvc repro --single-item <stage>`,
which runs the stage only when its deps, params or outs changed (or restores it from the run-cache), so a
stage run here and one run by `dvc repro` in a shell share one cache. The flows never re-implement a
stage; they read the stages' output files only to publish artifacts.

    python -m flows.grpo_flow --iterations 4 --group-size 8 --learning-rate 1e-5   # local run, no server needed
    python -m flows.grpo_flow --extend 2                                            # add 2 iterations and run them
    python -m flows.serve                                                           # deployments for the Prefect UI

Per flow run:
  1. parameter overrides are written into params.yaml by pipeline.params_file (validated first, comments
     kept, written atomically); grpo-extend adds iterations with pipeline.params_file.extend_iterations, the
     code of `python -m pipeline.extend`;
  2. the stages of the workspace's dvc.yaml, read from the file (stage_plan): check-inputs, prepare-model,
     prepare-prompts, evaluate-base, then generate@k, score@k, advantages@k, update@k, evaluate@k for every
     iteration k in params.yaml train.iterations, then report, each a task
     whose output is streamed line by line into the Prefect run log. A stage that crashed (a traceback,
     a signal, any exit status but 2) is retried (every DVC stage is idempotent: DVC clears its outputs and
     every output is written atomically); a stage stopped by a user error (it printed `error: ...` and
     exited with status 2, grpo.errors.USER_ERROR_EXIT: a bad parameter or input file, a NaN loss) is not,
     as the same inputs give the same error: the flow run fails at once with that line;
     with `human` in params.yaml's reward.weights, iteration k's completions are rated after generate@k and
     before the stages that read data/ratings (reward-model@k, score@k): the rating flow grpo-rate
     (flows/rate_flow.py) runs as a subflow, whose run pauses on a form in the Prefect UI, and this run waits
     for it (--rating-timeout); an iteration rated already (in the UI, a terminal or from a CSV) goes on at once;
  3. artifacts (flows/artifacts.py): for each iteration this run (re)computed, a table of its metrics and a
     markdown sample of completions (best and worst of a few groups, with rewards and advantages); a progress
     artifact across the run's iterations; after report, the history table of every iteration.

One workspace runs one flow run at a time (a file lock under .dvc/tmp/; a second flow run waits for it),
and every dvc command holds a second lock, so two dvc commands from flows never run at once in one
workspace (DVC itself refuses to run while another dvc command holds its repo lock).
"""

from __future__ import annotations

import argparse
import heapq
import io
import json
import os
import posixpath
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import artifacts
from flows.rate_flow import RATING_TIMEOUT, RATINGS_DIR, grpo_rate, workspace_dir
from grpo.errors import USER_ERROR_EXIT, InputError
from pipeline.params_file import edit_params, extend_iterations, iteration_keys, iterations_mapping

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # this checkout: its dvc.yaml is stage_names' default
FOREACH = "${train.iterations}"  # the one foreach of dvc.yaml: a stage name@k per iteration k

# flow parameter -> params.yaml key
NAMED_OVERRIDES = {"group_size": "rollout.group_size", "learning_rate": "optim.learning_rate", "beta": "loss.beta"}

RUN_LOCK = ".dvc/tmp/prefect-run.lock"  # one flow run per workspace at a time
DVC_LOCK = ".dvc/tmp/prefect-dvc.lock"  # one dvc command per workspace at a time
LOCK_LOG_EVERY = 30.0  # seconds between "still waiting for the lock" lines
PROGRESS_LOG_EVERY = 10.0  # seconds between two log lines of one progress bar


class StageError(RuntimeError):
    """A DVC stage failed; str(e) names the stage and carries the stage's own error line."""


class StageUserError(StageError):
    """The stage stopped on a user error (grpo.errors.UserError): it printed one line `error: ...` and exited
    with status USER_ERROR_EXIT. The same inputs give the same error, so it is not retried."""


class StageCrash(StageError):
    """The stage crashed (a traceback, an exit status other than USER_ERROR_EXIT, a signal), or dvc failed
    around it: possibly transient (memory, a killed process), so it is retried."""


# ----------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class PlannedStage:
    name: str  # the DVC stage name: check-inputs, generate@3, ...; rate@k for a rating step
    iteration: str | None  # k for a stage of dvc.yaml's foreach over train.iterations, else None
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs, metrics and plots
    rating: bool = False  # not a DVC stage: iteration k's rating step (flows/rate_flow.py), see with_rating_steps


def _dvc_path(text: str) -> str:
    return posixpath.normpath(str(text)).removeprefix("./")


def _expand(spec: dict, key: str | None, item: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A stage's deps and outputs, with ${key} and ${item} of its foreach filled in."""
    def fill(entry: Any) -> str:
        text = next(iter(entry)) if isinstance(entry, dict) else str(entry)  # `- path: {cache: false}`
        if key is not None:
            text = text.replace("${key}", key).replace("${item}", item)
        return _dvc_path(text)

    outs = [fill(o) for section in ("outs", "metrics", "plots") for o in spec.get(section) or []]
    return tuple(fill(d) for d in spec.get("deps") or []), tuple(outs)


def _dependency_order(stages: list[PlannedStage]) -> list[PlannedStage]:
    """The stages in an order where every stage comes after the stages whose outputs it depends on (a dep
    that is an output, inside an output folder, or a folder holding outputs), otherwise as given."""
    producers: dict[str, set[int]] = defaultdict(set)  # output path -> stages
    inside: dict[str, set[int]] = defaultdict(set)  # folder -> stages with outputs under it
    for i, s in enumerate(stages):
        for out in s.outs:
            producers[out].add(i)
            parts = out.split("/")
            for j in range(1, len(parts)):
                inside["/".join(parts[:j])].add(i)
    waiting, dependents = [], defaultdict(list)
    for i, s in enumerate(stages):
        needs = set()
        for dep in s.deps:
            parts = dep.split("/")
            needs |= inside.get(dep, set())
            for j in range(1, len(parts) + 1):
                needs |= producers.get("/".join(parts[:j]), set())
        needs.discard(i)
        waiting.append(len(needs))
        for j in needs:
            dependents[j].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    order: list[int] = []
    while ready:  # Kahn's algorithm, the earliest ready stage first: the given order when it respects the deps
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, j)
    if len(order) < len(stages):
        placed = set(order)
        left = [s.name for i, s in enumerate(stages) if i not in placed]
        raise InputError(f"dvc.yaml: the stages {', '.join(left)} depend on each other's outputs in a cycle")
    return [stages[i] for i in order]


def stage_plan(workspace: str | Path, keys: list[str]) -> list[PlannedStage]:
    """The stages of the workspace's dvc.yaml for iterations `keys` (of params.yaml train.iterations, which
    maps k to k - 1), in the order a flow run runs them: the stages listed before the first foreach stage,
    then for each iteration k the foreach stages as name@k in dvc.yaml's order, then the other stages;
    reordered where a stage would come before a stage whose outputs it depends on."""
    path = Path(workspace) / "dvc.yaml"
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise InputError(f"{path}: cannot read the stages: {' '.join(str(e).split())}") from None
    if not isinstance(stages, dict) or not stages:
        raise InputError(f"{path}: no `stages:` mapping")
    before: list[PlannedStage] = []
    per_iteration: list[tuple[str, dict]] = []
    after: list[PlannedStage] = []
    for name, spec in stages.items():
        if not isinstance(spec, dict) or "matrix" in spec or ("foreach" in spec and spec["foreach"] != FOREACH):
            raise InputError(f"{path}: stage {name}: the flows run plain stages and `foreach: {FOREACH}` ones "
                             f"(found {' '.join(str(spec).split())[:120]})")
        if "foreach" in spec:
            per_iteration.append((name, spec.get("do") or {}))
        else:
            (after if per_iteration else before).append(PlannedStage(name, None, *_expand(spec, None, None)))
    plan = before + [PlannedStage(f"{name}@{k}", k, *_expand(spec, k, str(int(k) - 1)))
                     for k in keys for name, spec in per_iteration] + after
    return _dependency_order(plan)


def rates_by_human(params_path: Path) -> bool:
    """Whether params.yaml's reward.weights has `human` (read as it is: check-inputs validates it)."""
    try:
        weights = ((yaml.safe_load(Path(params_path).read_text()) or {}).get("reward") or {}).get("weights")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return isinstance(weights, dict) and "human" in weights


def with_rating_steps(plan: list[PlannedStage]) -> list[PlannedStage]:
    """The plan with a rating step rate@k for each iteration k (people rate data/rollouts/<k>.parquet into
    data/ratings/<k>.parquet): after the stage that writes the rollouts (generate@k), before the first stage of
    iteration k that reads data/ratings (reward-model@k, score@k). A stage of iteration k depends on the whole
    folder in dvc.yaml; it is ordered here as depending on data/ratings/<k>.parquet only, else it would wait for
    the ratings of later iterations too."""
    def reads_ratings(s: PlannedStage) -> bool:
        return any(d == RATINGS_DIR or d.startswith(RATINGS_DIR + "/") for d in s.deps)

    keys = list(dict.fromkeys(s.iteration for s in plan if s.iteration is not None and reads_ratings(s)))
    if not keys:
        return plan
    ordered: list[PlannedStage] = []
    placed: set[str] = set()
    for s in plan:
        if s.iteration in keys and reads_ratings(s):
            s = PlannedStage(s.name, s.iteration, tuple(f"{RATINGS_DIR}/{s.iteration}.parquet" if d == RATINGS_DIR else d
                                                        for d in s.deps), s.outs)
        ordered.append(s)
        k = s.iteration
        if k in keys and k not in placed and f"data/rollouts/{k}.parquet" in s.outs:
            ordered.append(PlannedStage(f"rate@{k}", k, (f"data/rollouts/{k}.parquet",),
                                        (f"{RATINGS_DIR}/{k}.parquet",), rating=True))
            placed.add(k)
    for k in keys:  # no stage writes the rollouts: before the first stage of iteration k
        if k not in placed:
            first = next(i for i, s in enumerate(ordered) if s.iteration == k)
            ordered.insert(first, PlannedStage(f"rate@{k}", k, (), (f"{RATINGS_DIR}/{k}.parquet",), rating=True))
    original = {s.name: s for s in plan}
    return [original.get(s.name, s) if not s.rating else s for s in _dependency_order(ordered)]


def stage_names(keys: list[str], workspace: str | Path | None = None) -> list[str]:
    """Every stage of dvc.yaml (the workspace's, by default this checkout's) for iterations `keys`, in the
    order a flow run runs them."""
    return [s.name for s in stage_plan(workspace or PROJECT_ROOT, keys)]


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


# ------------------------------------------------------------------------------------------------ flows


ParamsEdit = Callable[[Path], dict[str, tuple[Any, Any]]]  # edits params.yaml, returns {key: (old, new)}


def run_iterations(ws: Path, edit: ParamsEdit | None, stage_retries: int, retry_delay_seconds: float,
                   rating_timeout: int = RATING_TIMEOUT) -> dict:
    """The body of both flows: edit params.yaml (under the workspace lock), run every stage, publish artifacts.
    With `human` in reward.weights, each iteration's completions are rated after generate@k: the rating flow
    runs as a subflow (grpo-rate, flows/rate_flow.py) and this run waits while it is paused on its form."""
    logger = get_run_logger()
    with workspace_lock(ws, RUN_LOCK, "the workspace (one flow run at a time)", logger):
        params_path = ws / "params.yaml"
        before = iteration_keys(params_path)
        changed = edit(params_path) if edit else {}
        for key, (old, new) in changed.items():
            logger.info("params.yaml: %s: %s -> %s", key, json.dumps(old), json.dumps(new))
        if edit and not changed:
            logger.info("params.yaml already has the requested values")
        keys = iteration_keys(params_path)
        if len(keys) < len(before):
            logger.warning("iterations reduced from %d to %d: outputs of iterations %d..%d stay in data/ "
                           "(the report reads every data/metrics/<k>/)", len(before), len(keys), len(keys) + 1, len(before))
        plan = stage_plan(ws, keys)
        logger.info("workspace %s: %d iterations, %d stages", ws, len(keys), len(plan))
        if rates_by_human(params_path):
            plan = with_rating_steps(plan)
            logger.info("reward.weights has human: people rate each iteration's completions after it is generated "
                        "(a grpo-rate subflow run pauses on its form in the Prefect UI)")

        progress = artifacts.start_progress(len(keys))
        stage = run_stage.with_options(retries=stage_retries, retry_delay_seconds=retry_delay_seconds)
        last = {s.iteration: i for i, s in enumerate(plan) if s.iteration is not None and not s.rating}  # iteration k's end
        results: list[dict] = []
        ratings: dict[str, dict] = {}
        of_iteration: dict[str, list[dict]] = defaultdict(list)
        for i, planned in enumerate(plan):
            if planned.rating:
                ratings[planned.iteration] = grpo_rate(iteration=int(planned.iteration), workspace=str(ws),
                                                       timeout=rating_timeout)
                continue
            result = stage(planned.name, str(ws))
            results.append(result)
            k = planned.iteration
            if k is None:
                continue
            of_iteration[k].append(result)
            if last[k] == i:
                if any(r["status"] != "skipped" for r in of_iteration[k]):
                    artifacts.publish_iteration(ws, k)
                done = sum(last[j] <= i for j in last)
                artifacts.publish_progress(progress, done, len(keys), k)
        artifacts.publish_history(ws)
    summary = {
        "workspace": str(ws),
        "iterations": len(keys),
        "params_changed": {k: list(v) for k, v in changed.items()},
        "ran": [r["stage"] for r in results if r["status"] in ("ran", "restored")],
        "skipped": [r["stage"] for r in results if r["status"] == "skipped"],
    }
    if ratings:
        summary["rated"] = {k: r["rated"] for k, r in ratings.items()}
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
    rating_timeout: int = RATING_TIMEOUT,
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
        rating_timeout: with `human` in reward.weights, seconds an iteration's rating form waits for its answers
    """
    ws = workspace_dir(workspace)
    changes = dict(overrides or {})
    for name, value in (("group_size", group_size), ("learning_rate", learning_rate), ("beta", beta)):
        if value is not None:
            changes[NAMED_OVERRIDES[name]] = value
    if iterations is not None:
        if iterations < 1:
            raise ValueError(f"iterations = {iterations} is not allowed; expected an integer >= 1")
        changes["train.iterations"] = iterations_mapping(iterations)
    return run_iterations(ws, (lambda path: edit_params(path, changes)) if changes else None, stage_retries,
                          retry_delay_seconds, rating_timeout)


@flow(name="grpo-extend")
def grpo_extend(
    add_iterations: int = 1,
    workspace: str | None = None,
    stage_retries: int = 2,
    retry_delay_seconds: float = 10.0,
    rating_timeout: int = RATING_TIMEOUT,
) -> dict:
    """Extend the run by k iterations (params.yaml train.iterations gets "N+1": N, ...), then run every stage.

    Args:
        add_iterations: iterations to add to params.yaml train.iterations
        workspace: the project directory with dvc.yaml and params.yaml (default: the current directory)
        stage_retries: retries of a crashed stage (a stage stopped by a user error is not retried)
        retry_delay_seconds: seconds between a crashed stage and its retry
        rating_timeout: with `human` in reward.weights, seconds an iteration's rating form waits for its answers
    """
    if add_iterations < 1:
        raise ValueError(f"add_iterations = {add_iterations} is not allowed; expected an integer >= 1")
    ws = workspace_dir(workspace)

    def extend(params_path: Path) -> dict[str, tuple[Any, Any]]:
        # `python -m pipeline.extend`'s code, on train.iterations as they are once this run holds the lock
        n = extend_iterations(params_path, add_iterations)
        return {"train.iterations": (iterations_mapping(n - add_iterations), iterations_mapping(n))}

    return run_iterations(ws, extend, stage_retries, retry_delay_seconds, rating_timeout)


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
    parser.add_argument("--rating-timeout", type=int, default=RATING_TIMEOUT,
                        help="with human in reward.weights: seconds an iteration's rating form waits (default a day)")
    args = parser.parse_args(argv)
    common = dict(workspace=args.workspace, stage_retries=args.retries, retry_delay_seconds=args.retry_delay,
                  rating_timeout=args.rating_timeout)
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
