"""A JSON-lines training file read lazily, so that start-up and memory do not grow with its size.

``--data FILE.jsonl`` with a million prompts used to be read whole at start, and every prompt was then
tokenised to check it against ``max_prompt_tokens``: minutes before the first step, and every prompt's
token ids in memory. Here:

* the first run on a file reads it once, checks every record exactly as :func:`load_data` does (the same
  errors, naming the line), and keeps only where each record starts and ends (an *index*);
* the student prompts' token counts, which the ``max_prompt_tokens`` filter needs, are measured once too;
* both are saved in the cache directory (``unisd.io.cachedir``), keyed by what they depend on: the file
  (resolved path, size, modification and change times, inode, device), the columns and ``limit``; for the
  counts also the tokenizer (its vocabulary, merges and chat template), the system prompt and the versions
  of the packages that render and tokenize a prompt;
* later runs load the two arrays (milliseconds for a million records), and an example is parsed from its
  line when the data stream draws it.

:class:`ExampleFile` is a read-only sequence of :class:`Example`: ``len``, indexing and iteration behave like
the list :func:`load_data` returns, in the same order, so the data order for a seed is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from ..errors import DataError
from ..io import atomic
from ..io.cachedir import cache_dir, digest, package_versions
from .datafiles import JSONL_EXPECTED, Columns, checked_examples, example_from_record
from .tasks import Example, parse_json_line, utf8_line

FORMAT = 1  # bump when the index or the way a prompt is measured changes: old caches are then ignored


class ExampleFile(Sequence[Example]):
    """The examples of one JSON-lines file, parsed from disk when read (see the module docstring)."""

    def __init__(self, path: Path, spans: np.ndarray, lines: np.ndarray, columns: Columns,
                 system_prompt: str | None, key: str | None, stamp: tuple[int, ...]):
        self.path, self.columns, self.system_prompt = path, columns, system_prompt
        self._resolved = path.resolve()  # read there even if the working directory changes; errors name ``path``
        self.spans = spans  # [N, 2] int64: each record's byte range in the file
        self.lines = lines  # [N] int64: each record's line number (errors and default ids use it)
        self.key = key  # names the whole file's index in the cache; None for a subset
        self._stamp = stamp  # the file's _stamp when indexed: a file changed since then is refused

    def __len__(self) -> int:
        return len(self.lines)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self._read(i) for i in range(*index.indices(len(self)))]
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._read(i % len(self))

    def __iter__(self) -> Iterator[Example]:
        """Every example in order, through one open file (measuring a large file's prompts reads them all)."""
        self._check_unchanged()
        with self._resolved.open("rb") as fh:
            for i in range(len(self)):
                yield self._parse(i, self._bytes(fh, i))

    def _read(self, i: int) -> Example:
        self._check_unchanged()
        with self._resolved.open("rb") as fh:
            return self._parse(i, self._bytes(fh, i))

    def _bytes(self, fh: Any, i: int) -> bytes:
        lo, hi = (int(v) for v in self.spans[i])
        fh.seek(lo)
        return fh.read(hi - lo)

    def _parse(self, i: int, raw: bytes) -> Example:
        where = f"{self.path}:{int(self.lines[i])}"
        record = parse_json_line(utf8_line(raw, where), where, JSONL_EXPECTED)
        example = example_from_record(where, int(self.lines[i]), record, self.columns)
        if self.system_prompt and not example.system:
            example = dataclasses.replace(example, system=self.system_prompt)
        return example

    def _check_unchanged(self) -> None:
        if _stamp(self._resolved) != self._stamp:
            raise DataError(f"{self.path} changed while it was in use (its size, times or inode); "
                            "restart the run so that it is read again")

    def subset(self, keep: np.ndarray) -> ExampleFile:
        """The examples at the positions ``keep`` (in that order)."""
        return ExampleFile(self.path, self.spans[keep], self.lines[keep], self.columns, self.system_prompt,
                           None, self._stamp)

    def with_system_prompt(self, system_prompt: str | None) -> ExampleFile:
        """These examples, each without a system prompt of its own given ``system_prompt``."""
        if not system_prompt:
            return self
        return ExampleFile(self.path, self.spans, self.lines, self.columns, system_prompt, self.key, self._stamp)

    def prompt_lengths(self, tokenizer: Any, measure: Callable[[Example], int],
                       track: Callable[[Iterable[Example], int, str], Iterable[Example]] | None = None) -> np.ndarray:
        """``measure(example)`` (a student prompt's token count) for every example, ``[N]`` int64: from the
        cache when this file, tokenizer and system prompt were measured before, else measured and saved.
        ``track(examples, total, label)`` may wrap the measuring pass (a progress bar)."""
        key = None
        if self.key is not None:
            key = digest([self.key, self.system_prompt, tokenizer_fingerprint(tokenizer), _versions()])
            cached = _load(_cache_path("lengths", key), lengths=(len(self),))
            if cached is not None:
                return cached["lengths"]
        examples: Iterable[Example] = self
        if track is not None:
            examples = track(self, len(self), f"Measuring {len(self):,} student prompts (once per data file)")
        lengths = np.fromiter((measure(e) for e in examples), dtype=np.int64, count=len(self))
        if key is not None:
            _save(_cache_path("lengths", key), lengths=lengths)
        return lengths


def open_example_file(path: str | Path, columns: Columns | None = None, limit: int | None = None,
                      system_prompt: str | None = None) -> ExampleFile:
    """The examples of the JSON-lines file ``path``, indexed (from the cache, or by one checking pass)."""
    path = Path(path).expanduser()
    columns = columns or Columns()
    stamp = _stamp(path)
    key = digest([FORMAT, str(path.resolve()), *stamp, dataclasses.asdict(columns), limit])
    cached = _load(_cache_path("index", key), spans=(-1, 2), lines=(-1,))
    if cached is not None and len(cached["spans"]) == len(cached["lines"]):
        spans, lines = cached["spans"], cached["lines"]
    else:
        spans, lines = _index(path, columns, limit)
        _save(_cache_path("index", key), spans=spans, lines=lines)
    if not len(lines):
        raise DataError(f"{path}: no examples found")
    return ExampleFile(path, spans, lines, columns, system_prompt, key, stamp)


def _index(path: Path, columns: Columns, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the file: every record checked as :func:`load_data` checks it (``checked_examples``),
    its byte range and line number kept, the example itself not."""
    spans: list[tuple[int, int]] = []
    lines: list[int] = []

    def records(fh: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            where = f"{path}:{lineno}"
            text = utf8_line(raw, where)
            if text.strip():
                spans.append((start, offset))
                lines.append(lineno)
                yield where, parse_json_line(text, where, JSONL_EXPECTED)

    with path.open("rb") as fh:
        for _ in checked_examples(records(fh), columns, limit):
            pass
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2), np.asarray(lines, dtype=np.int64)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what decides a prompt's token count: the vocabulary and merges (a fast tokenizer's
    whole definition), the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return digest([type(tokenizer).__name__, len(tokenizer), getattr(tokenizer, "chat_template", None) or "",
                    str(getattr(tokenizer, "special_tokens_map", {})), definition])


def _versions() -> list[str]:
    """The packages that render and tokenize a prompt: an upgrade may count its tokens differently."""
    return package_versions(("unisd-core", "transformers", "tokenizers", "jinja2"))


def _stamp(path: Path) -> tuple[int, ...]:
    """What tells a file's versions apart without reading it: size, modification and change times (the
    change time cannot be set back by tools that keep a modification time), inode and device."""
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror})") from None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def _cache_path(kind: str, key: str) -> Path:
    return cache_dir() / "data-index" / f"{kind}-{key}.npz"


def _load(path: Path, **shapes: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """A saved index, or None when there is none or it cannot be read (it is then rebuilt). ``shapes``
    names each array and its shape (-1: any length); a file whose arrays differ counts as unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in shapes}
    except Exception:  # noqa: BLE001 (a damaged cache file, whatever numpy or zipfile raise, is rebuilt)
        return None
    for name, shape in shapes.items():
        array = arrays[name]
        if array.dtype != np.int64 or array.ndim != len(shape) or any(
                want not in (-1, have) for want, have in zip(shape, array.shape, strict=True)):
            return None
    return arrays


def _save(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically; a cache that cannot be written (read-only home) only costs the next start-up."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with contextlib.suppress(OSError):
        atomic.write_bytes(path, buffer.getvalue())
