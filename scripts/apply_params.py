"""Set the dotted keys of an overrides file (YAML: `prompts.source: humaneval`, ...) in params.yaml, keeping
its comments and layout (pipeline.params_file.edit_params: validated first, nothing written on a bad value).

    python scripts/apply_params.py examples/humaneval.yaml        # then: dvc repro
    python scripts/apply_params.py examples/humaneval.yaml --params other/params.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.params_file import edit_params  # noqa: E402
from pipeline.stage import run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", help="YAML mapping of dotted params.yaml keys to values")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    overrides = yaml.safe_load(Path(args.overrides).read_text(encoding="utf-8")) or {}
    changed = edit_params(args.params, overrides)
    for key, (old, new) in changed.items():
        print(f"{args.params}: {key}: {old!r} -> {new!r}")
    if not changed:
        print(f"{args.params}: already as in {args.overrides}")


if __name__ == "__main__":
    run(main)
