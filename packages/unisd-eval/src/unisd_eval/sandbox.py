"""Run untrusted Python programs (model-generated code) against trusted tests, in separate, limited processes.

Never ``exec`` generated code in our own process (the research code did, §7.22). A :class:`Program` is
the untrusted ``solution`` plus the task's trusted ``setup`` and ``tests``. Each program gets a *judge*
process (:mod:`unisd_eval.sandbox_judge`) that forks a *solution process*: the solution runs there and
only answers the judge's calls; the tests run in the judge, which alone can write the report. So no
descriptor, monkey-patch, exit handler or early exit of the solution can turn a failing test into a
pass. Besides, each program gets:

- a new session (process group), killed as a whole afterwards, and a wall-clock timeout;
- rlimits on CPU time, address space, processes/threads, file size and open files;
- a fresh working directory, removed afterwards, and an environment built from scratch (nothing
  inherited: no tokens or keys of the caller);
- as root, a dedicated unprivileged uid per concurrent slot (claimed with a lock file, so parallel runs
  and other processes never share one): it cannot write or delete the caller's files, read other
  processes' environments, or signal the caller, and ``RLIMIT_NPROC`` — which the kernel does not
  enforce for root — really bounds a fork bomb; and namespaces of its own: no network, private SysV
  IPC, a PID namespace (nothing outlives the program), and a size-capped tmpfs as its working
  directory, ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock``. After the run every process, IPC
  object and top-level file of that uid in the shared directories is removed (needed only where the
  namespaces were refused).

Not root: the program runs under the caller's uid, without namespaces. Limits, timeout, the separate
judge, temp dir and clean environment still apply, but absolute-path writes into directories the caller
can write are *not* prevented, the network is open, and the process limit is the caller's current
process count plus ``max_processes``. :meth:`Sandbox.describe` says what held.

Verdicts: ``passed`` (the judge ran every test to its end), ``failed`` (an exception, an assertion, an
early ``sys.exit``/``os._exit``, or a solution that broke its channel), ``timeout`` (wall clock or CPU
time), ``resource-limit`` (memory, file size, disk, processes or threads) and ``crashed`` (killed by a
signal, or the sandbox itself broke).
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
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
    disk_bytes: int = 64 << 20  # all files together (working dir, /tmp, /dev/shm), where namespaces allow


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


LOCK_DIR_NAME = "unisd-sandbox-locks"


class SandboxError(RuntimeError):
    """The sandbox cannot run programs safely here (e.g. its lock directory is not ours)."""


def _open_lock_dir() -> int:
    """A descriptor of our lock directory: created 0700, never a symlink, owned by us, writable by no one else.

    A directory that another local user created first (and could have filled with symlinks named like
    our lock files) is refused, not used.
    """
    path = os.path.join(tempfile.gettempdir(), LOCK_DIR_NAME)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"{path}: cannot open the sandbox lock directory ({exc.strerror}); it must be a "
                           "real directory, not a symlink. Remove it, or set TMPDIR to another directory") from None
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = f"is owned by uid {info.st_uid}, not by us (uid {os.geteuid()})"
    elif info.st_mode & 0o022:
        problem = f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    if problem:
        os.close(fd)
        raise SandboxError(f"{path} {problem}; refusing to use it for sandbox locks. Remove it, or set "
                           "TMPDIR to a directory only you can write")
    return fd


def _open_lock_file(dir_fd: int, name: str) -> int:
    """Open (never truncate, never follow a symlink) one lock file inside the verified directory."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise SandboxError(f"sandbox lock file {name} is not a regular file of ours; remove {LOCK_DIR_NAME}")
    return fd


@contextlib.contextmanager
def _claim_uid() -> Iterator[int]:
    """Hold an exclusive lock on one sandbox uid for the duration of a run (across processes too)."""
    dir_fd = _open_lock_dir()
    try:
        start = secrets.randbelow(UID_SLOTS)
        for attempt in range(200):
            for i in range(UID_SLOTS):
                uid = UID_BASE + (start + i) % UID_SLOTS
                if _uid_has_account(uid):
                    continue  # a real account: never run as it, never kill its processes
                fd = _open_lock_file(dir_fd, f"{uid}.lock")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                try:
                    _clean_uid(uid)  # leftovers of a run that died before its cleanup
                    yield uid
                finally:
                    _clean_uid(uid)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                return
            time.sleep(0.05 * (attempt + 1))
    finally:
        os.close(dir_fd)
    raise SandboxError("no free sandbox uid slot (too many concurrent sandboxes)")


