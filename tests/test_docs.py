"""The README, data/README.md and every docs/*.md page name only things that exist: project files, `python -m`
modules, scripts, params.yaml keys and the data paths the stages write. The README stays a front page (at most
250 lines, a map of the code, a link to every docs page), and no page names a commit hash in its prose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "data/README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250
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
            path = ROOT / module.replace(".", "/")
            # a module file, or a package run by its __main__.py (python -m pipeline.worker)
            if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
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
            # data/raw: the bundled inputs; data/ratings: people's ratings, written by them, not by a stage
            if token.startswith(("data/raw", "data/ratings")) or token in ("data/", "data"):
                continue
            if not is_output(token, patterns):
                wrong.append(token)
    assert not wrong, f"{doc} names data paths no stage writes: {sorted(set(wrong))}"


def readme_map() -> str:
    """The README's map of the code: the section "## Where things live", up to the next section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Where things live")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_the_readme_map_names_every_library_pipeline_and_flow_module():
    block = readme_map()
    modules = [p for d in ("grpo", "pipeline", "flows") for p in (ROOT / d).rglob("*.py")
               if p.name != "__init__.py" and "__pycache__" not in p.parts]
    missing = [p.relative_to(ROOT).as_posix() for p in modules if p.name not in block]
    packages = [p for d in ("grpo", "pipeline") for p in (ROOT / d).iterdir() if (p / "__init__.py").exists()]
    missing += [p.relative_to(ROOT).as_posix() + "/" for p in packages if p.name + "/" not in block]
    assert not missing, f"README's 'Where things live' does not mention {missing}"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_the_readme_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert pages, "no docs/*.md page found: the glob is broken"
    unlinked = [page for page in pages if f"]({page})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_markdown_link_to_a_project_file_resolves():
    broken = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (ROOT / doc).parent / file if file else ROOT / doc
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{doc}: {target}")
    assert not broken, f"links to files or headings that do not exist: {broken}"


# A commit hash: 7-40 hex digits with at least one digit and one letter a-f, as a word of its own.
COMMIT_HASH = re.compile(r"(?<![\w.#/-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])", re.I)


def prose(doc: str) -> str:
    """The text outside fenced code blocks, inline code spans and URLs."""
    text = re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]+`", "", text)
    return re.sub(r"(?:https?://|\]\()[^\s)]+", "", text)


def test_the_hash_pattern_finds_hashes_and_only_hashes():
    assert COMMIT_HASH.findall("measured at eb1bc2d (commit 2ae018d), then 0123456789abcdef0123456789abcdef01234567") \
        == ["eb1bc2d", "2ae018d", "0123456789abcdef0123456789abcdef01234567"]
    assert not COMMIT_HASH.findall("lr 5.0e-4, 1e-4, #7615, arXiv 2508.08221, 1234567, deadbeef, 0.125, bf16, 15.8 GB")


@pytest.mark.parametrize("doc", DOCS)
def test_no_commit_hash_in_the_prose(doc):
    found = sorted(set(COMMIT_HASH.findall(prose(doc))))
    assert not found, (f"{doc} names commits {found}: describe a measurement by what differed (a setting, "
                       "a change, a date), not by its commit")
