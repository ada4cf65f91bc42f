"""Throughput of the code_tests reward on this machine: HumanEval's 164 canonical solutions (each passes) and
as many wrong ones (each fails its first test), scored through the reward registry in the sandbox, the
programs run in parallel up to the machine's cores (grpo.environments.scoring.score_completions).

    python scripts/bench_code_tests.py                 # --sandbox none: without bwrap (UNSAFE, for comparison)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo.config import load_params  # noqa: E402
from grpo.environments.code_tasks import humaneval_ground_truth, humaneval_tasks  # noqa: E402
from grpo.environments.rewards import RewardSettings, Sample  # noqa: E402
from grpo.environments.scoring import score_completions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sandbox", default="bwrap", choices=["bwrap", "none"])
    args = parser.parse_args()
    tasks = humaneval_tasks()
    reward = load_params(Path(__file__).resolve().parents[1] / "params.yaml").reward
    reward = dataclasses.replace(reward, sandbox=args.sandbox,
                                 code_tests=dataclasses.replace(reward.code_tests, all_or_nothing=True))
    settings = RewardSettings(reward, max_completion_tokens=512)
    for kind in ("canonical", "wrong"):
        samples = []
        for task in tasks:
            body = task["canonical_solution"] if kind == "canonical" else "    return None\n"
            samples.append(Sample(f"```python\n{task['prompt']}{body}```", humaneval_ground_truth(task), 1, "stop"))
        start = time.perf_counter()
        columns = score_completions(samples, {"code_tests": 1.0}, settings)
        seconds = time.perf_counter() - start
        passed = sum(v == 1.0 for v in columns["reward_code_tests"])
        print(f"{kind}: {len(samples)} programs, {passed} pass, {seconds:.1f} s, {len(samples) / seconds:.1f} "
              f"programs/s ({os.cpu_count()} cores, sandbox {args.sandbox})")


if __name__ == "__main__":
    main()
