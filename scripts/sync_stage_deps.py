"""Rewrite the code deps of every stage in dvc.yaml to the import closure of the module it runs.

    python scripts/sync_stage_deps.py        # after adding or removing an import in grpo/, pipeline/, flows/

tests/test_stage_deps.py requires each stage's code deps to be exactly that closure (so editing a module re-runs
exactly the stages that run it); this writes them from the same functions. Non-code deps keep their order, after
the code; data/inputs.ok stays first. Comments and layout elsewhere in dvc.yaml are kept (ruamel.yaml).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_stage_deps import PACKAGES, code_closure, stage_module  # noqa: E402

FIRST = ["data/inputs.ok"]  # the input check runs before any stage that reads the inputs


def main() -> None:
    yaml = YAML()
    yaml.width = 200
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = ROOT / "dvc.yaml"
    doc = yaml.load(path.read_text())
    changed = []
    for name, stage in doc["stages"].items():
        spec = stage.get("do", stage)
        deps = list(spec.get("deps", []))
        code = sorted(code_closure(stage_module(spec)))
        other = [d for d in deps if str(d).split("/")[0] not in PACKAGES]
        new = [d for d in other if d in FIRST] + code + [d for d in other if d not in FIRST]
        if [str(d) for d in deps] != [str(d) for d in new]:
            spec["deps"] = new
            changed.append(name)
    with open(path, "w") as f:
        yaml.dump(doc, f)
    print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed else "dvc.yaml: deps already exact")


if __name__ == "__main__":
    main()
