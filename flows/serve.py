"""Serve the GRPO deployments to a Prefect server, so runs are started, scheduled and followed from the UI.

    prefect server start --host 127.0.0.1 --port 4200                # in one terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                                            # in another, from the project root

Three deployments for this workspace; the first two run its DVC stages (DVC skips what is fresh):
  grpo-train/train    start or continue a run; "Custom run" in the UI takes the overrides
                      (iterations, group_size, learning_rate, beta, any other key in `overrides`)
  grpo-extend/extend  on a schedule (--every MINUTES, default 60, or --cron), adds --add K iterations
                      (default 1) to params.yaml train.iterations and runs them; at most one at a time
                      (a scheduled run that comes while one is running is cancelled)
  grpo-rate/rate      rate iteration k's completions (the `human` reward): "Custom run" with `iteration`;
                      the run pauses on a form (its page's Resume button) and writes data/ratings/<k>.parquet
                      (flows/rate_flow.py; grpo-train runs it itself after generate@k when human is weighted)

The flow runs execute in subprocesses of this process; stop it with Ctrl-C (its schedules are paused).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.grpo_flow import grpo_extend, grpo_train
from flows.rate_flow import grpo_rate


def deployments(workspace: str | Path, every_minutes: float = 60.0, cron: str | None = None, add: int = 1,
                paused: bool = False, retries: int = 2, retry_delay_seconds: float = 10.0) -> list:
    """The train deployment, the scheduled extend deployment and the rate deployment, bound to one workspace."""
    ws = str(Path(workspace).expanduser().resolve())
    if not (Path(ws) / "dvc.yaml").exists():
        raise SystemExit(f"error: {ws}: no dvc.yaml (run from the project root or pass --workspace)")
    if add < 1:
        raise SystemExit(f"error: --add {add}: expected an integer >= 1")
    common = {"workspace": ws, "stage_retries": retries, "retry_delay_seconds": retry_delay_seconds}
    train = grpo_train.to_deployment(
        name="train",
        parameters=common,
        description=f"Start or continue a GRPO run in {ws}: write the overrides into params.yaml, run the DVC stages.",
        tags=["grpo"],
    )
    schedule = {"cron": cron} if cron else {"interval": timedelta(minutes=every_minutes)}
    extend = grpo_extend.to_deployment(
        name="extend",
        parameters={**common, "add_iterations": add},
        paused=paused,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description=f"Add {add} iteration(s) to the GRPO run in {ws} and run them, on a schedule.",
        tags=["grpo"],
        **schedule,
    )
    rate = grpo_rate.to_deployment(
        name="rate",
        parameters={"workspace": ws},
        description=f"Rate an iteration's completions in {ws} (the human reward): the run pauses on a form; "
                    "press Resume on its page, fill it in, Submit. Writes data/ratings/<k>.parquet.",
        tags=["grpo"],
    )
    return [train, extend, rate]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default=".", help="project directory with dvc.yaml (default: the current directory)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--every", type=float, default=60.0, metavar="MINUTES", help="extend the run every MINUTES (default 60)")
    when.add_argument("--cron", help="extend the run on this cron schedule instead, e.g. '0 * * * *'")
    parser.add_argument("--add", type=int, default=1, metavar="K", help="iterations each extend run adds (default 1)")
    parser.add_argument("--paused", action="store_true", help="create the extend schedule paused (resume it in the UI)")
    parser.add_argument("--retries", type=int, default=2,
                        help="retries of a crashed stage (a user error, exit status 2, is not retried)")
    parser.add_argument("--retry-delay", type=float, default=10.0, help="seconds before a retry")
    args = parser.parse_args(argv)
    serve(*deployments(args.workspace, every_minutes=args.every, cron=args.cron, add=args.add, paused=args.paused,
                       retries=args.retries, retry_delay_seconds=args.retry_delay))


if __name__ == "__main__":
    main()
