"""Every DVC stage depends on all the project code it runs, and on nothing else of it: a cached output can
only come from the code that is checked out.

The code a stage runs is the import closure of its module (`python -m pipeline.<stage>` in dvc.yaml),
read from the source: every `import` of a project module, at the top of a file or inside a function
(backends are imported when chosen), plus the packages' __init__.py. A subprocess that imports the stage
module checks that closure against what Python really loads.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from scripts.sync_stage_deps import PACKAGES, ROOT, code_closure, stage_module
def loaded_at_import(module: str) -> set[str]:
    """The project files Python loads when it imports `module` (in a fresh interpreter)."""
    code = (f"import json, sys, {module}\n"
            f"root = {str(ROOT)!r}\n"
            "print(json.dumps(sorted(m.__file__[len(root) + 1:] for m in list(sys.modules.values())\n"
            "    if getattr(m, '__file__', None) and m.__file__.startswith(root + '/'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def code_deps(spec: dict) -> set[str]:
    """The deps of a stage that are project code (.py files; a folder of code stands for all its .py files)."""
    files: set[str] = set()
    for dep in spec.get("deps", []):
        path = ROOT / dep
        if dep.split("/")[0] not in PACKAGES:
            continue
        files |= ({p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")} if path.is_dir() else {dep})
    return files


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_stage_deps_are_exactly_the_code_it_runs(stage):
    spec = dvc_stages()[stage]
    needed = code_closure(stage_module(spec))
    declared = code_deps(spec)
    assert not needed - declared, f"dvc.yaml stage {stage} misses deps on code it runs: {sorted(needed - declared)}"
    assert not declared - needed, f"dvc.yaml stage {stage} depends on code it never runs: {sorted(declared - needed)}"


@pytest.mark.parametrize("module", sorted({stage_module(spec) for spec in dvc_stages().values()}))
def test_the_source_closure_covers_what_python_loads(module):
    loaded = loaded_at_import(module)
    closure = code_closure(module)
    assert loaded <= closure, f"{module} loads {sorted(loaded - closure)}, which the source scan missed"


def test_the_closure_follows_imports_inside_functions():
    # generate chooses its backend at run time; the vLLM one is imported only then, and is still a dep
    assert "grpo/backends/vllm_backend.py" in code_closure("pipeline.generate")
    assert "grpo/backends/vllm_backend.py" not in loaded_at_import("pipeline.generate")
