"""One writer per run directory, and the directory's state before a run starts or resumes.

``unisd train`` holds an exclusive lock on ``RUN/run.lock`` (``fcntl.flock``) from before it writes
anything until it ends; the file names the holder (pid, host, start time). The kernel releases the lock
when its process dies however it dies, so a lock file that exists but is not locked was left by a
process that is gone: the next run takes it over (with a note). A second ``unisd train`` on a locked
directory fails at once with the holder's name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .checkpoint import checkpoints_newest_first

LOCK_FILE = "run.lock"
# What a run writes into its directory (and sweep_job.json, which `unisd sweep` writes before it starts the
# job); a directory holding only these (and no checkpoint) is a run that stopped before its first
# checkpoint, which may be started over.
SWEEP_JOB_FILE = "sweep_job.json"  # written by `unisd sweep` (ops/scheduler.py) before the run starts
RUN_ENTRIES = {LOCK_FILE, "config.toml", "metrics.jsonl", "checkpoints", "eval", SWEEP_JOB_FILE}
# Temporary siblings written by unisd.io.atomic (".NAME.tmp-XXXX") and the previous version it moves aside
# during a replace (".NAME.old-PID").
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[^/]+")


class RunLockedError(UsageError):
    """Another process holds the run directory's lock."""


@dataclass
class RunLock:
    """A held lock on a run directory; ``release()`` removes the lock file and unlocks it."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        # Remove the file while still holding it (only if it is still ours), so a lock file that is
        # found later always means its holder died.
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def acquire_lock(run_dir: Path, note: Callable[[str], None]) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process, or raise RunLockedError naming the holder."""
    _make_directory(run_dir)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunLockedError(f"{run_dir} is in use by another unisd train ({holder}); wait for it to end, or "
                                 "choose another --output") from None
        except OSError as exc:  # e.g. a network file system without lock support
            os.close(fd)
            raise UsageError(f"{path}: cannot lock the run directory ({exc.strerror or exc}); choose a directory "
                             "on a file system that supports flock") from None
        # The holder may have removed the file (at its end) between our open and our lock: then we hold
        # a file nobody else will see. Try again on the file that is there now.
        if not _same_file(fd, path):
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous:
            note(f"Taking over {path}: its holder ({_describe(previous)}) is no longer running.")
        _write_holder(fd)
        return RunLock(path, fd)


def _make_directory(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--output {run_dir} is a file, not a directory; choose a directory for the run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {run_dir}: cannot create the directory ({exc.strerror or exc})") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int) -> dict[str, object]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except ValueError:
        holder = {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
    os.fsync(fd)


def _describe(holder: dict[str, object]) -> str:
    if not holder.get("pid"):
        return "holder unknown"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}"


def remove_leftovers(run_dir: Path, note: Callable[[str], None]) -> None:
    """Remove what a kill during an atomic write left behind (under the lock: nobody else writes here).

    A temporary ``.NAME.tmp-*`` is an unfinished write and goes. A ``.NAME.old-*`` is the previous version
    of NAME moved aside during a replace: it goes when NAME exists, else it is put back.
    """
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "eval"):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            m = _LEFTOVER.fullmatch(entry.name)
            if m is None:
                continue
            target = folder / m.group("name")
            if m.group("kind") == "old" and not target.exists():
                os.replace(entry, target)
                note(f"Restored {target} (a kill interrupted its replacement).")
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            note(f"Removed {entry} (left by an interrupted save).")


def prepare_new_run(run_dir: Path, note: Callable[[str], None]) -> None:
    """Check that a fresh run may write into ``run_dir`` (locked by us): empty, or a run that stopped
    before its first checkpoint, whose files are cleared so it starts over."""
    entries = sorted(e.name for e in run_dir.iterdir() if e.name != LOCK_FILE)
    if not entries:
        return
    if checkpoints_newest_first(run_dir):
        raise UsageError(f"--output {run_dir} holds a run with checkpoints; continue it with --resume {run_dir}, "
                         "or choose another directory")
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if foreign:
        raise UsageError(f"--output {run_dir} exists and is not empty ({', '.join(foreign[:3])}); choose another "
                         f"directory or use --resume {run_dir}")
    if set(entries) - {SWEEP_JOB_FILE}:  # a sweep writes which job this is before starting it: not a run yet
        note(f"{run_dir} holds a run that stopped before its first checkpoint: starting it over.")
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def remove_if_unused(run_dir: Path, created: bool) -> None:
    """After a run failed before writing anything: remove the directory it created (now empty)."""
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()
