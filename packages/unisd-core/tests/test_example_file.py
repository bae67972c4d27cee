"""A JSON-lines --data file read lazily (issue 17): the same examples, errors and data order as reading it
whole, an index and prompt lengths cached on disk, and nothing per prompt held in memory."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from unisd.config import RunConfig
from unisd.data import example_file
from unisd.data.datafiles import Columns, load_data
from unisd.data.example_file import ExampleFile, open_example_file
from unisd.errors import DataError
from unisd.io.reporting import Reporter
from unisd.plugins import get_plugin_manager
from unisd.run import DataStream, build_run


def random_records(rng: random.Random, n: int) -> list[dict | str]:
    """Records of every shape the reader accepts, with blank lines between some of them."""
    out: list[dict | str] = []
    for i in range(n):
        kind = rng.choice(["plain", "plain", "chat", "id", "meta"])
        text = "".join(rng.choice("abcdé ✓\\\"\n") for _ in range(rng.randint(1, 30))).strip() or "x"
        if kind == "chat":
            messages = [{"role": "user", "content": f"q{i} {text}"}, {"role": "assistant", "content": f"a{i}"}]
            if rng.random() < 0.5:
                messages.insert(0, {"role": "system", "content": f"sys {i}"})
            out.append({"messages": messages})
        else:
            rec = {"prompt": f"q{i} {text}", "reference": f"a{i}"}
            if kind == "id":
                rec["id"] = f"custom-{i}"
            if kind == "meta":
                rec["meta"] = {"i": i, "tag": text}
            out.append(rec)
        if rng.random() < 0.2:
            out.append("")  # a blank line
    return out


def write(path, records) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((json.dumps(r, ensure_ascii=rng_bool(r)) if isinstance(r, dict) else r) + "\n")
    return str(path)


def rng_bool(record: dict) -> bool:
    return len(json.dumps(record)) % 2 == 0  # some lines escaped, some raw UTF-8


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [None, 7])
def test_the_lazy_file_holds_exactly_what_load_data_reads(tmp_path, seed, limit):
    path = write(tmp_path / "train.jsonl", random_records(random.Random(seed), 40))
    whole = load_data(path, limit=limit, system_prompt="Be brief.")
    lazy = open_example_file(path, limit=limit, system_prompt="Be brief.")
    assert isinstance(lazy, ExampleFile)
    assert len(lazy) == len(whole)
    assert list(lazy) == whole
    assert [lazy[i] for i in range(-len(lazy), 0)] == whole  # negative indexes
    assert lazy[2:5] == whole[2:5]
    with pytest.raises(IndexError):
        lazy[len(lazy)]
    again = open_example_file(path, limit=limit, system_prompt="Be brief.")  # from the cache this time
    assert list(again) == whole


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt": "a", "reference": "b"}', "{not json"], r"train.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "reference": "b", "id": 1}', '{"prompt": "c", "reference": "d", "id": 1}'],
     r"train.jsonl:2: duplicate id '1'"),
    (['{"prompt": "a"}'], r"train.jsonl:1: no field 'reference'"),
    (["[1, 2]"], r"train.jsonl:1: expected a JSON object"),
    (["", "   "], r"no examples found"),
])
def test_bad_records_are_the_same_errors_as_reading_whole(tmp_path, lines, message):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as whole:
        load_data(path)
    with pytest.raises(DataError, match=message) as lazy:
        open_example_file(path)
    assert str(lazy.value) == str(whole.value)


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "reference": "b"}\n{"prompt": "\xff", "reference": "b"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not UTF-8 text \(byte 0xff"):
        open_example_file(path)


def test_the_index_is_read_from_the_cache_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    write(path, [{"prompt": f"p{i}", "reference": f"r{i}"} for i in range(5)])
    calls = []
    real = example_file._index
    monkeypatch.setattr(example_file, "_index", lambda *a: calls.append(a) or real(*a))
    open_example_file(path)
    open_example_file(path)
    assert len(calls) == 1  # the second open read the saved index
    open_example_file(path, columns=Columns(prompt="prompt", reference="reference", messages="chat"))
    open_example_file(path, limit=3)
    assert len(calls) == 3  # other columns or limit: another index
    write(path, [{"prompt": f"new{i}", "reference": f"r{i}"} for i in range(6)])
    os.utime(path, ns=(1, 10**18))  # a new modification time even on coarse clocks
    fresh = open_example_file(path)
    assert len(calls) == 4 and [e.prompt for e in fresh] == [f"new{i}" for i in range(6)]


def test_a_file_changed_while_in_use_is_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    write(path, [{"prompt": f"p{i}", "reference": f"r{i}"} for i in range(3)])
    lazy = open_example_file(path)
    write(path, [{"prompt": "changed and longer", "reference": "r"} for _ in range(3)])
    with pytest.raises(DataError, match="changed while it was in use"):
        lazy[0]


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("UNISD_CACHE_DIR", str(blocked))
    path = write(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "reference": f"r{i}"} for i in range(3)])
    assert [e.prompt for e in open_example_file(path)] == ["p0", "p1", "p2"]
    assert list(open_example_file(path).prompt_lengths(FakeTokenizer(), lambda e: len(e.prompt))) == [2, 2, 2]


class FakeTokenizer:
    chat_template = "T"

    def __init__(self, vocab: int = 10):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self.vocab)}


def test_prompt_lengths_are_measured_once_per_file_tokenizer_and_system_prompt(tmp_path):
    path = write(tmp_path / "train.jsonl", [{"prompt": "p" * (i + 1), "reference": "r"} for i in range(6)])
    measured = []

    def measure(e):
        measured.append(e.id)
        return len(e.prompt) + len(e.system or "")

    def lengths(tokenizer, system=None):
        return list(open_example_file(path, system_prompt=system).prompt_lengths(tokenizer, measure))

    assert lengths(FakeTokenizer()) == [1, 2, 3, 4, 5, 6] and len(measured) == 6
    assert lengths(FakeTokenizer()) == [1, 2, 3, 4, 5, 6] and len(measured) == 6  # cached
    assert lengths(FakeTokenizer(vocab=11)) == [1, 2, 3, 4, 5, 6] and len(measured) == 12  # another tokenizer
    assert lengths(FakeTokenizer(), system="ab") == [3, 4, 5, 6, 7, 8] and len(measured) == 18
    shown = []
    lazy = open_example_file(path, system_prompt="abc")
    lazy.prompt_lengths(FakeTokenizer(), measure, lambda items, total, label: shown.append((total, label)) or items)
    assert shown == [(6, "Measuring 6 student prompts (once per data file)")]


def long_and_short(tmp_path):
    rng = random.Random(5)
    records = [{"prompt": " ".join(["word"] * rng.choice([2, 3, 200])), "reference": f"r{i}", "id": f"e{i}"}
               for i in range(30)]
    return write(tmp_path / "train.jsonl", records)


def run_on(model, data, **options):
    options.setdefault("max_prompt_tokens", 64)
    return build_run(RunConfig(model=str(model), data=data, **options),
                     get_plugin_manager(load_entry_points=False), Reporter(), None)


def test_a_run_on_a_jsonl_file_keeps_todays_examples_and_data_order(tiny_llama, tmp_path, monkeypatch):
    data = long_and_short(tmp_path)
    lazy_run = run_on(tiny_llama, data, seed=3)
    assert isinstance(lazy_run.examples, ExampleFile)
    assert not lazy_run._prompt_cache  # no prompt tokenised and kept at start-up
    # Today's reading: the whole file as a list, filtered by tokenising every prompt.
    monkeypatch.setattr("unisd.run.is_jsonl_file", lambda source: False)
    whole_run = run_on(tiny_llama, data, seed=3)
    assert isinstance(whole_run.examples, list)
    assert 0 < len(whole_run.examples) < 30  # the long prompts were left out
    assert list(lazy_run.examples) == whole_run.examples
    lazy, whole = DataStream(lazy_run.examples, 3), DataStream(whole_run.examples, 3)
    drawn = [e.id for e in lazy.take(70)]
    assert drawn == [e.id for e in whole.take(70)]
    resumed = DataStream(lazy_run.examples, 3, cursor=41)
    assert [e.id for e in resumed.take(29)] == drawn[41:]


def test_a_file_of_only_long_prompts_is_one_error(tiny_llama, tmp_path):
    data = write(tmp_path / "train.jsonl", [{"prompt": "word " * 300, "reference": "r"} for _ in range(3)])
    with pytest.raises(DataError, match="every student prompt is longer than max_prompt_tokens=64"):
        run_on(tiny_llama, data)


def test_lengths_agree_with_the_runs_own_tokenisation(tiny_llama, tmp_path):
    data = long_and_short(tmp_path)
    run = run_on(tiny_llama, data)
    whole = open_example_file(data)
    lengths = whole.prompt_lengths(run.tokenizer, lambda e: -1)  # measured by build_run: read from the cache
    assert np.array_equal(lengths, [len(run.encode_student(e)) for e in whole])
    assert {e.id for e in run.examples} == {e.id for e, n in zip(whole, lengths, strict=True) if n <= 64}


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "wrong-shape"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path, private_cache, damage):
    path = write(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "reference": f"r{i}"} for i in range(4)])
    open_example_file(path)
    (index,) = [f for f in (private_cache / "data-index").glob("index-*.npz")
                if f.stat().st_mtime >= os.stat(path).st_mtime]
    data = index.read_bytes()
    if damage == "truncate":
        index.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        index.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    elif damage == "garbage":
        index.write_bytes(b"not a zip file")
    else:
        np.savez(index, spans=np.zeros((4, 3), dtype=np.int64), lines=np.zeros(4, dtype=np.int64))
    assert [e.prompt for e in open_example_file(path)] == ["p0", "p1", "p2", "p3"]


def test_a_rewrite_that_keeps_size_and_modification_time_is_noticed(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "reference": "1"}\n{"prompt": "bbbb", "reference": "2"}\n')
    first = open_example_file(path)
    st = path.stat()
    path.write_text('{"prompt": "aaaa", "reference": "1"}\n{"prompt": "b", "reference": "2"}\n')  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p or rsync -a leave behind
    assert [e.prompt for e in open_example_file(path)] == ["aaaa", "b"]
    with pytest.raises(DataError, match="changed while it was in use"):
        first[0]
