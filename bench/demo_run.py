"""The demo's training settings as a run, for the benchmarks that time its phases side by side
(``prefix.py``, ``merged_adapter.py``): SmolLM2-135M-Instruct on the demo task, LoRA r16/α32 without dropout,
12 new tokens, one micro-batch per step, no evaluation before or after."""

from __future__ import annotations

import argparse

import torch

from unisd.config import RunConfig
from unisd.io.reporting import Reporter
from unisd.plugins import get_plugin_manager
from unisd.run import Run, build_run


def demo_arguments(description: str, repeats_help: str, batch_help: str, eval_items: int) -> argparse.ArgumentParser:
    """``--threads``, ``--repeats``, ``--batch`` and ``--eval-items``, the options every such benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4, help=repeats_help)
    parser.add_argument("--batch", type=int, default=4, help=batch_help)
    parser.add_argument("--eval-items", type=int, default=eval_items)
    return parser


def demo_run(args: argparse.Namespace) -> Run:
    """The run, built with ``args.threads`` compute threads and ``args.batch`` examples per step."""
    torch.set_num_threads(args.threads)
    cfg = RunConfig(model="smollm2", task="demo", batch_size=args.batch, grad_accum=1, lora_r=16, lora_alpha=32,
                    lora_dropout=0.0, max_new_tokens=12, seed=1, eval_before_after=False)
    return build_run(cfg, get_plugin_manager(), Reporter(), None)
