"""The student's and teacher's forwards through unisd's lean forward against transformers' and PEFT's modules:
each phase of a demo training step, side by side.

    python bench/lean_forward.py                         # SmolLM2-135M-Instruct on the demo task, 2 threads
    python bench/lean_forward.py --lora-dropout 0.05     # the demo's own adapter dropout
    python bench/lean_forward.py --repeats 6 --batch 8 --eval-items 0

The teacher's and the student's forwards (``unisd.model.scoring``) run supported (Llama-family) bodies on a
CPU through ``unisd.model.lean_forward``: the same arithmetic without the modules' per-call machinery, each
LoRA projection one autograd node; "modules" turns it off (``UNISD_LEAN_FORWARD=0``), the previous behaviour.
Generation does not use it (its ratio should stay near 1). Both modes sample the same completions (same seed)
and draw the same dropout masks, so every repeat prints the largest relative gradient difference between them
(float32 rounding, ~1e-5). Phases alternate which mode runs first; the first repeat warms up. Greedy
evaluation does not use the lean forward either: ``--eval-items`` defaults to 0 here.

Last line: ``generate_ratio=.. teacher_ratio=.. step_ratio=..`` (lean over modules: below 1 is faster).
"""

from __future__ import annotations

import os
import sys

from demo_run import compare_modes  # beside this script

MODES = ("modules", "lean")


def use(mode: str) -> None:
    os.environ["UNISD_LEAN_FORWARD"] = "1" if mode == "lean" else "0"


def main() -> None:
    if not any(a.startswith("--eval-items") for a in sys.argv[1:]):
        sys.argv += ["--eval-items", "0"]  # evaluation decodes; the lean forward does not touch it
    compare_modes(__doc__, MODES, use, ("generate", "teacher", "step", "eval32"))


if __name__ == "__main__":
    main()
