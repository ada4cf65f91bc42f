"""The README and data/README.md name only things that exist: project files, `python -m` modules, scripts,
params.yaml keys, stage names and the metrics the stages write."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "data/README.md"]
SECTIONS = ("model", "prompts", "rollout", "reward", "advantage", "loss", "optim", "train", "eval")
CODE_DIRS = ("grpo/", "pipeline/", "flows/", "scripts/", "tests/", "docs/", "data/raw", ".dvc/", ".ci/")


def spans(doc: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks."""
    text = (ROOT / doc).read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return inline + [line for block in blocks for line in block.splitlines()]


def params_keys() -> set[str]:
    def walk(prefix: str, node) -> set[str]:
        keys = {prefix} if prefix else set()
        if isinstance(node, dict) and not (prefix.endswith(("weights", "iterations"))):
            for k, v in node.items():
                keys |= walk(f"{prefix}.{k}" if prefix else str(k), v)
        return keys

    return walk("", yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.mark.parametrize("doc", DOCS)
def test_every_project_path_in_the_docs_exists(doc):
    missing = []
    for span in spans(doc):
        for token in re.findall(r"[\w./-]+", span):
            generated = token.startswith((".dvc/cache", ".dvc/tmp"))  # DVC makes these on first use
            if token.startswith(CODE_DIRS) and not generated and not any(ch in token for ch in "<>*"):
                if not (ROOT / token.rstrip(".,:")).exists():
                    missing.append(token)
    assert not missing, f"{doc} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_module_command_in_the_docs_exists(doc):
    missing = []
    for span in spans(doc):
        for module in re.findall(r"python3? -m ((?:grpo|pipeline|flows)(?:\.\w+)+)", span):
            if not (ROOT / (module.replace(".", "/") + ".py")).exists():
                missing.append(module)
    assert not missing, f"{doc} runs modules that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_parameter_in_the_docs_is_in_params_yaml(doc):
    keys = params_keys()
    named = {s.split(":")[0].split("=")[0].strip() for s in spans(doc)}
    named = {n for n in named if re.fullmatch(r"(%s)\.[a-z_.]+" % "|".join(SECTIONS), n)
             and not re.search(r"\.(parquet|jsonl|json|csv|png|py|yaml|md|pt)$", n)}
    unknown = sorted(n for n in named if n not in keys and not n.startswith("reward.weights."))
    assert named or doc != "README.md", "no parameter found: the scan is broken"
    assert not unknown, f"{doc} names parameters that params.yaml does not have: {unknown}"


def output_patterns() -> list[re.Pattern]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = []
    for spec in stages.values():
        body = spec.get("do", spec)
        for key in ("outs", "metrics"):
            outs += [str(o) if not isinstance(o, dict) else next(iter(o)) for o in body.get(key, [])]
    return [re.compile(re.escape(o).replace(r"\$\{key\}", r"\d+").replace(r"\$\{item\}", r"\d+")) for o in outs]


def is_output(token: str, patterns: list[re.Pattern]) -> bool:
    """A file or folder output, a file inside a folder output, or a folder that holds outputs. `k` stands
    for an iteration number (data/rollouts/k.parquet)."""
    path = re.sub(r"/k(?=[./]|$)", "/1", token).rstrip("/")
    for pattern in patterns:
        match = pattern.match(path)
        if match and (match.end() == len(path) or path[match.end()] == "/"):
            return True
        if pattern.pattern.replace(r"\d+", "1").replace("\\", "").startswith(path + "/"):
            return True
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_every_output_path_in_the_docs_is_a_stage_output(doc):
    patterns = output_patterns()
    wrong = []
    for span in spans(doc):
        for token in re.findall(r"(?<![\w/])data/[\w./-]*", span):
            token = token.rstrip(".,:")
            if token.startswith("data/raw") or token in ("data/", "data"):
                continue
            if not is_output(token, patterns):
                wrong.append(token)
    assert not wrong, f"{doc} names data paths no stage writes: {sorted(set(wrong))}"


def test_the_readme_map_names_every_library_and_flow_module():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## What is here"):text.index("## The algorithm")]
    modules = [p for d in ("grpo", "grpo/backends", "flows") for p in (ROOT / d).glob("*.py") if p.name != "__init__.py"]
    missing = [p.relative_to(ROOT).as_posix() for p in modules if p.name not in block]
    assert not missing, f"README's 'What is here' does not mention {missing}"
