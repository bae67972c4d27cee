"""The sweep's cache phase: ``python -m unisd.ops.prepare --model M | --task T [--limit N]``.

Fetches or converts a model, or loads a task's splits, once, so that parallel training jobs find
them cached instead of racing to download or convert the same files.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unisd.ops.prepare", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model")
    group.add_argument("--task")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    from ..errors import UnisdError

    try:
        if args.model:
            print(f"model {args.model}: ready at {prepare_model(args.model)}")
        else:
            counts = prepare_task(args.task, args.limit)
            print(f"task {args.task}: " + ", ".join(f"{k}={v} examples" for k, v in counts.items()))
    except UnisdError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
