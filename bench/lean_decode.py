"""Decoding through unisd's lean loop against transformers' ``generate``: each phase of a demo training step
and greedy evaluation, side by side.

    python bench/lean_decode.py                    # SmolLM2-135M-Instruct on the demo task, 2 threads
    python bench/lean_decode.py --threads 1 --repeats 6

``HFBackend`` decodes supported (Llama-family) models on a CPU with ``unisd.model.lean_decode``: the same
arithmetic per token as the model's forward without ``generate``'s per-token machinery; "generate" turns it
off (``UNISD_LEAN_DECODING=0``), the previous behaviour. The prompt's prefill is the model's own forward in
both. Both compute the same logits up to float rounding, so a repeat may sample a different token where two
are nearly tied (each repeat prints whether the completions were the same). Phases alternate which mode
runs first; the first repeat warms up.

Last line: ``generate_ratio=.. step_ratio=.. eval32_ratio=..`` (lean over generate: below 1 is faster).
"""

from __future__ import annotations

import os

from demo_run import compare_modes  # beside this script

MODES = ("generate", "lean")


def use(mode: str) -> None:
    os.environ["UNISD_LEAN_DECODING"] = "1" if mode == "lean" else "0"


def main() -> None:
    compare_modes(__doc__, MODES, use, ("generate", "step", "eval32"))


if __name__ == "__main__":
    main()