def _clean_uid(uid: int) -> None:
    """Everything a sandbox uid may have left: processes, SysV IPC objects, files in shared directories."""
    _kill_uid(uid)
    _remove_uid_ipc(uid)
    _remove_uid_files(uid)


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


WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
SYSV_IPC = (("shm", "shmctl"), ("sem", "semctl"), ("msg", "msgctl"))
IPC_RMID = 0


def _remove_uid_ipc(uid: int) -> None:
    """Remove the SysV shared memory, semaphores and message queues a sandbox uid owns or created.

    Needed only where the run had no IPC namespace of its own (which takes them with it).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return
    for kind, remover in SYSV_IPC:
        try:
            with open(f"/proc/sysvipc/{kind}", encoding="ascii") as fh:
                header, *rows = fh.read().splitlines()
        except OSError:
            continue
        columns = header.split()
        for row in rows:
            fields = dict(zip(columns, row.split(), strict=False))
            if str(uid) not in (fields.get("uid"), fields.get("cuid")):
                continue
            with contextlib.suppress(ValueError, AttributeError):
                ident = int(fields["shmid" if kind == "shm" else "semid" if kind == "sem" else "msqid"])
                if kind == "sem":
                    libc.semctl(ident, 0, IPC_RMID, None)
                else:
                    getattr(libc, remover)(ident, IPC_RMID, None)


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


@dataclass(frozen=True)
class Program:
    """What to run: the untrusted ``solution``, then the trusted ``setup`` and ``tests`` in the judge.

    ``setup`` (imports, helper definitions of the benchmark) runs in both processes, after the solution,
    so the solution sees what it would have seen in one file. ``tests`` runs only in the judge, calling the
    solution's functions through handles. ``tests=None`` runs the solution alone; such a run is judged on
    the solution process's own word (``details["judged"] == "self-reported"``), which is fine for trusted
    programs and smoke tests but not for scoring: code tasks always give tests. ``entry_point`` is the
    function under test, the one solution name allowed to shadow a builtin in the tests.
    """

    solution: str
    setup: str = ""
    tests: str | None = None
    entry_point: str | None = None


_ACTIVE: dict[int, subprocess.Popen] = {}  # judge pid -> process, for a stop in the middle of run_many
_ACTIVE_LOCK = threading.Lock()
STALE_PREFIXES = ("unisd-sbx-io-", "unisd-sbx-")


def stop_all() -> None:
    """Kill every running sandbox of this process (their own cleanup then removes their directories)."""
    with _ACTIVE_LOCK:
        procs = list(_ACTIVE.values())
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_directories() -> int:
    """Remove sandbox directories left by unisd processes that were killed (SIGKILL) mid-run.

    Each directory's name carries the pid that made it; only ours (same owner) whose maker is gone go.
    """
    removed = 0
    folder = tempfile.gettempdir()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        prefix = next((p for p in STALE_PREFIXES if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        maker = entry.name[len(prefix):].split("-", 1)[0]
        try:
            owner = entry.stat(follow_symlinks=False).st_uid
            ours = owner == os.geteuid() or (os.geteuid() == 0 and UID_BASE <= owner < UID_BASE + UID_SLOTS)
            if not maker.isdigit() or _pid_alive(int(maker)) or not ours:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def _stopped_cleanly() -> Iterator[None]:
    """While programs run: SIGTERM (and Ctrl-C) kill the sandboxes first, then end this process.

    Installed only from the main thread (where Python delivers signals); the previous handler returns
    afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        stop_all()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException:
        stop_all()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _judge_source() -> str:
    return Path(__file__).with_name("sandbox_judge.py").read_text(encoding="utf-8")


