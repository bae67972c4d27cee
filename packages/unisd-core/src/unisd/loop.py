"""The on-policy self-distillation loop. Read it top to bottom.

One optimiser step:
  1. take ``batch_size × grad_accum`` examples from the data stream;
  2. the student generates one completion per example from the *student* prompt;
  3. the teacher (no grad) scores each completion under the teacher prompt — the problem plus the
     reference — and under any extra contexts the selected components ask for;
  4. per micro-batch, the student scores the same completion under its own prompt (with grad); the
     per-token divergence goes through the components (clip → weights → extra terms);
  5. the summed loss is divided by the number of loss tokens (or, under ``loss_reduction =
     "sequence"``, each sequence by its own and the sum by the number of sequences) of the *whole*
     step, so the update does not depend on how the step is split into micro-batches;
  6. clip the gradient norm, AdamW, cosine schedule; components' ``on_step_end``; metrics; checkpoint.

``run.py`` builds the run (model, data, components) and ``step.py`` computes steps 3 to 5; this module
holds the session around them: the run directory, the optimiser, records, checkpoints and the evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .activity import ActivityWatch, inert_warnings
from .components import call_each, implements
from .config import RunConfig, dump_config
from .data.tasks import Example, Task
from .errors import TrainingDiverged, TrainingInterrupted, UsageError
from .evaluation.evaluate import privileged_gap
from .evaluation.leakage import count_leaks
from .io import atomic, rundir
from .io.checkpoint import (
    choose_checkpoint,
    gather_component_states,
    load_checkpoint,
    resume_target,
    rng_state,
    save_checkpoint,
    save_weights,
)
from .io.reporting import Reporter, startup_summary
from .io.runlog import MetricsLog
from .io.signals import StopRequest
from .io.trackers import Trackers, check_trackers
from .model.rollout import Completion, SamplingParams
from .parallel import distributed, sharding
from .plugins import UnisdPluginManager
from .run import DataStream, Run, build_run
from .step import distill_step

T = TypeVar("T")


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    config: RunConfig,
    pm: UnisdPluginManager,
    reporter: Reporter | None = None,
    resume: str | Path | None = None,
) -> Path:
    """Run (or resume) training; returns the run directory.

    Under a multi-process launcher every process runs this function on its share of each global batch;
    only the main process writes metrics, checkpoints and the final weights.
    """
    env = distributed.init_from_env()
    reporter = (reporter or Reporter()) if env.is_main else Reporter()
    config.validate()  # values known now fail before the run directory is touched
    check_trackers(config.report_to, pm.registries.trackers)  # e.g. a missing wandb package, before any work
    chosen = None
    if resume is not None:
        out, chosen = resume_target(resume)
    else:
        out = Path(config.output or f"runs/{config.task or Path(config.data or 'data').stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    config.output = str(out)
    created = not out.exists()
    try:
        claim = _on_main(lambda: _claim_run_directory(out, resume is not None, chosen, reporter))
    except BaseException:
        if env.is_main:
            rundir.remove_if_unused(out, created)
        raise
    lock, resume_ckpt = claim if claim is not None else (None, None)
    # every process resumes from the checkpoint the main process chose
    resume_path = distributed.gather_objects(str(resume_ckpt) if resume_ckpt else None)[0]
    try:
        return _train(config, pm, reporter, out, Path(resume_path) if resume_path else None, resume is not None)
    finally:
        if lock is not None:
            lock.release()
            rundir.remove_if_unused(out, created)  # a run that failed before writing anything leaves nothing


def _on_main(work: Callable[[], T]) -> T | None:
    """``work()`` on the main process; under a multi-process launch its error is raised on every process."""
    if not distributed.current().active:
        return work()
    return distributed.on_main_only(work, UsageError)


def _claim_run_directory(
    out: Path, resuming: bool, chosen: Path | None, reporter: Reporter
) -> tuple[rundir.RunLock, Path | None]:
    """Lock the run directory before anything is written, clear what interrupted saves left, and check it:
    a new run needs it empty (or holding a run stopped before its first checkpoint); a resumed one gets
    its newest intact checkpoint (None: none was saved, so it starts from step 0)."""
    def warn(message: str) -> None:
        reporter.info(f"[yellow]{message}[/]")

    lock = rundir.acquire_lock(out, warn)
    try:
        rundir.remove_leftovers(out, reporter.info)
        if not resuming:
            rundir.prepare_new_run(out, reporter.info)
            return lock, None
        return lock, choose_checkpoint(out, chosen, warn)
    except BaseException:
        lock.release()
        raise


@dataclass
class Session:
    """What one training process holds from set-up to the final save (see ``_train``)."""

    run: Run
    pm: UnisdPluginManager
    reporter: Reporter
    out: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    backend: Any
    stream: DataStream
    metrics_log: MetricsLog
    trackers: Trackers
    trainable: list[torch.nn.Parameter]
    start: int  # the last step already done (0 for a new run)
    activity: ActivityWatch | None = None
    skipped_total: int = 0  # optimiser steps skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0
    began: float = 0.0  # perf_counter when the first step of this process started
    elapsed_before: float = 0.0  # training seconds of the run before a resume

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def env(self) -> distributed.DistEnv:
        return distributed.current()


@dataclass
class StepUpdate:
    """What the optimiser step did: whether it applied the update, the gradient norm, the learning rate."""

    finite: bool
    grad_norm: torch.Tensor
    lr: float


def _train(
    config: RunConfig, pm: UnisdPluginManager, reporter: Reporter, out: Path, resume_ckpt: Path | None, resuming: bool,
) -> Path:
    """The run itself, in a run directory this process has claimed (see ``train``): set-up, the held-out
    evaluation before, then per step take → generate → distil → optimiser step → record → maybe
    checkpoint, then the final weights and the evaluation after."""
    s = _start_session(config, pm, reporter, out, resume_ckpt, resuming)
    cfg = s.config
    gap_task = s.run.task if cfg.eval_before_after and s.run.task is not None else None
    if gap_task is not None and s.start == 0:
        _held_out(s, gap_task, "before")
    distributed.barrier()
    sampling = SamplingParams(cfg.temperature, cfg.top_p, s.run.max_new_tokens)
    s.began, s.elapsed_before = time.perf_counter(), _previous_elapsed(s.metrics_log) if s.env.is_main else 0.0
    _watch_activity(s)
    reporter.start(cfg.steps, s.start)
    stop = StopRequest()
    try:
        for step in range(s.start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            examples = _take(s)
            completions = s.backend.generate([s.run.student_ids(e) for e in examples], sampling)
            t_gen = time.perf_counter() - t0
            stats = distill_step(s.run, examples, completions)
            update = _optimiser_step(s, stats)
            _after_step(s, step, update)
            record = _step_record(s, step, examples, completions, stats, update, t0, t_gen)
            _publish(s, step, record)
            # Every process must stop at the same step, whichever of them received the signal.
            stopping = distributed.sum_scalar(1.0 if stop.signal else 0.0) > 0
            diverged = s.bad_in_a_row >= cfg.max_nonfinite_steps
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or stopping or diverged:
                _save_checkpoint(s, step)
            _raise_if_stopped(s, step, diverged, (stop.signal or "a signal to another process") if stopping else None)
    except BaseException:
        s.trackers.close()  # flush what the dashboards have before the error ends the run
        raise
    finally:
        stop.restore()
        reporter.stop()
        if hasattr(s.backend, "close"):
            s.backend.close()  # e.g. vLLM's engine and its memory, before the final save and evaluation
    _finish(s, gap_task)
    return out


def _start_session(
    config: RunConfig, pm: UnisdPluginManager, reporter: Reporter, out: Path, resume_ckpt: Path | None, resuming: bool,
) -> Session:
    """Build the run, its optimiser, schedule, generation backend and data stream; restore a checkpoint;
    write config.toml; open the trackers; print the start-up summary."""
    run = build_run(config, pm, reporter, out)
    env, model, cfg = distributed.current(), run.model, run.config
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
    backend = pm.registries.backends.get(cfg.backend)(model, run.tokenizer, source=run.source, config=cfg)
    metrics_log = MetricsLog(out / "metrics.jsonl")
    stream = DataStream(run.examples, cfg.seed)
    if env.active:  # same initial weights everywhere (seeded above), different samples per process
        torch.manual_seed(cfg.seed + 1000 * env.rank)
    start = 0
    if resume_ckpt is not None:
        state = load_checkpoint(resume_ckpt, model=model, lora=cfg.lora, optimizer=optimizer,
                                scheduler=scheduler, components=run.components, rank=env.rank)
        start, stream.cursor = state["step"], state["cursor"]
        if env.is_main:
            metrics_log.truncate_after(start)
        reporter.info(f"Resuming {out} from {resume_ckpt.name} (step {start} of {cfg.steps})")
    elif resuming:
        reporter.info(f"Resuming {out} from step 0: it stopped before its first checkpoint")
        if env.is_main:
            metrics_log.truncate_after(0)
    if env.is_main:
        atomic.write_text(out / "config.toml", dump_config(cfg))
    run.step = start
    classes = check_trackers(cfg.report_to, pm.registries.trackers) if env.is_main else []
    trackers = Trackers(classes, out, asdict(cfg), lambda m: reporter.info(f"[yellow]{m}[/]"))
    if env.is_main:
        reporter.info(startup_summary(cfg.model, sum(p.numel() for p in trainable),
                                      sum(p.numel() for p in model.parameters()), len(run.examples), cfg,
                                      run.components, out))
    return Session(run, pm, reporter, out, optimizer, scheduler, backend, stream, metrics_log, trackers, trainable,
                   start)


def _held_out(s: Session, task: Task, when: str) -> None:
    """The privileged gap on the task's held-out split, ``before`` or ``after`` training: eval/WHEN.json,
    and each item's completions in eval/WHEN_predictions.jsonl."""
    predictions = s.out / "eval" / f"{when}_predictions.jsonl" if s.env.is_main else None
    gap = privileged_gap(s.run, task, s.config.eval_limit, predictions)
    if s.env.is_main:
        _write_json(s.out / "eval" / f"{when}.json", gap)
        s.reporter.info(_gap_line(f"{when} training", gap))
        s.trackers.log_summary({f"{when}/{k}": v for k, v in gap.items()})


