"""A prompt prefix shared by every row of a batch, run once against run for every row: each phase of a
demo training step and greedy evaluation, side by side.

    python bench/prefix.py                      # SmolLM2-135M-Instruct on the demo task, 2 threads
    python bench/prefix.py --threads 1 --repeats 5

The demo's prompts open with SmolLM2's default system turn (24 tokens of ~48 for the student, of ~90 for
the teacher), which ``unisd.model.scoring.body_states`` and ``unisd.model.rollout.shared_prompt_cache``
compute once per forward. "whole" turns that off (``MIN_SHARED_PREFIX`` out of reach), which is the
previous behaviour. Phases alternate which mode runs first. Every repeat checks that both modes sampled
the same completions (same seed) and prints the largest relative gradient difference.

Last line: ``generate_ratio=.. teacher_ratio=.. step_ratio=.. eval16_ratio=.. eval32_over_eval16_whole=..``
(shared over whole: below 1 is faster).
"""

from __future__ import annotations

import statistics
import time

import torch
from demo_run import demo_arguments, demo_run  # bench/demo_run.py, beside this script

from unisd.data.demo import DemoTask
from unisd.model import scoring
from unisd.model.rollout import HFBackend, SamplingParams
from unisd.model.scoring import pack
from unisd.run import DataStream
from unisd.step import distill_step, teacher_pass

MODES = {"shared": scoring.MIN_SHARED_PREFIX, "whole": 10**9}


def use(mode: str) -> None:
    scoring.MIN_SHARED_PREFIX = MODES[mode]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def training_phases(run, repeats: int, batch: int) -> dict[tuple[str, str], list[float]]:
    backend = HFBackend(run.model, run.tokenizer, batch_size=16)
    params = SamplingParams(0.7, 1.0, run.config.max_new_tokens)
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(repeats + 1):  # the first is a warm-up
        examples = DataStream(run.examples, rep).take(batch)
        prompts = [run.student_ids(e) for e in examples]
        seen = {}
        for mode in ("shared", "whole") if rep % 2 else ("whole", "shared"):
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
        same = seen["shared"][0] == seen["whole"][0]
        rel = max(float((seen["shared"][1][n] - g).norm() / g.norm().clamp_min(1e-30))
                  for n, g in seen["whole"][1].items()) if same else float("nan")
        print(f"repeat {rep}: same completions {same}, largest relative gradient difference {rel:.1e}", flush=True)
    return times


def evaluation(run, items: int) -> dict[tuple[str, str], list[float]]:
    prompts = [run.student_ids(e) for e in DemoTask().load("test")[:items]]
    params = SamplingParams(0.0, 1.0, run.config.max_new_tokens)
    times: dict[tuple[str, str], list[float]] = {}
    for batch_size in (16, 32):
        backend = HFBackend(run.model, run.tokenizer, batch_size=batch_size)
        outputs = {}
        for mode in ("whole", "shared"):
            use(mode)
            out, t = timed(backend.generate, prompts, params)
            outputs[mode] = [c.ids for c in out]
            times.setdefault((mode, f"eval{batch_size}"), []).append(t)
        print(f"eval batch {batch_size}: same greedy completions {outputs['shared'] == outputs['whole']}", flush=True)
    return times


def main() -> None:
    args = demo_arguments(__doc__.split("\n")[0], "timed repeats of the training phases",
                          "examples per training step (one micro-batch)", eval_items=96).parse_args()
    run = demo_run(args)
    times = training_phases(run, args.repeats, args.batch)
    times.update(evaluation(run, args.eval_items))
    median = {key: statistics.median(v) for key, v in times.items()}
    print(f"\n{'phase':10} {'whole s':>9} {'shared s':>9} {'ratio':>7}")
    for phase in ("generate", "teacher", "step", "eval16", "eval32"):
        whole, shared = median[("whole", phase)], median[("shared", phase)]
        print(f"{phase:10} {whole:9.3f} {shared:9.3f} {shared / whole:7.2f}")
    ratio = {p: median[("shared", p)] / median[("whole", p)] for p in ("generate", "teacher", "step", "eval16")}
    print(" ".join(f"{p}_ratio={r:.2f}" for p, r in ratio.items())
          + f" eval32_over_eval16_whole={median[('shared', 'eval32')] / median[('whole', 'eval16')]:.2f}")


if __name__ == "__main__":
    main()
