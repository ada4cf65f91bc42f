"""Rate an iteration's completions in the Prefect UI: the flow grpo-rate pauses on a form, a person fills it in.

    prefect server start --host 127.0.0.1 --port 4200               # in one terminal (UI at http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    dvc repro generate@1                                            # iteration 1's completions
    python -m flows.rate_flow --iteration 1                         # prints the flow run's page: open it, press
                                                                    # Resume, fill in the form, Submit
    dvc repro score@1                                               # scores with the ratings (reward `human`)

The flow reads data/rollouts/<k>.parquet and params.yaml's reward.human, picks the groups a person rates this
iteration (grpo.environments.human.groups_to_rate: the first reward.human.groups_per_iteration groups, every
completion of each), and pauses with Prefect's interactive input (pause_flow_run(wait_for_input=...)). The form,
built at run time from the completions: a `rater` field (the flow's `rater` parameter pre-fills it), one integer
field per completion on reward.human's scale (min_rating..max_rating; "group 2, completion 3"), an optional
comment per completion; its description shows each group's question and its completions, numbered. The server
checks the answers against the form's schema (a rating off the scale, a missing one: refused, the run stays
paused). On Submit the flow writes the ratings with grpo.environments.human.save_ratings (validated, atomic:
data/ratings/<k>.parquet), which DVC sees as a changed dependency of reward-model@k and score@k.

Groups already rated completely are left out of the form; when every group is rated the flow ends at once. A
group rated in part shows its earlier ratings as the fields' values. The grpo-train flow (flows/grpo_flow.py)
runs this flow as a subflow after generate@k when params.yaml's reward.weights has `human`, so the training run
waits for the ratings; `python -m flows.serve` serves it as the deployment grpo-rate/rate.

The form lives on a Prefect server: without PREFECT_API_URL (Prefect's ephemeral mode, a temporary server no
browser reaches) the flow stops with an error saying how to start one, unless there is nothing to rate.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pydantic
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.settings import get_current_settings
from prefect.utilities.urls import url_for

from grpo.config import HumanConfig, load_params
from grpo.contracts import PROMPTS, ROLLOUTS, read_table
from grpo.environments.human import (Key, by_completion, completion_keys, groups_to_rate, how_to_rate, read_ratings,
                                     save_ratings)
from grpo.errors import InputError

RATINGS_DIR = "data/ratings"  # dvc.yaml's --ratings of reward-model@k and score@k
RATING_TIMEOUT = 24 * 3600  # seconds a form waits for its answers before the flow run fails
WRAP = 56  # characters per line of a completion in the form
POLL_SECONDS = 5  # how often the paused flow run asks the server whether it was resumed
START_SERVER = ("start one with `prefect server start --host 127.0.0.1 --port 4200` in another terminal, then "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api` here (docs/prefect.md)")


class NoPrefectServer(InputError):
    """The form needs a Prefect server that a browser reaches; Prefect's ephemeral mode has none."""


# ------------------------------------------------------------------------------------------------- form


@dataclass(frozen=True)
class Completion:
    key: Key  # (group_id, sample_index)
    field: str  # the form's rating field, e.g. g2_c3
    comment_field: str  # the form's comment field, e.g. g2_c3_comment
    title: str  # "group 2, completion 3"
    text: str
    tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Group:
    number: int  # 1.. in the form
    group_id: str
    question: str  # the raw question (data/prompts.parquet), else the rendered prompt
    ground_truth: str
    completions: tuple[Completion, ...]


def form_groups(rollouts: pa.Table, groups: list[str], questions: dict[str, str]) -> list[Group]:
    """The groups of the form, numbered from 1, each with its completions in sample order."""
    rows = rollouts.select(["group_id", "sample_index", "prompt_id", "prompt", "completion", "completion_tokens",
                            "finish_reason", "ground_truth"]).to_pylist()
    out = []
    for number, group_id in enumerate(groups, 1):
        members = sorted((r for r in rows if r["group_id"] == group_id), key=lambda r: r["sample_index"])
        first = members[0]
        completions = tuple(
            Completion(key=(group_id, r["sample_index"]), field=f"g{number}_c{j}", comment_field=f"g{number}_c{j}_comment",
                       title=f"group {number}, completion {j}", text=r["completion"], tokens=r["completion_tokens"],
                       finish_reason=r["finish_reason"])
            for j, r in enumerate(members, 1))
        out.append(Group(number, group_id, questions.get(first["prompt_id"], first["prompt"]), first["ground_truth"],
                         completions))
    return out