def _watch_activity(s: Session) -> None:
    """Warn about components that cannot act in this run, and watch the others' first steps."""
    inert = inert_warnings(s.run.components, s.run)
    if s.env.is_main:
        for message in inert.values():
            s.reporter.info(f"[yellow]Warning: {message}[/]")
    s.activity = ActivityWatch(s.run.components, s.config.steps, first_step=s.start + 1, skip=tuple(inert))


def _take(s: Session) -> list[Example]:
    """This process's share of the step's global batch (the same global batch whatever the process count):
    its prompts, each repeated ``num_generations`` times in a row (one completion is sampled per row)."""
    cfg, env = s.config, s.env
    g = cfg.num_generations
    prompts = distributed.shard(s.stream.take(cfg.batch_size * cfg.grad_accum * env.world_size // g), env)
    return [ex for ex in prompts for _ in range(g)]


def _optimiser_step(s: Session, stats: dict[str, float]) -> StepUpdate:
    """Clip the (already summed, see distill_step) gradients, then AdamW and the schedule; a non-finite step is skipped."""
    grad_norm = sharding.whole(torch.nn.utils.clip_grad_norm_(s.trainable, s.config.max_grad_norm))
    lr = s.scheduler.get_last_lr()[0]
    # A NaN/inf loss or gradient would poison the weights and the optimizer state: skip the update
    # (same decision on every process: the loss is summed and the gradients are synchronised).
    finite = math.isfinite(distributed.sum_scalar(stats["loss"])) and bool(torch.isfinite(grad_norm))
    if finite:
        s.optimizer.step()
        s.bad_in_a_row = 0
    else:
        s.skipped_total += 1
        s.bad_in_a_row += 1
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return StepUpdate(finite, grad_norm, lr)


def _after_step(s: Session, step: int, update: StepUpdate) -> None:
    s.run.step = step
    if update.finite and hasattr(s.backend, "sync_weights"):
        s.backend.sync_weights(step)  # e.g. vLLM generates the next rollouts with the new weights
    call_each(s.run.components, "on_step_end", s.run)


def _step_record(s: Session, step: int, examples: list[Example], completions: list[Completion],
                 stats: dict[str, float], update: StepUpdate, t0: float, t_gen: float) -> dict[str, Any]:
    """The step's line of metrics.jsonl: sums over every process, each component's metrics, and the
    evaluation during training when one is due."""
    run, cfg = s.run, s.config
    seconds = time.perf_counter() - t0
    lengths = [len(c.ids) for c in completions]
    tokens = distributed.sum_scalar(float(sum(len(run.student_ids(e)) for e in examples) + sum(lengths)))
    count = distributed.sum_scalar(float(len(completions)))
    record = {
        "step": step,
        "loss": distributed.sum_scalar(stats["loss"]),
        "divergence": distributed.sum_scalar(stats["divergence"]),
        "completion_length": distributed.sum_scalar(float(sum(lengths))) / count,
        "truncated_fraction": distributed.sum_scalar(float(sum(c.truncated for c in completions))) / count,
        # share of the sampled completions that copy teacher-only text (template, reference)
        "leakage": distributed.sum_scalar(float(count_leaks(run.tokenizer, run.task, examples,
                                                            [c.ids for c in completions]))) / count,
        "loss_tokens": stats["loss_tokens"],
        "token_weight_mean": distributed.sum_scalar(stats["weight"]),
        "grad_norm": float(update.grad_norm),
        "learning_rate": update.lr,
        "tokens_per_s": tokens / seconds,
        "generation_s": t_gen,
        "step_s": seconds,
        "elapsed_s": s.elapsed_before + time.perf_counter() - s.began,
        "reference_truncated": run.reference_truncations,
        "contexts_truncated": run.context_truncations,
        "nonfinite_skipped": s.skipped_total,
    }
    record.update({k: distributed.sum_scalar(v) for k, v in stats.items() if k.startswith("loss/")})
    for comp in run.components:
        if implements(comp, "metrics"):
            record.update({f"{comp.name}/{k}": float(v) for k, v in comp.metrics().items()})
    if cfg.eval_task and cfg.eval_every and step % cfg.eval_every == 0:
        record.update(_periodic_eval(run, s.pm, cfg.eval_task, cfg.eval_limit))
    return record


def _publish(s: Session, step: int, record: dict[str, Any]) -> None:
    """The record to metrics.jsonl, the trackers and the person watching (with any activity warning)."""
    main = s.env.is_main
    if main:
        s.metrics_log.write(record)
        s.trackers.log_metrics(record, step)
    s.reporter.step(record)
    if main and s.activity is not None:
        for message in s.activity.observe(step, record):
            s.reporter.info(f"[yellow]Warning: {message}[/]")


def _save_checkpoint(s: Session, step: int) -> None:
    """checkpoints/step-N: gathered by every process (collectives), written by the main one."""
    run, cfg = s.run, s.config
    rng_states = distributed.gather_objects(rng_state())
    model_state = sharding.full_model_state(run.model, cfg.lora)
    optimizer_state = sharding.full_optimizer_state(run.model, s.optimizer)
    component_states = gather_component_states(run.components)
    if s.env.is_main:
        save_checkpoint(s.out / "checkpoints" / f"step-{step}", model=run.model, tokenizer=run.tokenizer,
                        lora=cfg.lora, optimizer=s.optimizer, scheduler=s.scheduler, step=step,
                        cursor=s.stream.cursor, components=run.components, rng_states=rng_states,
                        model_state=model_state, optimizer_state=optimizer_state,
                        component_states=component_states)
    distributed.barrier()


def _raise_if_stopped(s: Session, step: int, diverged: bool, signal: str | None) -> None:
    """After the step's checkpoint: stop the run when it diverged or a signal asked it to."""
    if diverged:
        raise TrainingDiverged(
            f"{s.bad_in_a_row} steps in a row had a NaN/inf loss or gradient (last: step {step}); stopped "
            f"with a checkpoint. Lower --lr, check the data, or resume with: unisd train --resume {s.out}"
        )
    if signal is not None:
        raise TrainingInterrupted(
            f"stopped by {signal} after step {step}; checkpoint saved. Continue with: unisd train --resume {s.out}"
        )


def _finish(s: Session, gap_task: Task | None) -> None:
    """final/ (the trained weights), then the held-out evaluation after training."""
    model_state = sharding.full_model_state(s.run.model, s.config.lora)
    if s.env.is_main:
        with atomic.directory(s.out / "final") as tmp:
            save_weights(s.run.model, s.run.tokenizer, tmp, s.config.lora, state=model_state)
    if gap_task is not None:
        _held_out(s, gap_task, "after")
    s.trackers.close()
    distributed.barrier()


def _periodic_eval(run: Run, pm: UnisdPluginManager, task_name: str, limit: int | None) -> dict[str, float]:
    task = pm.registries.tasks.get(task_name)()
    gap = privileged_gap(run, task, limit)
    return {f"eval/{task_name}/{k}": v for k, v in gap.items()}


def _previous_elapsed(log: MetricsLog) -> float:
    records = log.read()
    return float(records[-1].get("elapsed_s", 0.0)) if records else 0.0


def _gap_line(when: str, gap: dict[str, float]) -> str:
    strict = f" (strict {gap['student_strict_accuracy']:.3f})" if "student_strict_accuracy" in gap else ""
    return (
        f"[bold]{when}[/]: student accuracy {gap['student_accuracy']:.3f}{strict}, leakage {gap['leakage']:.3f}, "
        f"overrun {gap.get('overrun', 0.0):.3f} | "
        f"teacher-with-reference {gap['teacher_accuracy']:.3f} | privileged gap {gap['privileged_gap']:+.3f} "
        f"(n={int(gap['n'])})"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    atomic.write_text(path, json.dumps(data, indent=2) + "\n")
