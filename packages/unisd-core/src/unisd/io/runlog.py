"""metrics.jsonl: one JSON object per optimiser step, each step exactly once (also across resumes)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from . import atomic


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than crash
    return value


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything after it is unreliable
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (work lost since the checkpoint we resume from)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
