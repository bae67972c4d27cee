"""The shuffled-reference control (issue 14, point 5): the teacher sees another example's reference."""

from __future__ import annotations

import random

import pytest

from unisd.config import RunConfig
from unisd.data.controls import shuffle_references
from unisd.data.tasks import Example
from unisd.errors import ConfigError, DataError
from unisd.io.reporting import Reporter
from unisd.plugins import get_plugin_manager
from unisd.run import build_run


def examples(refs):
    return [Example(f"e{i}", f"question {i}", ref, {"k": i}) for i, ref in enumerate(refs)]


@pytest.mark.parametrize("seed", range(25))
def test_no_example_keeps_its_own_reference_even_with_duplicates(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 40)
    # few distinct texts, so duplicates are common (but no text is the majority)
    refs = [f"ref{rng.randint(0, max(1, n // 3))}" for _ in range(n)]
    if max(refs.count(r) for r in refs) * 2 > n:
        refs = [f"unique{i}" for i in range(n)]
    out = shuffle_references(examples(refs), seed)
    assert sorted(e.reference for e in out) == sorted(refs)  # a permutation: every reference used once
    for before, after in zip(examples(refs), out, strict=True):
        assert after.reference != before.reference
        assert (after.id, after.prompt, after.meta) == (before.id, before.prompt, before.meta)


def test_deterministic_per_seed_and_different_across_seeds():
    refs = [f"r{i}" for i in range(30)]
    a = [e.reference for e in shuffle_references(examples(refs), 1)]
    assert a == [e.reference for e in shuffle_references(examples(refs), 1)]
    assert a != [e.reference for e in shuffle_references(examples(refs), 2)]


def test_impossible_inputs_are_data_errors():
    with pytest.raises(DataError, match="at least 2"):
        shuffle_references(examples(["only"]), 0)
    with pytest.raises(DataError, match="same reference"):
        shuffle_references(examples(["x", "x", "x"]), 0)


def test_the_run_trains_on_shuffled_references(tiny_llama, toy_data):
    pm = get_plugin_manager(load_entry_points=False)
    plain = build_run(RunConfig(model=str(tiny_llama), data=str(toy_data)), pm, Reporter(), None)
    control = build_run(RunConfig(model=str(tiny_llama), data=str(toy_data), reference_control="shuffled"),
                        pm, Reporter(), None)
    own = {e.id: e.reference for e in plain.examples}
    assert [e.prompt for e in control.examples] == [e.prompt for e in plain.examples]
    assert all(e.reference != own[e.id] for e in control.examples)
    # the teacher prompt carries the other example's reference, not its own
    for e in control.examples:
        text = plain.tokenizer.decode(control.teacher_ids(e))
        assert e.reference in text and own[e.id] not in text


def test_unknown_control_is_a_config_error():
    with pytest.raises(ConfigError, match="reference-control"):
        RunConfig(reference_control="reversed").validate()


def test_the_startup_summary_names_the_control():
    from unisd.io.reporting import startup_summary

    text = startup_summary("m", 1, 10, 8, RunConfig(data="d.jsonl", reference_control="shuffled"), [], "out")
    assert "Data: d.jsonl (control: shuffled references), 8 examples" in text
    assert "control" not in startup_summary("m", 1, 10, 8, RunConfig(data="d.jsonl"), [], "out")


def test_a_library_run_with_a_preset_trains_the_presets_components(tiny_llama, toy_data):
    from unisd.components import Preset

    class Marker:
        name = "marker"

        def __init__(self, options=None):
            self.options = options

    pm = get_plugin_manager(load_entry_points=False)
    pm.registries.components.register("marker", Marker, provider="test")
    pm.registries.presets.register("marked", Preset("marked", {"marker": {}}), provider="test")
    run = build_run(RunConfig(model=str(tiny_llama), data=str(toy_data), preset="marked"), pm, Reporter(), None)
    assert [c.name for c in run.components] == ["marker"]
    assert run.config.components == {"marker": {}}


def test_config_toml_records_every_component_option_typed(tiny_llama, toy_data, tmp_path):
    from typer.testing import CliRunner

    from unisd.cli.app import make_app
    from unisd.config import read_toml

    pytest.importorskip("unisd_components")
    out = tmp_path / "run"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(toy_data), "--steps", "1", "--batch-size", "2",
        "--grad-accum", "1", "--max-new-tokens", "4", "--output", str(out), "--with", "clip", "-o", "clip.max_value=5",
        "--with", "ema"])
    assert result.exit_code == 0, result.output
    saved = read_toml(out / "config.toml")["components"]
    assert saved["clip"] == {"max_value": 5.0}  # typed (not "5"); quantile is None: TOML has no null
    assert saved["ema"] == {"sync_steps": 10, "beta": 0.9}  # defaults written too
    resumed = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--resume", str(out), "--steps", "2", "--with", "clip", "-o", "clip.max_value=5.0", "--with", "ema"])
    assert resumed.exit_code == 0, resumed.output  # the same selection, said differently, is accepted
