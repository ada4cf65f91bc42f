"""Extend a run by k iterations: append "N+1": N, ... to params.yaml's train.iterations (comments kept).
`dvc repro` then runs only the new iterations (and the report).

    python -m pipeline.extend 4
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from grpo.config import load_params, params_from_dict
from grpo.errors import ConfigError
from grpo.contracts import atomic_write
from pipeline.stage import run


def extend_iterations(params_path: str | Path, k: int) -> int:
    """Add k iterations to params_path; returns the new number of iterations."""
    if k < 1:
        raise ConfigError(f"iterations to add = {k} is not allowed; expected an integer >= 1")
    path = Path(params_path)
    n = load_params(path).train.num_iterations  # refuses an invalid file
    mapping = "{" + ", ".join(f'"{i}": {i - 1}' for i in range(1, n + k + 1)) + "}"
    # rewrite only the one-line `iterations: {...}` entry, so every comment and value elsewhere stays as written
    pattern = re.compile(r'^(\s+iterations:\s*)\{[^}\n]*\}', re.MULTILINE)
    text, count = pattern.subn(lambda m: m.group(1) + mapping, path.read_text())
    if count != 1:  # written another way (a block mapping, say): a round-trip edit, which keeps comments
        text = _round_trip_extend(path.read_text(), n, k)
    params_from_dict(yaml.safe_load(text), source=str(path))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return n + k


def _round_trip_extend(text: str, n: int, k: int) -> str:
    import io

    from ruamel.yaml import YAML

    rt = YAML()
    data = rt.load(text)
    for i in range(n + 1, n + k + 1):
        data["train"]["iterations"][str(i)] = i - 1
    out = io.StringIO()
    rt.dump(data, out)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("iterations", type=int, help="how many iterations to add")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    total = extend_iterations(args.params, args.iterations)
    print(f"{args.params}: train.iterations now 1..{total}; run `dvc repro` to train the new ones")


if __name__ == "__main__":
    run(main)
