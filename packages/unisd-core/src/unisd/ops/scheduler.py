"""Running a sweep's jobs: one subprocess per device slot, skip-if-done, OOM retry, interrupt safety.

* A job is **done** when its marker exists (``final/`` for training, ``results.json`` for an
  evaluation); done jobs are skipped, so rerunning a sweep resumes it. A training run that left a
  checkpoint is continued with ``--resume``; a run directory without any checkpoint (a crash before
  the first save) is *moved aside* to ``NAME.partial-N``, never deleted.
* Jobs start in phase order (cache, then train, then eval) as soon as their dependencies are done.
  A job whose dependency failed is marked ``blocked``.
* Among the ready jobs of a phase, those of the earliest seed go first (seed-major, as planned: a sweep
  stopped part-way has whole seeds); among those, kinds not timed yet first, in plan order, then the
  longest first, by the mean time of the finished jobs of their kind (the same method and grid point at
  other seeds; times of an earlier, interrupted sweep count too, read from ``sweep_state.json``). Two
  slots then end together instead of one idling while the other runs a long job that happened to come
  last.
* A failed attempt is appended, with its command and log tail, to ``failed_jobs.md``. A training job
  whose log shows out-of-memory is retried once with half the micro-batch and twice the gradient
  accumulation: the loss is normalised over the whole optimiser step, so the update is the same.
* Ctrl-C or SIGTERM terminates the children (SIGTERM to each job's process group, then SIGKILL),
  writes ``sweep_state.json`` with status ``interrupted`` and raises KeyboardInterrupt.
* Checkpoints are removed only with ``cleanup=True``: then each finished run's ``checkpoints/`` is
  deleted once all its evaluations are done (``final/`` stays; it marks the run done).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import dump_config
from ..errors import UsageError
from ..io import atomic
from ..io.rundir import SWEEP_JOB_FILE
from ..io.signals import StopRequest
from ..parallel import threads
from .sweep import PHASES, Job, train_argv

OOM_PATTERN = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)
STATE_FILE = "sweep_state.json"
FAILED_FILE = "failed_jobs.md"
TERMINATE_GRACE_S = 30.0  # time for `unisd train` to save a checkpoint on SIGTERM


def parse_devices(text: str | None) -> list[str]:
    """``cpu`` or ``0,1,...`` (``cpu,cpu`` gives two CPU slots; ``0+1,2+3`` two slots of two GPUs, whose
    training jobs run one process per GPU). None: every visible GPU, else one CPU slot."""
    if text is None:
        try:
            import torch

            count = torch.cuda.device_count()
        except Exception:  # no usable torch/CUDA: CPU
            count = 0
        return [str(i) for i in range(count)] or ["cpu"]
    slots = [part.strip() for part in text.split(",") if part.strip()]
    for slot in slots:
        if slot != "cpu" and not all(part.isdigit() for part in slot.split("+")):
            raise UsageError(f"--devices {text}: expected 'cpu' or GPU indices like 0,1,2 (0+1: one job on two GPUs)")
    if not slots:
        raise UsageError("--devices is empty; give 'cpu' or GPU indices like 0,1")
    return slots


def slot_gpus(slot: str) -> list[str]:
    """The GPU indices of a slot ('0+1' → ['0', '1']; 'cpu' → [])."""
    return [] if slot == "cpu" else slot.split("+")


def slot_env(slot: str, index: int, slots: int = 1, base_port: int = 29500) -> dict[str, str]:
    """The environment of a job on one slot of ``slots``: only its GPUs visible (none for 'cpu'), its own
    port, and its share of the CPU cores (jobs side by side must not each take every core)."""
    env = threads.share_threads(os.environ, slots)
    gpus = slot_gpus(slot)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env["MASTER_PORT"] = str(base_port + (int(gpus[0]) if gpus else index))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def shell_command(python: list[str], job: Job, slot: str | None = None) -> str:
    """The job as one copy-pasteable shell line."""
    import shlex

    prefix = f"CUDA_VISIBLE_DEVICES={','.join(slot_gpus(slot))} " if slot is not None else ""
    return prefix + " ".join(shlex.quote(p) for p in [*python, *slot_argv(job, slot)])


def slot_argv(job: Job, slot: str | None) -> list[str]:
    """The job's arguments on a slot: a training job on a slot of several GPUs runs one process per GPU."""
    gpus = slot_gpus(slot) if slot is not None else []
    if job.phase == "train" and len(gpus) > 1:
        return [*job.argv, "--num-processes", str(len(gpus))]
    return list(job.argv)


