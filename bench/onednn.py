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

from demo_run import compare_modes  # beside this script

MODES = ("blas", "onednn")


def use(mode: str) -> None:
    os.environ["UNISD_ONEDNN"] = "1" if mode == "onednn" else "0"


def main() -> None:
    compare_modes(__doc__, MODES, use, ("generate", "teacher", "step", "eval32"))


if __name__ == "__main__":
    main()
