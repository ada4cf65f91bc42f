"""Stage check-inputs: validate params.yaml and the prompts file before any stage runs.

DVC deletes a stage's outputs just before running it; a bad parameter or prompts file caught inside a
later stage would cost that stage's earlier output. Every stage depends on this one, so bad input stops
the run here, with one clear error (naming the file, and for a bad row its line or row and column; every
bad row at once), before anything already produced is touched. Its output never changes (it only exists
when the inputs are valid), so a valid parameter change re-runs only what it affects.

The prompts file gets the same row validation as prepare-prompts (grpo.environments.prompt_files.read_prompts_source); only
the prompt-length check waits for prepare-prompts, which has the model's tokenizer. For prompts.source
reasoning_gym the generators and their settings are checked. What the weighted rewards need to run is checked
too (grpo.environments.scoring.check_reward_requirements): code_tests with reward.sandbox bwrap stops here when bwrap cannot
run on this machine.

    python -m pipeline.check_inputs --params params.yaml --out data/inputs.ok
"""

from __future__ import annotations

import argparse
import logging

from grpo.config import load_params
from grpo.models.atomic import write_text
from grpo.environments.prompt_files import read_prompts_source
from grpo.environments.reasoning_gym_tasks import check_generators
from grpo.environments.scoring import check_reward_requirements
from grpo.variants import check_variant_names
from pipeline.stage import run, stage

OK_TEXT = "inputs valid\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/inputs.ok")
    args = parser.parse_args(argv)
    reads = [args.params]
    with stage("check-inputs", reads=reads, writes=[args.out]) as log:
        params = load_params(args.params)
        check_variant_names(params, args.params)
        check_reward_requirements(params.reward)
        if params.prompts.source == "reasoning_gym":
            generators = params.prompts.reasoning_gym
            check_generators(generators.datasets, generators.config, generators.seed)
        prompts = read_prompts_source(params.prompts)
        if prompts is not None:
            reads.append(str(prompts.path))
            log.update(prompt_rows=len(prompts.rows), duplicates_dropped=len(prompts.duplicates))
            if prompts.duplicates:
                logging.getLogger("pipeline").info("check-inputs: %s", prompts.duplicates_note())
        write_text(args.out, OK_TEXT)


if __name__ == "__main__":
    run(main)
