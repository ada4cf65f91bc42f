"""Stage check-inputs: validate params.yaml and the prompts file before any stage runs.

DVC deletes a stage's outputs just before running it; a bad parameter or prompts file caught inside a
later stage would cost that stage's earlier output. Every stage depends on this one, so bad input stops
the run here, with one clear line, before anything already produced is touched. Its output never changes
(it only exists when the inputs are valid), so a valid parameter change re-runs only what it affects.

    python -m pipeline.check_inputs --params params.yaml --out data/inputs.ok
"""

from __future__ import annotations

import argparse

from grpo.config import load_params
from grpo.contracts import atomic_write
from pipeline.prepare_prompts import check_source
from pipeline.stage import run, stage

OK_TEXT = "inputs valid\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/inputs.ok")
    args = parser.parse_args(argv)
    with stage("check-inputs", reads=[args.params], writes=[args.out]):
        params = load_params(args.params)
        check_source(params)
        atomic_write(args.out, lambda tmp: tmp.write_text(OK_TEXT))


if __name__ == "__main__":
    run(main)
