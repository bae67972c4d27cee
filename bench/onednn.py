"""Float32 products through oneDNN against PyTorch's BLAS: each phase of a demo training step and greedy
evaluation, side by side.

    python bench/onednn.py                      # SmolLM2-135M-Instruct on the demo task, 2 threads
    python bench/onednn.py --threads 1 --repeats 6

unisd's ``load_model`` gives every linear layer oneDNN's float32 product (``unisd.model.onednn``), and the
chunked divergence's vocabulary products use it too; "blas" turns both off (``UNISD_ONEDNN=0``), which is
the previous behaviour. Both are float32 products that differ only in summation order, so a repeat may
sample a different token where two are nearly tied. Phases alternate which mode runs first; the first
repeat warms up (oneDNN builds a kernel for each new shape on its first use).

Last line: ``generate_ratio=.. teacher_ratio=.. step_ratio=.. eval32_ratio=..`` (oneDNN over BLAS: below 1
is faster).
"""

from __future__ import annotations

import os

from demo_run import demo_arguments, demo_run, evaluation, ratio_table, training_phases  # beside this script

MODES = ("blas", "onednn")


def use(mode: str) -> None:
    os.environ["UNISD_ONEDNN"] = "1" if mode == "onednn" else "0"


def main() -> None:
    args = demo_arguments(__doc__.split("\n")[0], "timed repeats of the training phases",
                          "examples per training step (one micro-batch)", eval_items=96).parse_args()
    run = demo_run(args)
    times = training_phases(run, MODES, use, args.repeats, args.batch)
    times.update(evaluation(run, MODES, use, args.eval_items))
    phases = ("generate", "teacher", "step", "eval32")
    ratios = ratio_table(times, MODES, phases)
    print(" ".join(f"{p}_ratio={ratios[p]:.2f}" for p in phases))


if __name__ == "__main__":
    main()
