"""The sweep's cache phase: ``python -m unisd.ops.prepare --model M | --task T [--limit N] |
--base-eval CONFIG --side student|teacher``.

Fetches or converts a model, loads a task's splits, or generates the base model's held-out completions
for one side of a run's evaluation (:mod:`unisd.evaluation.base_cache`), once, so that parallel training
jobs find them cached instead of racing to download, convert or generate the same things.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def prepare_model(model: str) -> str:
    from ..model.models import resolve_model

    source = resolve_model(model, progress=print)
    if not Path(source).exists():  # a hub id: download it now (transformers would, per job)
        from huggingface_hub import snapshot_download

        source = snapshot_download(source)
    return source


def prepare_task(name: str, limit: int | None) -> dict[str, int]:
    from ..plugins import get_plugin_manager

    task = get_plugin_manager().registries.tasks.get(name)()
    splits = [s for s in (getattr(task, "train_split", "train"), getattr(task, "eval_split", "test")) if s]
    return {split: len(task.load(split, limit=limit)) for split in dict.fromkeys(splits)}


def prepare_base_eval(config_path: str, side: str) -> str:
    """Generate the base model's completions of one side of the held-out evaluation that a run of this
    config does before training; returns what was done, in words."""
    from ..config import load_config
    from ..evaluation.evaluate import keep_base_completions
    from ..io.reporting import Reporter
    from ..plugins import get_plugin_manager
    from ..run import build_run

    config = load_config(config_path)
    run = build_run(config, get_plugin_manager(), Reporter(), None)
    if run.task is None:
        return "no task to evaluate: nothing generated"
    kept = keep_base_completions(run, run.task, config.eval_limit, side)
    return "kept in the cache" if kept else "not cacheable here (a hub id or several processes): nothing kept"


def _base_eval_or_note(config_path: str, side: str) -> str:
    """:func:`prepare_base_eval`, whose failure is only a note: it saves the runs time, nothing more, and a
    run that hits the same problem reports it itself."""
    try:
        return prepare_base_eval(config_path, side)
    except Exception as exc:  # noqa: BLE001 (any failure: the runs generate these completions themselves)
        return f"not kept ({type(exc).__name__}: {exc}); each run generates it itself"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unisd.ops.prepare", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model")
    group.add_argument("--task")
    group.add_argument("--base-eval", metavar="CONFIG", help="a run's config file")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--side", choices=("student", "teacher"), default="student")
    args = parser.parse_args(argv)
    from ..errors import UnisdError

    try:
        if args.model:
            print(f"model {args.model}: ready at {prepare_model(args.model)}")
        elif args.base_eval:
            print(f"base model's {args.side} evaluation: {_base_eval_or_note(args.base_eval, args.side)}")
        else:
            counts = prepare_task(args.task, args.limit)
            print(f"task {args.task}: " + ", ".join(f"{k}={v} examples" for k, v in counts.items()))
    except UnisdError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
