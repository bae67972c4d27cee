"""The demo's training settings as a run, for the benchmarks that time its phases side by side
(``prefix.py``, ``onednn.py``, ``lean_decode.py``,
``lean_forward.py``): SmolLM2-135M-Instruct on the demo task, LoRA r16/α32
without dropout, 12 new tokens, one micro-batch per step, no evaluation before or after; and the timing of
a training step's phases and of greedy evaluation under two modes of one switch (:func:`training_phases`,
:func:`evaluation`, the whole comparison in :func:`compare_modes`)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from unisd.config import RunConfig
from unisd.data.demo import DemoTask
from unisd.io.reporting import Reporter
from unisd.model.rollout import HFBackend, SamplingParams
from unisd.model.scoring import pack
from unisd.plugins import get_plugin_manager
from unisd.run import DataStream, Run, build_run
from unisd.step import distill_step, teacher_pass

Times = dict[tuple[str, str], list[float]]  # (mode, phase) -> seconds per repeat


def demo_arguments(description: str, repeats_help: str, batch_help: str, eval_items: int) -> argparse.ArgumentParser:
    """``--threads``, ``--repeats``, ``--batch`` and ``--eval-items``, the options every such benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4, help=repeats_help)
    parser.add_argument("--batch", type=int, default=4, help=batch_help)
    parser.add_argument("--eval-items", type=int, default=eval_items, help="held-out items of the greedy evaluation "
                        "(0: none)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="the adapter's dropout (the demo trains "
                        "with 0.05; the head-to-head with TRL with 0)")
    return parser


def demo_run(args: argparse.Namespace) -> Run:
    """The run, built with ``args.threads`` compute threads and ``args.batch`` examples per step."""
    torch.set_num_threads(args.threads)
    cfg = RunConfig(model="smollm2", task="demo", batch_size=args.batch, grad_accum=1, lora_r=16, lora_alpha=32,
                    lora_dropout=getattr(args, "lora_dropout", 0.0), max_new_tokens=12, seed=1, eval_before_after=False)
    return build_run(cfg, get_plugin_manager(), Reporter(), None)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def training_phases(run: Run, modes: tuple[str, str], use: Callable[[str], None], repeats: int, batch: int) -> Times:
    """generate / teacher / step (``distill_step``, the teacher included) under each mode, alternating
    which runs first; every repeat prints whether both sampled the same completions (same seed) and the
    largest relative gradient difference. The first repeat warms up."""
    backend = HFBackend(run.model, run.tokenizer, batch_size=16)
    params = SamplingParams(0.7, 1.0, run.config.max_new_tokens)
    times: Times = {}
    for rep in range(repeats + 1):
        examples = DataStream(run.examples, rep).take(batch)
        prompts = [run.student_ids(e) for e in examples]
        seen = {}
        for mode in modes if rep % 2 else modes[::-1]:
            use(mode)
            torch.manual_seed(rep)
            completions, t_gen = timed(backend.generate, prompts, params)
            ids = [c.ids for c in completions]
            mask = pack([[0]] * len(ids), ids, run.pad_id).mask
            _, t_teacher = timed(teacher_pass, run, examples, ids, mask)
            _, t_step = timed(distill_step, run, examples, completions)
            grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
            run.model.zero_grad(set_to_none=True)
            seen[mode] = (ids, grads)
            if rep:
                for phase, t in (("generate", t_gen), ("teacher", t_teacher), ("step", t_step)):
                    times.setdefault((mode, phase), []).append(t)
        same = seen[modes[0]][0] == seen[modes[1]][0]
        rel = max(float((seen[modes[1]][1][n] - g).norm() / g.norm().clamp_min(1e-30))
                  for n, g in seen[modes[0]][1].items()) if same else float("nan")
        print(f"repeat {rep}: same completions {same}, largest relative gradient difference {rel:.1e}", flush=True)
    return times


def evaluation(run: Run, modes: tuple[str, str], use: Callable[[str], None], items: int,
               batch_sizes: tuple[int, ...] = (32,)) -> Times:
    """Greedy evaluation of ``items`` held-out demo prompts under each mode (phase ``eval{batch size}``),
    after one untimed warm-up pass per mode; prints whether both gave the same completions."""
    prompts = [run.student_ids(e) for e in DemoTask().load("test")[:items]]
    params = SamplingParams(0.0, 1.0, run.config.max_new_tokens)
    times: Times = {}
    for batch_size in batch_sizes:
        backend = HFBackend(run.model, run.tokenizer, batch_size=batch_size)
        outputs = {}
        for mode in modes:
            use(mode)
            backend.generate(prompts[:batch_size], params)
            out, t = timed(backend.generate, prompts, params)
            outputs[mode] = [c.ids for c in out]
            times.setdefault((mode, f"eval{batch_size}"), []).append(t)
        print(f"eval batch {batch_size}: same greedy completions {outputs[modes[0]] == outputs[modes[1]]}", flush=True)
    return times


def ratio_table(times: Times, modes: tuple[str, str], phases: tuple[str, ...]) -> dict[str, float]:
    """Prints each phase's median under both modes and their ratio (second over first: below 1, the
    second is faster); returns the ratios."""
    median = {key: statistics.median(v) for key, v in times.items()}
    print(f"\n{'phase':10} {modes[0] + ' s':>10} {modes[1] + ' s':>10} {'ratio':>7}")
    ratios = {}
    for phase in phases:
        first, second = median[(modes[0], phase)], median[(modes[1], phase)]
        ratios[phase] = second / first
        print(f"{phase:10} {first:10.3f} {second:10.3f} {ratios[phase]:7.2f}")
    return ratios


def compare_modes(doc: str, modes: tuple[str, str], use: Callable[[str], None], phases: tuple[str, ...]) -> None:
    """A benchmark's whole run: the demo run from the command line (:func:`demo_arguments`), the training phases
    and greedy evaluation (96 items, batch 32) under both modes of one switch, the ratio table, and a last line
    ``<phase>_ratio=..`` for each of ``phases`` (second mode over first)."""
    args = demo_arguments(doc.split("\n")[0], "timed repeats of the training phases",
                          "examples per training step (one micro-batch)", eval_items=96).parse_args()
    run = demo_run(args)
    times = training_phases(run, modes, use, args.repeats, args.batch)
    if args.eval_items:
        times.update(evaluation(run, modes, use, args.eval_items))
    measured = tuple(p for p in phases if (modes[0], p) in times)  # evaluation is skipped with --eval-items 0
    ratios = ratio_table(times, modes, measured)
    print(" ".join(f"{p}_ratio={ratios[p]:.2f}" for p in measured))
