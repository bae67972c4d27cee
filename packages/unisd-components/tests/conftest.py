"""Shared fixtures: a private cache directory, a tiny model directory and a --data file with negatives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests run with --import-mode=importlib: make the shared builders (components_testlib) importable.
sys.path.insert(0, str(Path(__file__).parent))

from unisd.testing import make_tiny_model_dir, toy_records, write_jsonl


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Caches (embeddings, induction, negatives) go to a per-test folder, never the user's."""
    monkeypatch.setenv("UNISD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def records_with_negatives(n: int = 6) -> list[dict]:
    records = toy_records(n)
    for i, r in enumerate(records):
        if i != n - 1:  # the last one has none: it must be reported, not dropped
            r["meta"]["negative_reference"] = str(int(r["reference"]) + 1)
    return records


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", records_with_negatives())
