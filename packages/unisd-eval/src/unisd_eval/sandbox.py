"""Run untrusted Python programs (model-generated code plus its tests) in separate, limited processes.

Never ``exec`` generated code in our own process (the research code did, §7.22). Each program gets:

- its own process, started in a new session (process group) that is killed as a whole afterwards;
- a wall-clock timeout, and rlimits on CPU time, address space, process count, file size, open files;
- a fresh temporary working directory, removed afterwards, and an environment built from scratch
  (nothing inherited: no tokens or keys of the caller);
- when we run as root, a dedicated unprivileged uid per concurrent slot (claimed with a lock file, so
  parallel runs and other processes never share one). That uid cannot write or delete the caller's
  files, read other processes' environments, or signal the caller, and ``RLIMIT_NPROC`` — which the
  kernel does not enforce for root — really bounds a fork bomb. After the run every process of that
  uid is killed.

Not root: the program runs under the caller's uid. Limits, timeout, temp dir, clean environment and
the disposable intermediate parent still apply, but absolute-path writes into directories the caller
can write are *not* prevented, and the process limit is the caller's current process count plus
``max_processes``. As root, what the program leaves at the top of world-writable directories (``/tmp``,
``/var/tmp``, ``/dev/shm``) is deleted after the run; without root it stays.

Verdicts: ``passed`` (the program ran to its end: solution and every test), ``failed`` (an exception,
an assertion, or an early ``sys.exit``/``os._exit``), ``timeout`` (wall clock or CPU time),
``resource-limit`` (memory, file size, process count) and ``crashed`` (killed by a signal, or the
sandbox itself broke).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .sandbox_runner import RUNNER_SOURCE

PASSED, FAILED, TIMEOUT, CRASHED, RESOURCE_LIMIT = "passed", "failed", "timeout", "crashed", "resource-limit"
VERDICTS = (PASSED, FAILED, TIMEOUT, CRASHED, RESOURCE_LIMIT)
UID_BASE = 61000  # first uid of the sandbox slots (root only); far above regular users
UID_SLOTS = 256
_RESOURCE_ERRNOS = {errno_mod.EFBIG, errno_mod.EAGAIN, errno_mod.ENOMEM, errno_mod.ENOSPC, errno_mod.EDQUOT}


@dataclass
class Limits:
    """Resource limits of one program. ``timeout`` is wall-clock seconds; ``cpu`` defaults to it."""

    timeout: float = 10.0
    cpu: int | None = None
    memory_bytes: int = 1 << 30
    max_processes: int = 16
    file_bytes: int = 16 << 20
    open_files: int = 256
    max_output: int = 8192  # characters kept of stdout and of stderr


@dataclass
class Result:
    """What happened to one program."""

    verdict: str
    error: str | None = None
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    exit_code: int | None = None
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED


def privilege_drop_available() -> bool:
    """True when we can run programs under a dedicated unprivileged uid (we are root on POSIX)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def _claim_uid() -> Iterator[int]:
    """Hold an exclusive lock on one sandbox uid for the duration of a run (across processes too)."""
    lock_dir = Path(tempfile.gettempdir()) / "unisd-sandbox-locks"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    start = secrets.randbelow(UID_SLOTS)
    for attempt in range(200):
        for i in range(UID_SLOTS):
            uid = UID_BASE + (start + i) % UID_SLOTS
            if _uid_has_account(uid):
                continue  # a real account: never run as it, never kill its processes
            fh = open(lock_dir / f"{uid}.lock", "w")  # noqa: SIM115 - held open while locked
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            try:
                _kill_uid(uid)  # leftovers of a run that died before its cleanup
                yield uid
            finally:
                _kill_uid(uid)
                _remove_uid_files(uid)
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        time.sleep(0.05 * (attempt + 1))
    raise RuntimeError("no free sandbox uid slot (too many concurrent sandboxes)")


