"""The code sandbox (grpo.environments.sandbox) and the code_tests reward (grpo.environments.code_tasks).

Each hostile program is run with small limits and must end within them, with a reason, leaving no process
(no process of uid 65534, no descendant of ours) and no file (nothing of uid 65534 in /tmp, nothing in the
places it tried to write) behind. The network test only ever opens and connects to 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from grpo.environments import sandbox
from grpo.environments.code_tasks import code_tests_score, extract_program, humaneval_ground_truth, humaneval_tasks, score_many
from grpo.errors import ConfigError
from grpo.environments.sandbox import SANDBOX_UID, run_many, run_python
from tests.project import ROOT

psutil = pytest.importorskip("psutil")

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_available(),
                                   reason="bwrap cannot run here (see grpo.environments.sandbox.check_sandbox)")
LIMITS = {"timeout_s": 1.0, "memory_mb": 256, "max_output_bytes": 4096, "max_processes": 16, "tmp_mb": 4}
SLACK_S = 2.0  # a run may take this much longer than its timeout (start-up, the kill)


def sandbox_processes() -> set[int]:
    found = set()
    for process in psutil.process_iter():
        try:
            if process.uids().real == SANDBOX_UID:
                found.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def sandbox_files() -> set[Path]:
    return {p for p in Path("/tmp").iterdir() if p.lstat().st_uid == SANDBOX_UID}


@pytest.fixture
def no_leftovers():
    """Fails the test if a sandbox process or a uid-65534 file in /tmp outlives the call; kills such
    processes either way, so that a failing test leaves the machine clean."""
    processes, files = sandbox_processes(), sandbox_files()
    # descendants from before the call (an earlier test's unreaped child, a multiprocessing helper) are not its
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    yield
    left = [psutil.Process(pid) for pid in sandbox_processes() - processes]
    left += [child for child in psutil.Process().children(recursive=True) if child.pid not in children]
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left behind: {[(p.pid, p.info if hasattr(p, 'info') else '') for p in left]}"
    assert sandbox_files() == files


def run(code: str, **overrides) -> sandbox.SandboxResult:
    result = run_python(code, **{**LIMITS, **overrides})
    assert result.wall_s < overrides.get("timeout_s", LIMITS["timeout_s"]) + SLACK_S
    return result


# --- ordinary programs ---------------------------------------------------------------------------------


@needs_sandbox
def test_a_program_gets_its_stdin_and_returns_its_output_and_status(no_leftovers):
    result = run("import sys\ndata = sys.stdin.read()\nprint(data.upper())\nprint('warn', file=sys.stderr)\n"
                 "sys.exit(3)", stdin="hello")
    assert (result.returncode, result.stdout, result.stderr) == (3, "HELLO\n", "warn\n")
    assert result.reason is None and not result.timed_out and result.wall_s > 0


@needs_sandbox
def test_a_crash_is_a_result_not_an_exception(no_leftovers):
    result = run("1 / 0")
    assert result.returncode == 1 and result.reason is None
    assert result.stderr.strip().endswith("ZeroDivisionError: division by zero")


@needs_sandbox
def test_the_program_runs_as_nobody_without_capabilities_or_network_devices(no_leftovers):
    result = run("import os\nstatus = open('/proc/self/status').read()\n"
                 "print(os.getuid(), os.getgid(), os.getgroups(), status.split('CapEff:')[1].split()[0])\n"
                 "print(sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]))\n"
                 "print(os.getcwd(), sorted(os.listdir('/')))")
    ids, interfaces, where = result.stdout.splitlines()
    assert ids == "65534 65534 [] 0000000000000000"
    assert interfaces == "['lo']"
    assert where.startswith("/tmp ") and "root" not in where and "work" not in where and "home" not in where


@needs_sandbox
def test_the_callers_environment_is_not_visible(no_leftovers, monkeypatch):
    monkeypatch.setenv("GRPO_SANDBOX_SECRET", "s3cret-token")
    result = run("import os, glob\nprint(dict(os.environ))\n"
                 "for path in glob.glob('/proc/*/environ'):\n    print(open(path, 'rb').read())")
    assert result.returncode == 0 and "HOME" in result.stdout
    assert "s3cret-token" not in result.stdout and "GRPO_SANDBOX_SECRET" not in result.stdout


# --- hostile programs ----------------------------------------------------------------------------------


@needs_sandbox
def test_a_fork_bomb_hits_the_process_limit(no_leftovers):
    # bounded (200) so that a sandbox without the limit fails this test instead of the machine
    result = run("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
                 "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
                 "    n += 1\nprint(n)")
    assert int(result.stdout) < LIMITS["max_processes"]


@needs_sandbox
def test_a_relentless_fork_bomb_ends_at_the_timeout(no_leftovers):
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.reason in {"timeout", "cpu time limit"}


@needs_sandbox
def test_parallel_sandboxes_do_not_share_a_process_budget(no_leftovers):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    fork_some = "import os, time\nfor _ in range(8):\n    if os.fork() == 0:\n        time.sleep(5)\n        os._exit(0)\nprint('ok')"
    results = run_many([bomb, fork_some, bomb, fork_some], max_workers=4, **LIMITS)
    assert [r.stdout for r in results[1::2]] == ["ok\n", "ok\n"]


@needs_sandbox
def test_a_memory_hog_hits_the_memory_limit(no_leftovers):
    # bounded (2 GiB) so that a sandbox without the limit fails this test instead of the machine
    result = run("chunks = []\nfor _ in range(20):\n    chunks.append(bytearray(100 << 20))\n"
                 "    print(len(chunks), flush=True)")
    assert result.reason == "memory limit"
    assert int(result.stdout.split()[-1]) * 100 < LIMITS["memory_mb"]


@pytest.mark.parametrize("name,code", [
    ("infinite loop", "while True:\n    pass"),
    ("sleep", "import time\ntime.sleep(30)"),
    ("32 spinning threads", "import threading\ndef spin():\n    while True:\n        pass\n"
                            "for _ in range(32):\n    threading.Thread(target=spin).start()"),
])
@needs_sandbox
def test_a_program_that_does_not_end_is_killed_at_the_timeout(no_leftovers, name, code):
    start = time.monotonic()
    result = run(code)
    assert result.reason in {"timeout", "cpu time limit"}, name
    assert result.returncode < 0
    assert time.monotonic() - start < LIMITS["timeout_s"] + SLACK_S


@needs_sandbox
def test_unbounded_output_is_cut_at_the_cap(no_leftovers):
    result = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n    sys.stderr.write('y' * 100)")
    assert result.reason == "output limit" and result.returncode < 0
    assert len(result.stdout) + len(result.stderr) <= LIMITS["max_output_bytes"]


@needs_sandbox
def test_filling_tmp_stops_at_its_size(no_leftovers):
    # bounded (64 MiB) so that an unbounded tmp fails this test instead of filling memory
    result = run("import os\nfor i in range(64):\n    with open(f'/tmp/f{i}', 'wb') as f:\n"
                 "        f.write(b'x' * (1 << 20))\n    print(i + 1, flush=True)\nprint(os.listdir('/tmp'))")
    assert result.reason == "tmp full"
    assert int(result.stdout.split()[-1]) <= LIMITS["tmp_mb"]


@needs_sandbox
def test_the_network_is_unreachable(no_leftovers):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        result = run(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
                     "    print('connected')\nexcept OSError as e:\n    print('refused', e)")
        assert result.stdout.startswith("refused")
        with pytest.raises(socket.timeout):
            listener.accept()


@needs_sandbox
def test_writes_outside_the_sandbox_tmp_do_not_land(no_leftovers, tmp_path):
    targets = [tmp_path / "escaped", Path("/root/escaped-from-sandbox"), ROOT / "escaped-from-sandbox",
               Path("/escaped-from-sandbox"), Path("/dev/escaped-from-sandbox"), Path("/tmp/escaped-from-sandbox")]
    for target in targets:
        assert not target.exists()
    code = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('x')\n    print('wrote', {str(t)!r})\n"
                     f"except OSError as e:\n    print('failed', e)" for t in targets)
    try:
        result = run(code)
        wrote = [line for line in result.stdout.splitlines() if line.startswith("wrote")]
        assert wrote == ["wrote /tmp/escaped-from-sandbox"]  # into its own /tmp: fine
        assert not any(t.exists() for t in targets)
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


@needs_sandbox
def test_the_project_and_root_are_not_readable(no_leftovers):
    paths = [ROOT / "params.yaml", ROOT / "grpo" / "sandbox.py", Path("/root"), Path("/etc/passwd"),
             Path("/work")]
    code = "import os\n" + "\n".join(
        f"try:\n    print('read', os.listdir({str(p)!r}) if os.path.isdir({str(p)!r}) else open({str(p)!r}).read(10))\n"
        f"except OSError as e:\n    print('failed', type(e).__name__)" for p in paths)
    result = run(code)
    assert result.stdout.splitlines() == ["failed FileNotFoundError"] * len(paths)


@needs_sandbox
def test_killing_its_parent_and_pid_1_harms_nothing(no_leftovers):
    parent = os.getppid()  # 1 when pytest itself was started detached (nohup ... &)
    result = run("import os, signal\nfor pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
                 "    except OSError as e:\n        print(e)\nprint('still here')")
    assert result.stdout.endswith("still here\n") and result.reason is None
    os.kill(parent, 0)  # and our parent is alive (raises if it is gone) ...
    assert os.getppid() == parent  # ... and still ours


@needs_sandbox
def test_a_daemon_does_not_outlive_the_call(no_leftovers):
    """The daemon double-forks into a session of its own and writes a marker every 0.1 s, into the sandbox's
    /tmp and (trying) into the host's /tmp; nothing is shared with the host, so the process table is
    watched instead: no process of uid 65534 and no descendant of ours may be left (fixture)."""
    marker = Path("/tmp/sandbox-daemon-marker")
    result = run(f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                 f"        while True:\n            for path in ('/tmp/marker', {str(marker)!r}):\n"
                 f"                try:\n                    open(path, 'a').write('x')\n"
                 f"                except OSError:\n                    pass\n            time.sleep(0.1)\n"
                 f"    os._exit(0)\ntime.sleep(0.3)\nprint('parent exits')", timeout_s=5.0)
    assert result.stdout == "parent exits\n" and result.reason is None
    assert result.wall_s < 2.0
    time.sleep(0.3)  # a surviving daemon would write the marker meanwhile
    assert not marker.exists()


@needs_sandbox
def test_a_program_cannot_make_namespaces_of_its_own(no_leftovers):
    result = run("import ctypes\nprint(ctypes.CDLL(None, use_errno=True).unshare(0x10000000), ctypes.get_errno())")
    assert result.stdout.split()[0] == "-1"


# --- configuration -----------------------------------------------------------------------------------


@pytest.fixture
def fresh_probe():
    sandbox._probe_sandbox.cache_clear()
    yield
    sandbox._probe_sandbox.cache_clear()


def test_without_bwrap_the_sandbox_is_a_config_error(monkeypatch, fresh_probe):
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    assert not sandbox.sandbox_available()
    with pytest.raises(ConfigError, match="no bwrap on PATH.*reward.sandbox: none"):
        run_python("print(1)")


def test_an_unknown_sandbox_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="bwrap, none"):
        run_python("print(1)", sandbox="docker")


def test_the_unsafe_mode_runs_without_bwrap(monkeypatch, fresh_probe):
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    monkeypatch.setenv("GRPO_SANDBOX_SECRET", "s3cret-token")
    result = run_python("import os\nprint(6 * 7, 'GRPO_SANDBOX_SECRET' in os.environ)", sandbox="none")
    assert (result.returncode, result.stdout) == (0, "42 False\n")
    assert run_python("while True: pass", sandbox="none", timeout_s=0.5).reason == "timeout"


# --- the code_tests reward ---------------------------------------------------------------------------


@pytest.mark.parametrize("completion,program", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```\nthen\n```\ny = 2\n```", "y = 2\n"),  # the last block
    ("```bash\nls\n```\ntext\n```python\ncode\n```\n", "code\n"),  # other languages skipped
    ("```python\ndef f():\n    return", "def f():\n    return"),  # cut off inside the block
    ("def f():\n    return 1", "def f():\n    return 1"),  # no fence: the whole text
    ("```text\nhi\n```", "```text\nhi\n```"),  # no Python block: the whole text
])
def test_extract_program(completion, program):
    assert extract_program(completion) == program


def test_extract_program_prefers_the_block_that_defines_the_entry_point():
    completion = "```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```"
    assert extract_program(completion, "f") == "def f():\n    return 1\n"
    assert extract_program(completion) == "print(f())\n"
    assert extract_program(completion, "g") == "print(f())\n"  # no block defines it: the last one


@pytest.mark.parametrize("ground_truth,message", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"entry_point": "f"}), "lacks 'test'"),
    (json.dumps({"test": "def check(candidate): assert candidate()"}), "lacks 'entry_point'"),
    (json.dumps({"test": "assert True", "entry_point": "f"}), "no check"),
    (json.dumps({"test": "def check(c):\n  assert", "entry_point": "f"}), "does not parse"),
])
def test_bad_ground_truth_is_a_value_error(ground_truth, message):
    with pytest.raises(ValueError, match=message):
        code_tests_score("def f(): pass", ground_truth, all_or_nothing=True)


@pytest.fixture(scope="module")
def humaneval():
    return {task["task_id"]: task for task in humaneval_tasks()}


def test_humaneval_is_bundled(humaneval):
    assert len(humaneval) == 164
    assert set(humaneval["HumanEval/0"]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


@needs_sandbox
def test_humaneval_canonical_solutions_score_1_and_wrong_ones_0(humaneval, no_leftovers):
    task = humaneval["HumanEval/13"]  # greatest_common_divisor, 4 asserts
    truth = humaneval_ground_truth(task)
    full = f"```python\n{task['prompt']}{task['canonical_solution']}```"
    body = task["canonical_solution"]  # a continuation of the prompt, as a base model writes it
    wrong = "def greatest_common_divisor(a, b):\n    return a * b"
    partial = "def greatest_common_divisor(a, b):\n    return 1"  # right for (3, 7) only
    for completion in (full, body):
        assert code_tests_score(completion, truth, all_or_nothing=True) == (1.0, None)
        assert code_tests_score(completion, truth, all_or_nothing=False) == (1.0, None)
    assert code_tests_score(wrong, truth, all_or_nothing=False)[0] == 0.0
    assert code_tests_score(partial, truth, all_or_nothing=True)[0] == 0.0
    score, error = code_tests_score(partial, truth, all_or_nothing=False)
    assert score == 0.25 and error.startswith("3 of 4 tests failed; first: AssertionError at `assert candidate(10, 15)")


@needs_sandbox
def test_humaneval_helpers_from_the_prompt_are_available(humaneval, no_leftovers):
    task = humaneval["HumanEval/32"]  # its test calls poly(), defined in the prompt only
    solution = "```python\nimport math\n\ndef find_zero(xs):\n" + task["canonical_solution"] + "```"
    assert code_tests_score(solution, humaneval_ground_truth(task), all_or_nothing=True) == (1.0, None)


@needs_sandbox
def test_code_tests_errors_say_why(humaneval, no_leftovers):
    truth = humaneval_ground_truth(humaneval["HumanEval/13"])
    cases = {
        "def greatest_common_divisor(a, b) return 1": "syntax error",
        "def gcd(a, b):\n    return 1": "missing entry point 'greatest_common_divisor'",
        "def greatest_common_divisor(a, b):\n    return a // 0": "ZeroDivisionError: integer division or modulo by zero",
        "import nonexistent_module\ndef greatest_common_divisor(a, b):\n    return 1": "ModuleNotFoundError",
        "def greatest_common_divisor(a, b):\n    while True:\n        pass": "timeout after 0 of 4 tests passed",
        # a fake result (a guessed nonce), then an exit before the tests: counts for nothing
        "import os\ndef greatest_common_divisor(a, b):\n    return 0\n"
        + "".join(f"print('\\n0 pass {i}')\n" for i in range(4)) + "print('0 done')\nos._exit(0)":
            "the program exited with status 0 after 0 of 4 tests passed",
    }
    results = score_many(list(cases), [truth] * len(cases), all_or_nothing=True, timeout_s=1.0)
    for (completion, expected), (score, error) in zip(cases.items(), results):
        assert score == 0.0 and expected in error, (completion, error)


@needs_sandbox
def test_a_fraction_counts_the_tests_passed_before_a_timeout(humaneval, no_leftovers):
    truth = humaneval_ground_truth(humaneval["HumanEval/13"])
    hangs_late = "def greatest_common_divisor(a, b):\n    while a == 144:\n        pass\n" \
                 "    import math\n    return math.gcd(a, b)"
    score, error = code_tests_score(hangs_late, truth, all_or_nothing=False, timeout_s=1.0)
    assert score == 0.75 and error == "timeout after 3 of 4 tests passed"