@dataclass
class JobStatus:
    status: str = "pending"  # pending | skipped | running | done | failed | blocked | interrupted | no-eval
    attempts: int = 0
    exit_code: int | None = None
    log: str | None = None
    note: str | None = None
    seconds: float | None = None


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    slot: str
    index: int
    log: Path
    began: float
    handle: Any


@dataclass
class SweepRunner:
    """Run ``jobs`` on ``slots``; ``python`` is the interpreter command (tests put a fake there)."""

    jobs: list[Job]
    root: Path
    slots: list[str]
    python: list[str] = field(default_factory=lambda: [sys.executable])
    echo: Callable[[str], None] = print
    eval_available: bool = True
    cleanup: bool = False
    poll_s: float = 0.2
    statuses: dict[str, JobStatus] = field(default_factory=dict)
    timings: dict[str, list[float]] = field(default_factory=dict)  # job kind → seconds of its finished jobs

    def run(self) -> dict[str, JobStatus]:
        """Run every job not done yet; returns each job's status. Raises KeyboardInterrupt when interrupted."""
        self.root.mkdir(parents=True, exist_ok=True)
        earlier = self._earlier_seconds()
        self.timings = {}
        for job in self.jobs:
            if job.id in earlier:
                self.timings.setdefault(job_kind(job), []).append(earlier[job.id])
        self.statuses = {j.id: JobStatus() for j in self.jobs}
        self._skip_unneeded(earlier)
        running: dict[str, _Running] = {}
        free = list(enumerate(self.slots))
        stop = StopRequest()  # Ctrl-C/SIGTERM set a flag; the loop stops at its next check
        self._write_state("running")
        try:
            self._run_jobs(running, free, stop)
        except KeyboardInterrupt:
            self._terminate(running)
            self._write_state("interrupted")
            self.echo(f"Interrupted. State written to {self.root / STATE_FILE}; rerun the same command to resume.")
            raise
        finally:
            stop.restore()
        if self.cleanup:
            self._cleanup()
        failed = any(s.status in ("failed", "blocked") for s in self.statuses.values())
        self._write_state("failed" if failed else "finished")
        return self.statuses

    def _skip_unneeded(self, earlier: dict[str, float]) -> None:
        """Mark the jobs that will not run: those whose outputs exist (keeping their earlier time), and
        evaluations without `unisd eval`."""
        for job in self.jobs:
            if job.marker.exists():
                self._set(job, "skipped", note=f"{job.marker.name} exists", seconds=earlier.get(job.id))
            elif job.phase == "eval" and not self.eval_available:
                self._set(job, "no-eval", note="`unisd eval` is not installed; evaluation skipped")
        skipped = sum(s.status == "skipped" for s in self.statuses.values())
        if skipped:
            self.echo(f"Skipping {skipped} job(s) whose outputs exist.")
        if any(s.status == "no-eval" for s in self.statuses.values()):
            self.echo("Note: the `unisd eval` command is not available; eval jobs are skipped.")

    def _run_jobs(self, running: dict[str, _Running], free: list[tuple[int, str]], stop: StopRequest) -> None:
        """Start ready jobs on free slots and collect finished ones until none is left. ``running`` and
        ``free`` are updated in place, so that on an interrupt :meth:`run` terminates what is running."""
        while True:
            if stop.signal:
                raise KeyboardInterrupt
            self._block_orphans()
            while free and (job := self._next_ready()) is not None:
                index, slot = free.pop(0)
                running[job.id] = self._launch(job, slot, index)
            if not running:
                break
            time.sleep(self.poll_s)
            for job_id in list(running):
                r = running[job_id]
                if r.proc.poll() is None:
                    continue
                del running[job_id]
                free.append((r.index, r.slot))
                self._finish(r)
            free.sort()

    # -- scheduling ---------------------------------------------------------------------------

    def _next_ready(self) -> Job | None:
        for phase in PHASES:
            ready = [job for job in self.jobs if job.phase == phase and self.statuses[job.id].status == "pending"
                     and all(self.statuses[d].status in ("done", "skipped") for d in job.depends if d in self.statuses)]
            if ready:
                rank = self._seed_ranks()
                first_seed = min(rank(job) for job in ready)
                ready = [job for job in ready if rank(job) == first_seed]
                untimed = [job for job in ready if not self.timings.get(job_kind(job))]
                if untimed:
                    return untimed[0]
                # max() keeps the first of equal ones: plan order breaks ties
                return max(ready, key=lambda job: _mean(self.timings[job_kind(job)]))
        return None

    def _seed_ranks(self) -> Callable[[Job], int]:
        """A job's seed's position among the sweep's seeds, in plan order (0 without seeds)."""
        seeds = dict.fromkeys(j.meta.get("seed") for j in self.jobs if j.meta.get("seed") is not None)
        ranks = {seed: rank for rank, seed in enumerate(seeds)}
        return lambda job: ranks.get(job.meta.get("seed"), 0)

    def _earlier_seconds(self) -> dict[str, float]:
        """How long each job an earlier run of this sweep finished took (from its ``sweep_state.json``)."""
        try:
            earlier = json.loads((self.root / STATE_FILE).read_text(encoding="utf-8")).get("jobs", {})
        except (OSError, ValueError, AttributeError):
            return {}
        seconds = {}
        for job in self.jobs:
            record = earlier.get(job.id)
            if (isinstance(record, dict) and record.get("status") in ("done", "skipped")
                    and isinstance(record.get("seconds"), (int, float))):
                seconds[job.id] = float(record["seconds"])
        return seconds

    def _block_orphans(self) -> None:
        changed = True
        while changed:  # blocked jobs block their own dependents in turn
            changed = False
            for job in self.jobs:
                if self.statuses[job.id].status != "pending":
                    continue
                bad = [d for d in job.depends if d in self.statuses
                       and self.statuses[d].status in ("failed", "blocked", "interrupted")]
                if bad and job.phase != "train":
                    self._set(job, "blocked", note=f"dependency {bad[0]} did not finish")
                    changed = True
                elif bad:
                    # A failed cache job is not fatal: training prepares the model itself, with a clear error.
                    job.depends = [d for d in job.depends if d not in bad]

    def _launch(self, job: Job, slot: str, index: int) -> _Running:
        status = self.statuses[job.id]
        status.attempts += 1
        if job.phase == "train":
            self._prepare_train(job)
        elif job.config is not None and job.config_path is not None:  # a base-evaluation cache job
            atomic.write_text(job.config_path, dump_config(job.config))
        safe = re.sub(r"[^A-Za-z0-9._+-]", "_", job.id)
        log = self.root / "logs" / (f"{safe}.log" if status.attempts == 1 else f"{safe}.retry{status.attempts - 1}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("w", encoding="utf-8")
        command = shell_command(self.python, job, slot)
        handle.write(f"# {command}\n")
        handle.flush()
        # A new session: Ctrl-C in the terminal reaches only us, and we stop each job's whole group.
        proc = subprocess.Popen([*self.python, *slot_argv(job, slot)], stdout=handle, stderr=subprocess.STDOUT,
                                env=slot_env(slot, index, len(self.slots)), start_new_session=True)
        self._set(job, "running", log=str(log))
        self.echo(f"[start] {job.phase} {job.label} on {slot} (log: {log})")
        return _Running(job, proc, slot, index, log, time.perf_counter(), handle)

    def _prepare_train(self, job: Job) -> None:
        from ..io.checkpoint import latest_checkpoint

        assert job.run_dir is not None and job.config is not None and job.config_path is not None
        run_dir = job.run_dir
        if run_dir.exists() and any(run_dir.iterdir()) and latest_checkpoint(run_dir) is None:
            aside = _free_name(run_dir, "partial")
            os.replace(run_dir, aside)
            self.echo(f"[note] {run_dir} had no checkpoint to resume from; moved it to {aside}")
        atomic.write_text(job.config_path, dump_config(job.config))
        # Written before training starts, so `unisd report` groups a running job with its method's other seeds.
        _write_job_info(job)
        job.argv = train_argv(job)

    def _finish(self, r: _Running) -> None:
        r.handle.close()
        job, code = r.job, r.proc.returncode
        status = self.statuses[job.id]
        status.exit_code, status.seconds = code, round(time.perf_counter() - r.began, 1)
        if code == 0 and job.phase == "cache":
            atomic.write_text(job.marker, time.strftime("%Y-%m-%d %H:%M:%S\n"))
        if code == 0 and job.marker.exists():
            self.timings.setdefault(job_kind(job), []).append(status.seconds)
            self._set(job, "done")
            self.echo(f"[done] {job.phase} {job.label} ({status.seconds} s)")
            if job.run_dir is not None and (job.phase == "train" or not (job.run_dir / "config.toml").exists()):
                _write_job_info(job)  # an untrained model's folder has no config.toml to say what it is
            return
        reason = f"exit code {code}" if code != 0 else f"exit code 0 but {job.marker} was not written"
        tail = _tail(r.log)
        retry = job.phase == "train" and status.attempts == 1 and OOM_PATTERN.search(tail) is not None
        note = None
        if retry:
            assert job.config is not None
            if job.config.batch_size > 1 and job.config.batch_size % 2 == 0:  # halving keeps batch × accum
                old = (job.config.batch_size, job.config.grad_accum)
                job.config = dataclasses.replace(job.config, batch_size=max(1, old[0] // 2), grad_accum=old[1] * 2)
                note = (f"out of memory: retrying once with batch_size {old[0]}→{job.config.batch_size}, "
                        f"grad_accum {old[1]}→{job.config.grad_accum} (same update)")
                if job.run_dir is not None and job.run_dir.exists():
                    # --resume cannot change the batch size, so the OOM attempt's directory is kept aside.
                    aside = _free_name(job.run_dir, "oom")
                    os.replace(job.run_dir, aside)
                    note += f"; the failed attempt's directory was moved to {aside}"
            elif job.config.batch_size > 1:
                retry, note = False, (f"out of memory at batch_size {job.config.batch_size}, which cannot be halved "
                                      "without changing the update; give the method an even batch_size, or "
                                      "reduce max_new_tokens/max_prompt_tokens")
            else:
                retry, note = False, "out of memory at batch_size 1; reduce max_new_tokens/max_prompt_tokens"
        self._log_failure(job, reason, r.log, tail, note)
        if retry:
            self._set(job, "pending", note=note)
            self.echo(f"[retry] {job.phase} {job.label}: {note}")
        else:
            self._set(job, "failed", note=f"{reason}{'; ' + note if note else ''}")
            self.echo(f"[FAILED] {job.phase} {job.label}: {reason} (log: {r.log})")

    def _terminate(self, running: dict[str, _Running]) -> None:
        for r in running.values():
            _signal_group(r.proc, signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for r in running.values():
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(r.proc, signal.SIGKILL)
                r.proc.wait()
            r.handle.close()
            self._set(r.job, "interrupted", note="stopped by Ctrl-C/SIGTERM; rerun to resume")

    def _cleanup(self) -> None:
        for job in self.jobs:
            if job.phase != "train" or job.run_dir is None or not job.marker.exists():
                continue
            evals = [j for j in self.jobs if j.phase == "eval" and job.id in j.depends]
            if all(self.statuses[e.id].status in ("done", "skipped") for e in evals):
                ckpts = job.run_dir / "checkpoints"
                if ckpts.is_dir():
                    shutil.rmtree(ckpts)
                    self.echo(f"[cleanup] removed {ckpts}")

    # -- bookkeeping --------------------------------------------------------------------------

    def _set(self, job: Job, status: str, **changes: Any) -> None:
        st = self.statuses[job.id]
        st.status = status
        for key, value in changes.items():
            setattr(st, key, value)
        if self.root.exists():
            self._write_state("running")

    def _write_state(self, overall: str) -> None:
        data = {
            "status": overall,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "jobs": {
                job.id: {"phase": job.phase, "label": job.label, "command": shell_command(self.python, job),
                         **dataclasses.asdict(self.statuses[job.id])}
                for job in self.jobs
            },
        }
        atomic.write_text(self.root / STATE_FILE, json.dumps(data, indent=2) + "\n")

    def _log_failure(self, job: Job, reason: str, log: Path, tail: str, note: str | None) -> None:
        path = self.root / FAILED_FILE
        lines = [] if path.exists() else ["# Failed jobs\n\nEach failed attempt, with the command to rerun it.\n"]
        lines += [
            f"## {time.strftime('%Y-%m-%d %H:%M:%S')} — {job.id} ({reason})\n",
            "```sh", shell_command(self.python, job), "```\n",
            f"log: `{log}`" + (f"  \n{note}" if note else "") + "\n",
            "```", "\n".join(tail.splitlines()[-20:]), "```\n",
        ]
        with path.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


def job_kind(job: Job) -> str:
    """What a job's time is predicted from: the same phase and plan entry apart from the seed."""
    same = {k: v for k, v in job.meta.items() if k != "seed"}
    return job.phase + ":" + json.dumps(same, sort_keys=True, default=str)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _free_name(path: Path, tag: str) -> Path:
    n = 1
    while path.with_name(f"{path.name}.{tag}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{tag}-{n}")


def _tail(path: Path, size: int = 64_000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _write_job_info(job: Job) -> None:
    """``sweep_job.json`` in the run directory: which method and grid point it was (for `unisd report`)."""
    assert job.run_dir is not None
    info = {k: v for k, v in job.meta.items()}
    atomic.write_text(job.run_dir / SWEEP_JOB_FILE, json.dumps(info, indent=2, default=str) + "\n")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the job's own process group (start_new_session=True)
    except (ProcessLookupError, PermissionError):
        pass