def wrapped(text: str, width: int = WRAP) -> str:
    """`text` with lines longer than `width` broken (continuations indented like their line, plus two spaces):
    the UI shows a fenced block unwrapped, with a scroll bar, in a dialog about 60 characters wide."""
    lines = []
    for line in text.rstrip().expandtabs(4).splitlines() or [""]:
        indent = line[: len(line) - len(line.lstrip())]
        lines += textwrap.wrap(line, width, subsequent_indent=indent + "  ", break_on_hyphens=False) or [""]
    return "\n".join(lines)


def _fenced(text: str) -> str:
    """`text` in a fenced block (no markdown or HTML inside it is interpreted), long lines wrapped."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{wrapped(text) if text.strip() else '(empty)'}\n{fence}"


def scale_help(human: HumanConfig) -> str:
    return (f"Rate {human.min_rating} (worst) to {human.max_rating} (best); reward_human = (rating - "
            f"{human.min_rating}) / ({human.max_rating} - {human.min_rating}).")


def _completion_heading(j: int, c: Completion) -> str:
    cut = ", cut at the token limit" if c.finish_reason == "length" else ""
    return f"**Completion {j}** ({c.tokens} tokens{cut})"


def _question_markdown(g: Group) -> list[str]:
    answer = " ".join(g.ground_truth.split())[:80].replace("`", "")
    return [f"**Group {g.number}: question** (reference answer `{answer}`)", "", _fenced(g.question), ""]


def for_field(markdown: str) -> str:
    """Markdown as a field's description for the Prefect UI, which turns every newline not followed by another
    into a space before rendering it (description.replace(/\\n(?!\\n)/g, ' ')), so that a run of m newlines
    becomes m - 1 and a space: each run gets one newline more, and comes out as it was, plus a space that
    indents the next line by one (a fenced block's opening fence is indented alike, which takes it off again)."""
    return re.sub(r"\n+", lambda m: m.group(0) + "\n", markdown)


def field_help(g: Group, j: int, human: HumanConfig) -> str:
    """A rating field's help text (markdown): the completion it rates (after its group's question on the first
    field of a group) and the scale. The Prefect UI shows it above the field, while the form's own description
    disappears once the fields overflow the dialog (Prefect 3.7's V1 UI): each field carries its text."""
    c = g.completions[j - 1]
    lines = _question_markdown(g) if j == 1 else []
    return for_field("\n".join(lines + [_completion_heading(j, c), "", _fenced(c.text), "", scale_help(human)]))


def how_to_fill(iteration: int, human: HumanConfig, rollouts_path: str) -> str:
    return (f"Rate every completion from **{human.min_rating} (worst) to {human.max_rating} (best)** in its field. "
            f"A group's completions answer one question: GRPO learns from how each rates against the others of its "
            f"group, so compare them. The ratings become the reward `human`, reward_human = (rating - "
            f"{human.min_rating}) / ({human.max_rating} - {human.min_rating}). Comments are optional. From "
            f"`{rollouts_path}`; saved to `{RATINGS_DIR}/{iteration}.parquet`.")


def form_description(iteration: int, groups: list[Group], human: HumanConfig, rollouts_path: str) -> str:
    """The form's markdown: how to rate, then each group's question and its completions, numbered."""
    total = sum(len(g.completions) for g in groups)
    lines = [f"## Rate iteration {iteration}: {total} completions in {len(groups)} groups", "",
             how_to_fill(iteration, human, rollouts_path), ""]
    for g in groups:
        lines += [f"### Group {g.number}", ""] + _question_markdown(g)
        for j, c in enumerate(g.completions, 1):
            lines += [f"{_completion_heading(j, c)}: field *{c.title}*", "", _fenced(c.text), ""]
    return "\n".join(lines)


def rating_form(iteration: int, groups: list[Group], human: HumanConfig, rater: str, earlier: dict[Key, dict],
                rollouts_path: str) -> type[RunInput]:
    """The RunInput model of the form: `rater`, then per completion its rating (required unless rated before)
    and an optional comment; the description is form_description's markdown."""
    fields: dict[str, Any] = {
        "rater": (str, pydantic.Field(rater.strip() or ..., min_length=1, title="rater",
                                      description="Your name or handle, stored with every rating. "
                                                  + how_to_fill(iteration, human, rollouts_path))),
    }
    for g in groups:
        for j, c in enumerate(g.completions, 1):
            before = earlier.get(c.key, {})
            fields[c.field] = (int, pydantic.Field(before.get("rating", ...), ge=human.min_rating, le=human.max_rating,
                                                   title=c.title, description=field_help(g, j, human)))
            fields[c.comment_field] = (str, pydantic.Field(before.get("comment") or "", title=f"{c.title}: comment"))
    model = pydantic.create_model(f"RateIteration{iteration}", __base__=RunInput, **fields)
    return model.with_initial_data(description=form_description(iteration, groups, human, rollouts_path))


def answers(form: RunInput, groups: list[Group]) -> dict[Key, tuple[int, str | None]]:
    """{key: (rating, comment)} from a submitted form."""
    return {c.key: (getattr(form, c.field), getattr(form, c.comment_field).strip() or None)
            for g in groups for c in g.completions}


# ----------------------------------------------------------------------------------------------- server


def api_url() -> str | None:
    """The Prefect server the client talks to (PREFECT_API_URL, from the environment or the profile); None in
    Prefect's ephemeral mode."""
    return get_current_settings().api.url


def flow_run_url(flow_run_id: Any) -> str:
    """The flow run's page in the Prefect UI (where its Resume button opens the form)."""
    return url_for("flow-run", obj_id=flow_run_id) or f"(the Prefect UI) runs/flow-run/{flow_run_id}"


# ------------------------------------------------------------------------------------------------- flow


def workspace_dir(workspace: str | None) -> Path:
    ws = Path(workspace).expanduser().resolve() if workspace else Path.cwd()
    if not (ws / "dvc.yaml").exists() or not (ws / "params.yaml").exists():
        raise FileNotFoundError(f"{ws}: not a GRPO workspace (needs dvc.yaml and params.yaml)")
    return ws


def _questions(ws: Path) -> dict[str, str]:
    path = ws / "data/prompts.parquet"
    if not path.exists():
        return {}
    table = read_table(path, PROMPTS)
    return dict(zip(table["prompt_id"].to_pylist(), table["question"].to_pylist()))


def _shown(rollouts: pa.Table, groups: list[Group]) -> dict[Key, str]:
    keys = {c.key for g in groups for c in g.completions}
    return {key: text for key, text in by_completion(rollouts, "completion").items() if key in keys}


@flow(name="grpo-rate", flow_run_name="rate-iteration-{iteration}")
def grpo_rate(
    iteration: int,
    workspace: str | None = None,
    rater: str = "",
    timeout: int = RATING_TIMEOUT,
    poll_seconds: int = POLL_SECONDS,
) -> dict:
    """Rate iteration k's completions: pause on a form in the Prefect UI, write the answers to data/ratings/<k>.parquet.

    Args:
        iteration: the iteration k whose completions (data/rollouts/<k>.parquet) are rated
        workspace: the project directory with dvc.yaml and params.yaml (default: the current directory)
        rater: who rates; empty: asked in the form
        timeout: seconds the form waits for its answers before the flow run fails
        poll_seconds: how often the paused run checks whether it was resumed
    """
    logger = get_run_logger()
    ws = workspace_dir(workspace)
    params = load_params(ws / "params.yaml")
    human = params.reward.human
    rollouts_rel = f"data/rollouts/{iteration}.parquet"
    rollouts_path = ws / rollouts_rel
    if not rollouts_path.exists():
        raise InputError(f"{rollouts_path}: no completions of iteration {iteration} yet: run `dvc repro "
                         f"generate@{iteration}` first")
    rollouts = read_table(rollouts_path, ROLLOUTS)
    ratings_dir = ws / RATINGS_DIR
    ratings_file = ratings_dir / f"{iteration}.parquet"
    earlier = {(r["group_id"], r["sample_index"]): r
               for r in read_ratings(ratings_dir, iteration, rollouts, human).to_pylist()}
    to_rate = groups_to_rate(rollouts, human)
    keys = {g: [key for key in completion_keys(rollouts) if key[0] == g] for g in to_rate}
    open_groups = [g for g in to_rate if any(k not in earlier for k in keys[g])]
    if not open_groups:
        logger.info("iteration %d: the %d completions of its %d groups to rate are rated already (%s): nothing to do",
                    iteration, sum(len(v) for v in keys.values()), len(to_rate), ratings_file)
        return {"iteration": iteration, "ratings": str(ratings_file), "rated": 0, "skipped": True}
    if api_url() is None:
        raise NoPrefectServer(f"iteration {iteration}: the rating form needs a Prefect server, and PREFECT_API_URL is "
                              f"not set (Prefect's ephemeral mode: a temporary server no browser reaches): "
                              f"{START_SERVER}; or {how_to_rate(iteration)}")

    groups = form_groups(rollouts, open_groups, _questions(ws))
    shown = _shown(rollouts, groups)
    form = rating_form(iteration, groups, human, rater, earlier, rollouts_rel)
    total = sum(len(g.completions) for g in groups)
    run_id = FlowRunContext.get().flow_run.id
    url = flow_run_url(run_id)
    logger.info("iteration %d: %d completions in %d groups to rate (%d..%d). Open %s, press Resume, fill in the form "
                "and Submit", iteration, total, len(groups), human.min_rating, human.max_rating, url)
    print(f"rate iteration {iteration} ({total} completions) in the Prefect UI: {url}  (Resume -> the form)", flush=True)

    submitted = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=poll_seconds,
                               key=f"rate-iteration-{iteration}")

    got = answers(submitted, groups)
    now = read_table(rollouts_path, ROLLOUTS)
    if _shown(now, groups) != shown:
        raise InputError(f"{rollouts_path} changed while the form was open (generate@{iteration} ran again?): "
                         f"the ratings are of completions that are gone; nothing was written, rate again")
    path = save_ratings(ratings_dir, iteration, now, human, got, rater=submitted.rater.strip())
    logger.info("wrote %d ratings of iteration %d by %s to %s (%d ratings in the file)", len(got), iteration,
                submitted.rater.strip(), path, len(earlier.keys() - got.keys()) + len(got))
    return {"iteration": iteration, "ratings": str(path), "rated": len(got), "skipped": False}


