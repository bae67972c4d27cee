"""The table of `unisd train` flags: every run setting it names exists, values convert, and flags not
given leave the --config file's values alone."""

from __future__ import annotations

import dataclasses
import inspect

import typer

from unisd.cli.train_flags import TRAIN_FLAGS, Flag, declare_flags, run_settings
from unisd.config import RunConfig


def _not_given() -> dict:
    return {f.name: None for f in TRAIN_FLAGS}


def test_every_flag_sets_a_real_run_setting_once():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    settings = [f.setting for f in TRAIN_FLAGS if f.setting is not None]
    assert set(settings) <= fields, set(settings) - fields
    assert len(settings) == len(set(settings))
    assert len({f.name for f in TRAIN_FLAGS}) == len(TRAIN_FLAGS)


def test_values_convert_and_unset_flags_are_left_out(tmp_path):
    values = _not_given() | {"data_split": "test", "lora_target_modules": " q_proj, v_proj ,", "steps": 3,
                             "output": tmp_path / "run", "report_to": (), "with_": ["ema"]}
    assert run_settings(TRAIN_FLAGS, values) == {
        "split": "test", "lora_target_modules": ["q_proj", "v_proj"], "steps": 3, "output": str(tmp_path / "run"),
    }  # an empty --report-to list is "not given", --with is not a run setting


def test_a_local_data_path_is_normalised_and_a_hub_id_kept(tmp_path, monkeypatch):
    (tmp_path / "x.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    assert run_settings(TRAIN_FLAGS, _not_given() | {"data": "./x.jsonl"}) == {"data": "x.jsonl"}
    assert run_settings(TRAIN_FLAGS, _not_given() | {"data": "./owner/name"}) == {"data": "./owner/name"}


def test_declare_flags_gives_typer_one_parameter_per_flag_in_order():
    flags = (Flag.run("steps", int, "--steps", help="n"), Flag("resume", str, typer.Option(None, "--resume")))

    @declare_flags(flags)
    def command(ctx: typer.Context, **values):
        return values

    params = inspect.signature(command).parameters
    assert list(params) == ["ctx", "steps", "resume"]
    assert params["steps"].annotation is int and command.__annotations__["resume"] is str
    assert command(None, steps=2, resume=None) == {"steps": 2, "resume": None}
