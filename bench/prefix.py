"""A prompt prefix shared by every row of a batch, run once against run for every row: each phase of a
demo training step and greedy evaluation, side by side.

    python bench/prefix.py                      # SmolLM2-135M-Instruct on the demo task, 2 threads
    python bench/prefix.py --threads 1 --repeats 5

The demo's prompts open with SmolLM2's default system turn (24 tokens of ~48 for the student, of ~90 for
the teacher), which ``unisd.model.scoring.body_states`` and ``unisd.model.rollout.shared_prompt_cache``
compute once per forward. "whole" turns that off (``MIN_SHARED_PREFIX`` out of reach), which is the
previous behaviour. Phases alternate which mode runs first. Every repeat checks that both modes sampled
the same completions (same seed) and prints the largest relative gradient difference (bench/demo_run.py
times both modes).

Last line: ``generate_ratio=.. teacher_ratio=.. step_ratio=.. eval16_ratio=.. eval32_over_eval16_whole=..``
(shared over whole: below 1 is faster).
"""

from __future__ import annotations

import statistics

from demo_run import demo_arguments, demo_run, evaluation, ratio_table, training_phases  # beside this script

from unisd.model import scoring

MODES = ("whole", "shared")
MIN_SHARED = {"shared": scoring.MIN_SHARED_PREFIX, "whole": 10**9}


def use(mode: str) -> None:
    scoring.MIN_SHARED_PREFIX = MIN_SHARED[mode]


def main() -> None:
    args = demo_arguments(__doc__.split("\n")[0], "timed repeats of the training phases",
                          "examples per training step (one micro-batch)", eval_items=96).parse_args()
    run = demo_run(args)
    times = training_phases(run, MODES, use, args.repeats, args.batch)
    times.update(evaluation(run, MODES, use, args.eval_items, batch_sizes=(16, 32)))
    ratios = ratio_table(times, MODES, ("generate", "teacher", "step", "eval16", "eval32"))
    eval32_over_eval16 = statistics.median(times[("shared", "eval32")]) / statistics.median(times[("whole", "eval16")])
    print(" ".join(f"{p}_ratio={ratios[p]:.2f}" for p in ("generate", "teacher", "step", "eval16"))
          + f" eval32_over_eval16_whole={eval32_over_eval16:.2f}")


if __name__ == "__main__":
    main()