class Sandbox:
    """Runs programs under :class:`Limits`; ``run_many`` runs several at once (bounded)."""

    def __init__(self, limits: Limits | None = None, workers: int | None = None, python: str | None = None,
                 drop_privileges: bool | None = None, isolate: bool = True):
        self.limits = limits or Limits()
        self.workers = workers or max(1, min(4, (os.cpu_count() or 1)))
        self.python = python
        self.drop_privileges = privilege_drop_available() if drop_privileges is None else drop_privileges
        self.isolate = isolate
        if self.drop_privileges and not privilege_drop_available():
            raise SandboxError("drop_privileges=True needs root (to switch to an unprivileged uid)")
        self.isolation: dict | None = None  # what the last run could isolate (set by the judge's report)

    def describe(self) -> dict:
        """How programs are contained here, for results files: user, namespaces, what is not isolated."""
        if self.isolation is None:
            self.run(Program("pass"))
        isolation = dict(self.isolation or {})
        isolation["user"] = "a dedicated unprivileged uid" if self.drop_privileges else "the caller's uid"
        return isolation

    def run_many(self, programs: Sequence[str | Program]) -> list[Result]:
        """Run every program (in parallel, at most ``workers`` at a time); results in input order."""
        if not programs:
            return []
        remove_stale_directories()
        with _stopped_cleanly(), ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: str | Program) -> Result:
        """Run one program to completion, timeout or limit, and classify what happened."""
        if isinstance(program, str):
            program = Program(program)
        if self.drop_privileges:
            with _claim_uid() as uid:
                return self._run(program, uid)
        return self._run(program, None)

    def _spec(self, uid: int | None, python: str) -> dict:
        limits = self.limits
        nproc = limits.max_processes if uid is not None else _count_own_tasks() + limits.max_processes
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
        return {
            "limits": {"cpu": limits.cpu if limits.cpu is not None else max(1, int(limits.timeout + 0.999)),
                       "as": limits.memory_bytes, "nproc": nproc, "fsize": limits.file_bytes,
                       "nofile": limits.open_files, "core": 0},
            "uid": uid, "isolate": self.isolate, "disk_bytes": limits.disk_bytes, "keep": [prefix],
        }

    def _run(self, program: Program, uid: int | None) -> Result:
        python = _interpreter_for(uid, self.python)
        token = secrets.token_hex(16)
        maker = os.getpid()
        private = Path(tempfile.mkdtemp(prefix=f"unisd-sbx-io-{maker}-"))  # 0700, ours: job, output, report
        work = Path(tempfile.mkdtemp(prefix=f"unisd-sbx-{maker}-"))  # the program's working directory
        try:
            job = {"solution": program.solution, "setup": program.setup, "tests": program.tests,
                   "entry_point": program.entry_point}
            # ASCII JSON: a completion with a lone surrogate or odd bytes still reaches the sandbox intact
            # (where compiling it fails as that item's verdict) instead of failing here.
            (private / "job.json").write_text(json.dumps(job, ensure_ascii=True), encoding="ascii")
            if uid is not None:
                os.chown(work, uid, uid)
            spec = self._spec(uid, python)
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                   "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
            return self._execute(python, spec, private, work, env, token)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(private, ignore_errors=True)

    def _execute(self, python: str, spec: dict, private: Path, work: Path, env: dict, token: str) -> Result:
        limits = self.limits
        out_path, err_path, res_path = private / "stdout", private / "stderr", private / "result"
        started = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err, open(res_path, "wb") as res:
            try:
                # The judge starts as the caller (root: it sets up namespaces, then drops to the uid itself).
                proc = subprocess.Popen(
                    [python, "-I", "-c", _judge_source(), json.dumps(spec), str(private / "job.json"), str(res.fileno())],
                    stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env, pass_fds=(res.fileno(),),
                    start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                return Result(CRASHED, f"could not start the sandbox: {exc}")
            with _ACTIVE_LOCK:
                _ACTIVE[proc.pid] = proc
            timed_out = False
            try:
                proc.communicate(input=(token + "\n").encode(), timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: forks included
                if spec["uid"] is not None:
                    _kill_uid(spec["uid"])
                proc.wait()
                with _ACTIVE_LOCK:
                    _ACTIVE.pop(proc.pid, None)
        duration = time.perf_counter() - started
        stdout = _read_capped(out_path, limits.max_output)
        stderr = _read_capped(err_path, limits.max_output)
        report = _read_report(res_path, token)
        if report is not None and isinstance(report.get("isolation"), dict):
            self.isolation = report["isolation"]
        result = _classify(report, timed_out, proc.returncode, limits)
        result.stdout, result.stderr, result.duration = stdout, stderr, duration
        if result.verdict == FAILED and result.error and stderr:
            result.error = f"{result.error}\n{_tail(stderr, 400)}"
        return result


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
        report = json.loads(path.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    # Only the judge had the token (it read it after forking the solution process) and the descriptor.
    if not isinstance(report, dict) or report.get("token") != token:
        return None
    return report


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _classify(report: dict | None, timed_out: bool, returncode: int | None, limits: Limits) -> Result:
    """The verdict: a pass only from the judge's own report; the solution's word only labels failures."""
    if timed_out:
        return Result(TIMEOUT, f"wall-clock timeout after {limits.timeout:g} s", exit_code=returncode)
    if report is None:
        why = f"exit code {returncode}" if returncode is None or returncode >= 0 else _signal_name(-returncode)
        return Result(CRASHED, f"the sandbox judge ended without a report ({why})", exit_code=returncode)
    details = {k: report[k] for k in ("stage", "judged", "lost") if report.get(k) is not None}
    status = report.get("solution_status")
    if report.get("passed") is True:
        return Result(PASSED, None, exit_code=0, details=details)
    if isinstance(status, int) and status < 0:  # the solution process died from a signal
        return _classify_signal(-status, limits, details)
    error = report.get("error")
    if isinstance(error, dict):
        return _classify_error(error, status, limits, details)
    code = status if isinstance(status, int) else None
    lost = str(report.get("lost") or "the program stopped")
    if code is not None:
        return Result(FAILED, f"the program exited (code {code}) before it finished", exit_code=code, details=details)
    return Result(FAILED, lost, exit_code=code, details=details)


def _classify_signal(sig: int, limits: Limits, details: dict) -> Result:
    code = -sig
    if sig == signal.SIGXCPU:
        return Result(TIMEOUT, f"CPU time limit ({limits.cpu or int(limits.timeout + 0.999)} s)", exit_code=code, details=details)
    if sig == signal.SIGXFSZ:
        return Result(RESOURCE_LIMIT, f"file size limit ({limits.file_bytes} bytes)", exit_code=code, details=details)
    if sig == signal.SIGKILL:
        return Result(CRASHED, "killed (SIGKILL)", exit_code=code, details=details)
    return Result(CRASHED, f"killed by {_signal_name(sig)}", exit_code=code, details=details)


def _classify_error(error: dict, status: int | None, limits: Limits, details: dict) -> Result:
    exc, err_no, message = str(error.get("exc")), error.get("errno"), str(error.get("message") or "")
    details = dict(details, origin=error.get("origin"))
    text = f"{exc}: {message}" if message else exc
    if exc == "SystemExit":
        return Result(FAILED, f"the program exited (code {message or 0}) before it finished", exit_code=status, details=details)
    if exc == "MemoryError":
        return Result(RESOURCE_LIMIT, f"memory limit ({limits.memory_bytes} bytes): {text}", exit_code=status, details=details)
    if err_no in _RESOURCE_ERRNOS or exc == "BlockingIOError":
        return Result(RESOURCE_LIMIT, f"resource limit: {text}", exit_code=status, details=details)
    if exc == "RuntimeError" and "can't start new thread" in message:
        return Result(RESOURCE_LIMIT, f"process/thread limit ({limits.max_processes}): {text}", exit_code=status, details=details)
    return Result(FAILED, text, exit_code=status, details=details)


def run_program(program: str | Program, limits: Limits | None = None) -> Result:
    """Run one program with default settings (a convenience around :class:`Sandbox`)."""
    return Sandbox(limits).run(program)
