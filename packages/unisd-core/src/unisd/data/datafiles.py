"""Training data given with ``--data``: local files of several formats, hub datasets, chat records.

Where the examples come from (the first that applies):

* a local file: ``.jsonl`` (one JSON object per line), ``.json`` (a JSON array of objects, or JSON
  lines), ``.csv`` (a header row), ``.parquet``;
* a local directory: a dataset saved with ``datasets``' ``save_to_disk``, or a folder in the Hub's
  layout (``data/train-*.parquet``, ``train.jsonl``, ...), read with ``datasets.load_dataset``;
* anything else that looks like ``OWNER/NAME`` or ``NAME`` (optionally ``:CONFIG``): a Hub dataset,
  downloaded by ``datasets`` (``--data-split`` picks the split, default ``train``).

What each record must hold (column names from ``--prompt-column`` / ``--reference-column``):

* ``prompt`` (the student's user text) and ``reference`` (the demonstration shown to the teacher); or
* ``messages``: a conversation ``[{"role": ..., "content": ...}, ...]`` of optional system turns, one
  user turn and, last, the assistant's answer, which becomes the reference (unless a reference
  column is given). A system turn becomes the example's system prompt, for student and teacher.

``id`` (default: the record's position) and ``meta`` (an object) are optional. ``--system-prompt``
gives every example without one a system prompt. Every error names the source and the record.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import DataError
from .tasks import Example, check_encodable, iter_jsonl

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
# What a good line of a JSON-lines data file holds, as errors say it.
JSONL_EXPECTED = "with 'prompt' and 'reference' (or 'messages')"
# A Hub dataset id: NAME or OWNER/NAME, then an optional :CONFIG.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass(frozen=True)
class Columns:
    """Which fields of a record hold what (``--prompt-column``, ``--reference-column``)."""

    prompt: str = "prompt"
    reference: str = "reference"
    messages: str = "messages"

    @property
    def expected(self) -> str:
        return (f"each record needs '{self.prompt}' (student text) and '{self.reference}' (shown to the teacher), "
                f"or '{self.messages}' (a user turn, then the assistant's answer)")


def load_data(source: str | Path, *, split: str = "train", limit: int | None = None,
              columns: Columns | None = None, system_prompt: str | None = None) -> list[Example]:
    """The examples of ``source`` (a file, a directory or a Hub id; see the module docstring)."""
    columns = columns or Columns()
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        records = _file_records(path)
        label = str(path)
    elif path.is_dir():
        records, label = _dataset_records(_load_local_dataset(path, split)), f"{path} (split {split})"
    elif looks_like_hub_id(text):
        records, label = _dataset_records(_load_hub_dataset(text, split)), f"{text} (split {split})"
    else:
        raise DataError(f"{text}: no such data file or directory (--data takes a local {', '.join(FILE_FORMATS)} file, "
                        "a dataset folder, or a Hub dataset id such as OWNER/NAME[:CONFIG])")
    examples = to_examples(records, columns, limit=limit)
    if not examples:
        raise DataError(f"{label}: no examples found")
    return with_system_prompt(examples, system_prompt)


def with_system_prompt(examples: list[Example], system_prompt: str | None) -> list[Example]:
    """``examples``, each without a system prompt of its own given ``system_prompt`` (None: unchanged)."""
    if not system_prompt:
        return examples
    return [e if e.system else replace(e, system=system_prompt) for e in examples]


def is_jsonl_file(source: str | Path) -> bool:
    """Whether ``source`` is a local file read as JSON lines (``.jsonl``, or any name not another format)."""
    path = Path(str(source)).expanduser()
    return path.is_file() and path.suffix.lower() not in WHOLE_FILE_FORMATS


def looks_like_hub_id(text: str) -> bool:
    suffix = Path(text.split(":", 1)[0]).suffix.lower()
    return bool(HUB_ID.match(text)) and suffix not in FILE_FORMATS and not text.startswith((".", "~"))


# ----------------------------------------------------------------------------------------------
# Sources: each yields ("WHERE", record) pairs, WHERE naming the record in errors


def _file_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = WHOLE_FILE_FORMATS.get(path.suffix.lower())
    # .jsonl, and any other name: JSON lines, the format the project always read
    return reader(path) if reader is not None else iter_jsonl(path, JSONL_EXPECTED)


def _json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A JSON array of objects; a file that is not one JSON document is read as JSON lines."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError:
        return iter_jsonl(path, JSONL_EXPECTED)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects (or one object per line), got {type(data).__name__}")
    return ((f"{path}[{i}]", rec) for i, rec in enumerate(data))


def _csv_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    # "row N" counts data rows (the header is not one), so a quoted newline inside a cell cannot mislead.
    return ((f"{path}:row {i + 1}", row) for i, row in enumerate(rows))


def _parquet_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (installed with datasets): pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return ((f"{path}:row {i + 1}", row) for i, row in enumerate(rows))


# The formats read whole, by suffix; every other local file is read as JSON lines (lazily, see
# unisd.data.example_file).
WHOLE_FILE_FORMATS: dict[str, Callable[[Path], Iterator[tuple[str, dict[str, Any]]]]] = {
    ".json": _json_records, ".csv": _csv_records, ".parquet": _parquet_records,
}


def _load_local_dataset(path: Path, split: str) -> Any:
    datasets = _datasets(str(path))
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: no split '{split}' (it has {', '.join(loaded)}); pick one with --data-split")
                return loaded[split]
            return loaded
        return datasets.load_dataset(str(path), split=split)
    except DataError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise DataError(f"{path}: could not read split '{split}' of this dataset folder ({_first_line(exc)}); "
                        "use --data-split, or give one data file") from None


def _load_hub_dataset(spec: str, split: str) -> Any:
    name, _, config = spec.partition(":")
    datasets = _datasets(spec)
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # network, missing dataset, missing split, gated: all end the same way for a user
        raise DataError(
            f"--data {spec}: could not load split '{split}' of the Hub dataset '{name}'"
            + (f" (config '{config}')" if config else "") + f": {_first_line(exc)}. "
            "Check the name and --data-split; offline, download it first (datasets' save_to_disk) and give the "
            "folder, or give a local file"
        ) from None


def _datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {what}: reading dataset folders and Hub datasets needs `datasets`: "
                        "pip install datasets") from None
    return datasets


def _dataset_records(dataset: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((f"record {i + 1}", dict(row)) for i, row in enumerate(dataset))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ----------------------------------------------------------------------------------------------
# Records → examples


def to_examples(records: Iterable[tuple[str, dict[str, Any]]], columns: Columns,
                limit: int | None = None) -> list[Example]:
    """One :class:`Example` per record, checked; ids must be unique."""
    return list(checked_examples(records, columns, limit))


def checked_examples(records: Iterable[tuple[str, dict[str, Any]]], columns: Columns,
                     limit: int | None = None) -> Iterator[Example]:
    """:func:`to_examples` one example at a time, for a caller that keeps less than every example. It
    reads no record past the ``limit``-th."""
    seen: set[str] = set()
    for index, (where, record) in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object ({columns.expected}), got {type(record).__name__}")
        example = example_from_record(where, index, record, columns)
        if example.id in seen:
            raise DataError(f"{where}: duplicate id {example.id!r}; ids must be unique")
        seen.add(example.id)
        yield example
        if limit is not None and len(seen) >= limit:
            return


def example_from_record(where: str, index: int, record: dict[str, Any], columns: Columns) -> Example:
    """One record as a checked :class:`Example`; ``where`` names it in errors, ``index`` is its default id
    when ``where`` does not end in a line number."""
    system = None
    if columns.prompt not in record and columns.messages in record:
        prompt, answer, system = _from_messages(where, record[columns.messages], columns)
        reference = record.get(columns.reference, answer)  # a reference column wins over the final turn
    else:
        missing = [c for c in (columns.prompt, columns.reference) if c not in record]
        if missing:
            have = ", ".join(f"'{k}'" for k in list(record)[:8]) or "none"
            raise DataError(f"{where}: no field '{missing[0]}' ({columns.expected}; this record has {have}). "
                            "Name the columns with --prompt-column / --reference-column")
        prompt, reference = record[columns.prompt], record[columns.reference]
    for name, value in ((columns.prompt, prompt), (columns.reference, reference)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{name}' must be a non-empty string ({columns.expected})")
        check_encodable(value, f"{where}: field '{name}'")
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object")
    raw_id = record.get("id")
    ex_id = str(raw_id) if raw_id is not None and str(raw_id) != "" else str(_position(where, index))
    return Example(ex_id, prompt, reference, meta, system=system)


def _position(where: str, index: int) -> str | int:
    """A record's default id: its line number in a JSONL file (as before), else its position."""
    tail = where.rsplit(":", 1)[-1]
    return tail if tail.isdigit() else index


def _from_messages(where: str, messages: Any, columns: Columns) -> tuple[str, str, str | None]:
    """(user text, the final assistant turn or "", the system text or None) from a chat record."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: '{columns.messages}' must be a list of {{\"role\", \"content\"}} objects")
    roles = [m.get("role") for m in messages]
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role (system, user or assistant) and a string content; "
                            f"got {json.dumps(m)[:120]}")
    systems = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    answer = ""
    if turns and turns[-1]["role"] == "assistant":
        answer = turns[-1]["content"]
        turns = turns[:-1]
    if [m["role"] for m in turns] != ["user"]:
        raise DataError(
            f"{where}: '{columns.messages}' must hold one user turn (after any system turns), then the assistant's "
            f"answer; got roles {roles}. unisd trains single-turn prompts: put earlier turns into the user text"
        )
    return turns[0]["content"], answer, "\n\n".join(systems) if systems else None