# -------------------------------------------------------------------------------------------------- CLI


def check_server() -> str:
    """PREFECT_API_URL, once its server answers; SystemExit with what to do otherwise."""
    import httpx

    url = api_url()
    if not url:
        raise SystemExit(f"error: PREFECT_API_URL is not set: the rating form lives on a Prefect server's UI; "
                         f"{START_SERVER}")
    try:
        httpx.get(url.rstrip("/") + "/health", timeout=30).raise_for_status()
    except httpx.HTTPError as e:
        raise SystemExit(f"error: no Prefect server answers at PREFECT_API_URL={url} ({e.__class__.__name__}: {e}); "
                         f"{START_SERVER}") from None
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iteration", type=int, required=True, help="the iteration k to rate (data/rollouts/<k>.parquet)")
    parser.add_argument("--workspace", default=None, help="project directory (default: the current directory)")
    parser.add_argument("--rater", default="", help="who rates (default: asked in the form)")
    parser.add_argument("--timeout", type=int, default=RATING_TIMEOUT, help="seconds to wait for the form's answers")
    parser.add_argument("--poll-seconds", type=int, default=POLL_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    url = check_server()
    print(f"Prefect server: {url}", flush=True)
    state = grpo_rate(iteration=args.iteration, workspace=args.workspace, rater=args.rater, timeout=args.timeout,
                      poll_seconds=args.poll_seconds, return_state=True)
    if not state.is_completed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    if result["skipped"]:
        print(f"iteration {args.iteration} is rated already ({result['ratings']})")
    else:
        print(f"wrote {result['rated']} ratings to {result['ratings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
