"""Extend a run by k iterations: append "N+1": N, ... to params.yaml's train.iterations (comments kept;
pipeline.params_file makes the edit). `dvc repro` then runs only the new iterations (and the report).

    python -m pipeline.extend 4
"""

from __future__ import annotations

import argparse

from pipeline.params_file import extend_iterations
from pipeline.stage import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("iterations", type=int, help="how many iterations to add")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    total = extend_iterations(args.params, args.iterations)
    print(f"{args.params}: train.iterations now 1..{total}; run `dvc repro` to train the new ones")


if __name__ == "__main__":
    run(main)