def _uid_has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _uid_processes(uid: int) -> list[int]:
    """Live processes whose real uid is ``uid`` (empty where there is no /proc)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                        break  # already dead; a zombie waits for its reaper and holds nothing
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return pids


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` until none is left (a fork bomb may race for a few rounds)."""
    for _ in range(50):
        pids = _uid_processes(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _count_own_tasks() -> int:
    """Threads of our uid: what RLIMIT_NPROC counts when the program runs under our own uid."""
    total = 0
    for pid in _uid_processes(os.getuid()):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("Threads:")), 1)
        except (OSError, ValueError):
            continue
    return total


WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")


def _remove_uid_files(uid: int) -> None:
    """Delete what the sandbox uid left at the top of world-writable directories (e.g. /tmp/x)."""
    for folder in dict.fromkeys((tempfile.gettempdir(), *WORLD_WRITABLE)):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


_INTERPRETER_CACHE: dict[tuple[str, int | None], str] = {}
_INTERPRETER_LOCK = threading.Lock()


def _interpreter_for(uid: int | None, explicit: str | None) -> str:
    """A Python interpreter the sandbox user can execute (probed once, then cached).

    Our own interpreter may live where an unprivileged uid cannot read it (e.g. under /root), so as
    root we probe ours first, then the system's python3.
    """
    if explicit:
        return explicit
    key = (sys.executable, uid)
    with _INTERPRETER_LOCK:
        if key in _INTERPRETER_CACHE:
            return _INTERPRETER_CACHE[key]
        candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3"]
        if uid is None:
            _INTERPRETER_CACHE[key] = sys.executable
            return sys.executable
        for cand in dict.fromkeys(c for c in candidates if c):
            try:
                probe = subprocess.run(
                    [cand, "-I", "-c", "import json, resource"], user=uid, group=uid, extra_groups=[],
                    cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=30,
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if probe.returncode == 0:
                _INTERPRETER_CACHE[key] = cand
                return cand
    raise RuntimeError(
        "no Python interpreter is executable by the unprivileged sandbox user; install python3 in a "
        "world-readable location or pass Sandbox(python=PATH)"
    )


class Sandbox:
    """Runs Python programs under :class:`Limits`; ``run_many`` runs several at once (bounded)."""

    def __init__(self, limits: Limits | None = None, workers: int | None = None, python: str | None = None,
                 drop_privileges: bool | None = None):
        self.limits = limits or Limits()
        self.workers = workers or max(1, min(4, (os.cpu_count() or 1)))
        self.python = python
        self.drop_privileges = privilege_drop_available() if drop_privileges is None else drop_privileges
        if self.drop_privileges and not privilege_drop_available():
            raise RuntimeError("drop_privileges=True needs root (to switch to an unprivileged uid)")

    def run_many(self, programs: Sequence[str]) -> list[Result]:
        """Run every program (in parallel, at most ``workers`` at a time); results in input order."""
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: str) -> Result:
        """Run one program to completion, timeout or limit, and classify what happened."""
        if self.drop_privileges:
            with _claim_uid() as uid:
                return self._run(program, uid)
        return self._run(program, None)

    def _run(self, program: str, uid: int | None) -> Result:
        limits = self.limits
        python = _interpreter_for(uid, self.python)
        token = secrets.token_hex(16)
        private = Path(tempfile.mkdtemp(prefix="unisd-sbx-io-"))  # 0700, ours: output and report files
        work = Path(tempfile.mkdtemp(prefix="unisd-sbx-"))  # the program's working directory
        try:
            prog = work / "program.py"
            prog.write_text(program, encoding="utf-8")
            if uid is not None:
                for path in (work, prog):
                    os.chown(path, uid, uid)
            nproc = limits.max_processes if uid is not None else _count_own_tasks() + limits.max_processes
            spec = {
                "cpu": limits.cpu if limits.cpu is not None else max(1, int(limits.timeout + 0.999)),
                "as": limits.memory_bytes, "nproc": nproc, "fsize": limits.file_bytes,
                "nofile": limits.open_files, "core": 0,
            }
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                   "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
            out_path, err_path, res_path = private / "stdout", private / "stderr", private / "result"
            started = time.perf_counter()
            with open(out_path, "wb") as out, open(err_path, "wb") as err, open(res_path, "wb") as res:
                kwargs: dict = {}
                if uid is not None:
                    kwargs = {"user": uid, "group": uid, "extra_groups": []}
                try:
                    proc = subprocess.Popen(
                        [python, "-I", "-c", RUNNER_SOURCE, json.dumps(spec), str(prog), str(res.fileno())],
                        stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env, pass_fds=(res.fileno(),),
                        start_new_session=True, close_fds=True, **kwargs,
                    )
                except OSError as exc:
                    return Result(CRASHED, f"could not start the sandbox: {exc}")
                timed_out = False
                try:
                    proc.communicate(input=(token + "\n").encode(), timeout=limits.timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: forks included
                    if uid is not None:
                        _kill_uid(uid)
                    proc.wait()
            duration = time.perf_counter() - started
            stdout = _read_capped(out_path, limits.max_output)
            stderr = _read_capped(err_path, limits.max_output)
            report = _read_report(res_path, token)
            result = _classify(report, timed_out, proc.returncode, limits)
            result.stdout, result.stderr, result.duration = stdout, stderr, duration
            if result.verdict == FAILED and result.error and stderr:
                result.error = f"{result.error}\n{_tail(stderr, 400)}"
            return result
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(private, ignore_errors=True)


def _read_capped(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", "replace")
    return text + "\n[... truncated]" if len(data) > limit else text


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _read_report(path: Path, token: str) -> dict | None:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # The report must come from our intermediate: it alone received the token (after the fork).
    if not isinstance(report, dict) or report.get("token") != token:
        return None
    return report


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _classify(report: dict | None, timed_out: bool, returncode: int | None, limits: Limits) -> Result:
    if timed_out:
        return Result(TIMEOUT, f"wall-clock timeout after {limits.timeout:g} s", exit_code=returncode)
    if report is None:
        why = f"exit code {returncode}" if returncode is None or returncode >= 0 else _signal_name(-returncode)
        return Result(CRASHED, f"the sandbox process died without a report ({why}); "
                      "e.g. the program killed its parent", exit_code=returncode)
    code = report.get("exit")
    child = report.get("child") or {}
    if isinstance(code, int) and code < 0:  # the program's process died from a signal
        sig = -code
        if sig == signal.SIGXCPU:
            return Result(TIMEOUT, f"CPU time limit ({limits.cpu or int(limits.timeout + 0.999)} s)", exit_code=code)
        if sig == signal.SIGXFSZ:
            return Result(RESOURCE_LIMIT, f"file size limit ({limits.file_bytes} bytes)", exit_code=code)
        if sig == signal.SIGKILL:
            return Result(CRASHED, "killed (SIGKILL)", exit_code=code)
        return Result(CRASHED, f"killed by {_signal_name(sig)}", exit_code=code)
    if child.get("done") and code == 0:
        return Result(PASSED, None, exit_code=code)
    exc, err_no, message = child.get("exc"), child.get("errno"), child.get("message", "")
    if exc is None:
        return Result(FAILED, f"the program exited (code {code}) before it finished", exit_code=code)
    text = f"{exc}: {message}" if message else exc
    if exc == "MemoryError":
        return Result(RESOURCE_LIMIT, f"memory limit ({limits.memory_bytes} bytes): {text}", exit_code=code)
    if err_no in _RESOURCE_ERRNOS or exc == "BlockingIOError":
        return Result(RESOURCE_LIMIT, f"resource limit: {text}", exit_code=code)
    return Result(FAILED, text, exit_code=code)


def run_program(program: str, limits: Limits | None = None) -> Result:
    """Run one program with default settings (a convenience around :class:`Sandbox`)."""
    return Sandbox(limits).run(program)
