"""`unisd train --help` shows defaults and readable metavars; the LoRA flags reach the adapter."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.plugins import get_plugin_manager


def _train(args):
    return CliRunner().invoke(make_app(get_plugin_manager()), ["train", *args])


def test_help_shows_defaults_and_plain_metavars():
    result = CliRunner().invoke(make_app(get_plugin_manager()), ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = result.output
    for fragment in ("--steps N", "[default: 100]", "--batch-size N", "[default: 4]", "[default: 2e-05]",
                     "--lora-r R", "[default: 64]", "--lora-target-modules NAMES", "-o, --option NAME.KEY=VALUE",
                     "--with COMPONENT", "about 8 minutes"):
        assert fragment in text, fragment
    assert "<" not in text.replace("<=", "")  # no <list[str]> / <int> metavars


def test_lora_flags_reach_the_adapter(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "run"
    result = _train(["--model", str(tiny_llama), "--data", str(toy_data), "--steps", "1", "--output", str(out),
                     "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--lora-r", "4",
                     "--lora-alpha", "8", "--lora-dropout", "0.0", "--lora-target-modules", "q_proj, v_proj"])
    assert result.exit_code == 0, result.output
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["lora_dropout"] == 0.0
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("args, message", [
    (["--lora-r", "0"], "--lora-r must be ≥ 1"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--lora-target-modules", "qkv"], "no module named qkv"),
])
def test_bad_lora_flags_are_one_clear_error(args, message, tiny_llama, toy_data, tmp_path):
    result = _train(["--model", str(tiny_llama), "--data", str(toy_data), "--steps", "1",
                     "--output", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
