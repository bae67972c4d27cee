"""The ``UNISD_*`` switches read their values one way, and ``environ_set`` gives the environment back."""

from __future__ import annotations

import os

import pytest

from unisd.errors import UsageError
from unisd.model import lean_decode, lean_forward, models, onednn
from unisd.switches import env_flag, environ_set


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), (" On ", True), ("YES", True),
                                            ("0", False), ("false", False), ("Off", False), ("no", False)])
def test_values(monkeypatch, value, expected):
    monkeypatch.setenv("UNISD_TEST_SWITCH", value)
    assert env_flag("UNISD_TEST_SWITCH", not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_the_default(monkeypatch, default):
    monkeypatch.delenv("UNISD_TEST_SWITCH", raising=False)
    assert env_flag("UNISD_TEST_SWITCH", default) is default
    monkeypatch.setenv("UNISD_TEST_SWITCH", " ")
    assert env_flag("UNISD_TEST_SWITCH", default) is default


def test_other_values_are_a_usage_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("UNISD_LEAN_DECODING", "maybe")
    with pytest.raises(UsageError, match="UNISD_LEAN_DECODING='maybe'.*1, true, on, yes.*0, false, off, no"):
        lean_decode.enabled()


def test_every_switch_reads_the_same_words(monkeypatch):
    """oneDNN, lean decoding and forward and the Hub kernels all take "off"/"on" (they used to parse three ways)."""
    for name, read in (("UNISD_ONEDNN", onednn.enabled), ("UNISD_LEAN_DECODING", lean_decode.enabled),
                       ("UNISD_LEAN_FORWARD", lean_forward.enabled), ("UNISD_HUB_KERNELS", models.hub_kernels_wanted)):
        monkeypatch.setenv(name, "off")
        assert read() is False, name
    monkeypatch.setenv("UNISD_HUB_KERNELS", "on")
    assert models.hub_kernels_wanted() is True


def test_environ_set_restores_a_value_or_its_absence(monkeypatch):
    monkeypatch.setenv("UNISD_TEST_A", "before")
    monkeypatch.delenv("UNISD_TEST_B", raising=False)
    with environ_set("UNISD_TEST_A", "inside"), environ_set("UNISD_TEST_B", "new"):
        assert os.environ["UNISD_TEST_A"] == "inside" and os.environ["UNISD_TEST_B"] == "new"
    assert os.environ["UNISD_TEST_A"] == "before" and "UNISD_TEST_B" not in os.environ
    with pytest.raises(RuntimeError), environ_set("UNISD_TEST_B", "x"):
        raise RuntimeError("boom")
    assert "UNISD_TEST_B" not in os.environ


def test_the_cli_checks_every_switch_before_any_command(monkeypatch):
    from typer.testing import CliRunner

    from unisd.cli.app import make_app
    from unisd.plugins import get_plugin_manager

    monkeypatch.setenv("UNISD_ONEDNN", "sometimes")
    result = CliRunner().invoke(make_app(get_plugin_manager()), ["plugins"])
    assert result.exit_code == 2
    assert "UNISD_ONEDNN='sometimes'" in result.output
    monkeypatch.setenv("UNISD_ONEDNN", "off")
    assert CliRunner().invoke(make_app(get_plugin_manager()), ["plugins"]).exit_code == 0
