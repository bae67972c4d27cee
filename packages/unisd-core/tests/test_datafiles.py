"""`--data` beyond JSONL (issue 16, point 3): formats, dataset folders, Hub ids, column mapping, chat records."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.config import RunConfig
from unisd.data.datafiles import Columns, load_data
from unisd.errors import DataError
from unisd.io.reporting import Reporter
from unisd.plugins import get_plugin_manager
from unisd.run import build_run

ROWS = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(5)]


def as_tuples(examples):
    return [(e.id, e.prompt, e.reference, e.system) for e in examples]


EXPECTED = [(r["id"], r["prompt"], r["reference"], None) for r in ROWS]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_rows(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_gives_the_same_examples(tmp_path, suffix):
    path = write_rows(tmp_path / f"train{suffix}", ROWS)
    assert as_tuples(load_data(path)) == EXPECTED
    assert as_tuples(load_data(path, limit=2)) == EXPECTED[:2]


def test_column_mapping_and_default_ids(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["reference"]} for r in ROWS]
    path = write_rows(tmp_path / "qa.csv", rows)
    examples = load_data(path, columns=Columns(prompt="question", reference="answer"))
    assert [(e.prompt, e.reference) for e in examples] == [(r["prompt"], r["reference"]) for r in ROWS]
    assert [e.id for e in examples] == ["1", "2", "3", "4", "5"]
    with pytest.raises(DataError, match=r"row 1: no field 'prompt'.*this record has 'question', 'answer'.*--prompt-column"):
        load_data(path)


def chat(i, system=True, extra_user=False):
    messages = [{"role": "system", "content": "Answer with a number."}] if system else []
    messages.append({"role": "user", "content": f"What is {i} + {i}?"})
    if extra_user:
        messages += [{"role": "assistant", "content": "Hm?"}, {"role": "user", "content": "Again."}]
    messages.append({"role": "assistant", "content": str(2 * i)})
    return {"messages": messages}


def test_chat_records_give_prompt_reference_and_system(tmp_path):
    path = write_rows(tmp_path / "chat.jsonl", [chat(1), chat(2, system=False)])
    examples = load_data(path, system_prompt="Be brief.")
    assert as_tuples(examples) == [("1", "What is 1 + 1?", "2", "Answer with a number."),
                                   ("2", "What is 2 + 2?", "4", "Be brief.")]  # --system-prompt fills the gap only
    # a reference column wins over the final assistant turn
    rows = [dict(chat(1), gold="TWO")]
    assert load_data(write_rows(tmp_path / "gold.jsonl", rows), columns=Columns(reference="gold"))[0].reference == "TWO"


@pytest.mark.parametrize("record, message", [
    (chat(1, extra_user=True), r"one user turn .* got roles \['system', 'user', 'assistant', 'user', 'assistant'\]"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"field 'reference' must be a non-empty string"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"role \(system, user or assistant\)"),
    ({"messages": "hello"}, r"must be a list"),
])
def test_bad_chat_records_name_the_record(tmp_path, record, message):
    path = write_rows(tmp_path / "bad.jsonl", [chat(1), record])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        load_data(path)


def test_dataset_folders_in_hub_layout_and_saved_to_disk(tmp_path):
    import datasets

    hub = tmp_path / "hub-layout"
    (hub / "data").mkdir(parents=True)
    write_rows(hub / "data" / "train-00000-of-00001.parquet", [chat(i) for i in range(3)])
    write_rows(hub / "data" / "test-00000-of-00001.parquet", [chat(i) for i in range(7, 9)])
    assert [e.reference for e in load_data(hub)] == ["0", "2", "4"]
    assert [e.reference for e in load_data(hub, split="test")] == ["14", "16"]
    assert {e.system for e in load_data(hub)} == {"Answer with a number."}

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "validation": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(saved))
    assert as_tuples(load_data(saved, split="validation")) == EXPECTED[:2]
    with pytest.raises(DataError, match="no split 'dev' .*train, validation.*--data-split"):
        load_data(saved, split="dev")


def test_hub_ids_go_to_datasets_and_failures_are_clear(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "owner/missing":
            raise ConnectionError("Couldn't reach 'owner/missing' on the Hub (LocalEntryNotFoundError)\nmore")
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert as_tuples(load_data("owner/name:cfg", split="test")) == EXPECTED
    assert calls == [("owner/name", "cfg", "test")]
    with pytest.raises(DataError, match=r"--data owner/missing: could not load split 'train' of the Hub dataset "
                                        r"'owner/missing': Couldn't reach .*offline, download it first"):
        load_data("owner/missing")
    with pytest.raises(DataError, match="no such data file or directory"):
        load_data("missing.jsonl")


def test_the_system_prompt_reaches_student_and_teacher_prompts(tiny_llama, tmp_path):
    path = write_rows(tmp_path / "chat.jsonl", [chat(i) for i in range(4)])
    run = build_run(RunConfig(model=str(tiny_llama), data=str(path)), get_plugin_manager(load_entry_points=False),
                    Reporter(), None)
    ex = run.examples[0]
    student = run.tokenizer.decode(run.student_ids(ex))
    teacher = run.tokenizer.decode(run.teacher_ids(ex))
    assert "Answer with a number." in student and "Answer with a number." in teacher
    assert student.index("Answer with a number.") < student.index("What is 0 + 0?")


def test_cli_trains_on_a_mapped_csv_with_a_system_prompt(tiny_llama, tmp_path):
    rows = [{"question": r["prompt"], "answer": r["reference"]} for r in ROWS]
    path = write_rows(tmp_path / "qa.csv", rows)
    out = tmp_path / "run"
    result = CliRunner().invoke(make_app(get_plugin_manager(load_entry_points=False)), [
        "train", "--model", str(tiny_llama), "--data", str(path), "--prompt-column", "question",
        "--reference-column", "answer", "--system-prompt", "Be brief.", "--steps", "1", "--batch-size", "2",
        "--grad-accum", "1", "--max-new-tokens", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    config = (out / "config.toml").read_text()
    assert 'prompt_column = "question"' in config and 'system_prompt = "Be brief."' in config
    bad = CliRunner().invoke(make_app(get_plugin_manager(load_entry_points=False)), [
        "train", "--model", str(tiny_llama), "--data", str(path), "--steps", "1", "--output", str(tmp_path / "r2")])
    assert bad.exit_code == 2
    assert "no field 'prompt'" in bad.output and "--prompt-column" in bad.output
