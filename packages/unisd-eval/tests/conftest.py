"""Shared fixtures: the dataset fixtures written to disk, and a sandbox with short limits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests run with --import-mode=importlib: make the shared fixture rows (eval_fixtures) importable.
sys.path.insert(0, str(Path(__file__).parent))

from eval_fixtures import (  # noqa: E402
    COS_E,
    GPQA,
    GSM8K,
    HUMANEVAL,
    MBPP_FULL,
    MBPP_SANITIZED,
    MEDMCQA,
    SCIENCEQA,
    TOOLUSE,
    write_rows,
)

from unisd_eval.sandbox import Limits, Sandbox  # noqa: E402


@pytest.fixture
def data_files(tmp_path) -> dict[str, Path]:
    """Every fixture written to disk in the format a user would download."""
    return {
        "mbpp": write_rows(tmp_path / "mbpp_sanitized_test.jsonl", MBPP_SANITIZED),
        "mbpp-full": write_rows(tmp_path / "mbpp_full_train.json", MBPP_FULL),
        "humaneval": write_rows(tmp_path / "humaneval.jsonl", HUMANEVAL),
        "scienceqa": write_rows(tmp_path / "scienceqa_test.json", SCIENCEQA),
        "cos_e": write_rows(tmp_path / "cos_e_validation.jsonl", COS_E),
        "medmcqa": write_rows(tmp_path / "medmcqa_validation.jsonl", MEDMCQA),
        "gpqa": write_rows(tmp_path / "gpqa_main.csv", GPQA),
        "gsm8k": write_rows(tmp_path / "gsm8k_test.jsonl", GSM8K),
        "tooluse": write_rows(tmp_path / "toolalpaca_test.json", TOOLUSE),
    }


@pytest.fixture(scope="session")
def quick_sandbox() -> Sandbox:
    """A sandbox with short limits so failing programs cost little on a shared machine."""
    return Sandbox(Limits(timeout=5.0), workers=2)
