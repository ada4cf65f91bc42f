"""Rewrite the code deps of every stage in dvc.yaml to the import closure of the module it runs.

    python scripts/sync_stage_deps.py        # after adding or removing an import in grpo/, pipeline/, flows/

tests/test_stage_deps.py requires each stage's code deps to be exactly that closure (so editing a module re-runs
exactly the stages that run it), with the functions defined here. Non-code deps keep their order, after
the code; data/inputs.ok stays first. Comments and layout elsewhere in dvc.yaml are kept (ruamel.yaml).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo", "pipeline", "flows")


def module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules named by any import statement in the file (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from grpo.x import y`: y may itself be a module
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}
    return found


def code_closure(module: str) -> set[str]:
    """Repository-relative files of `module` and of every project module it may import, transitively."""
    files: set[str] = set()
    todo = [module]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        path = module_file(name)
        files.add(path.relative_to(ROOT).as_posix())
        todo += sorted(imported_modules(path))
    return files


def stage_module(spec: dict) -> str:
    match = re.search(r"python3? -m (pipeline\.\w+)", spec["cmd"])
    if not match:
        raise ValueError(f"stage command does not run a pipeline module: {spec['cmd']}")
    return match.group(1)



FIRST = ["data/inputs.ok"]  # the input check runs before any stage that reads the inputs


def main() -> None:
    from ruamel.yaml import YAML

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
