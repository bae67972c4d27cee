"""One entry point per mechanism (issue 15): any one of them can be left out with UNISD_DISABLE_PLUGINS."""

from importlib.metadata import entry_points

import pytest

from unisd.plugins import get_plugin_manager

MECHANISMS = {"agreement", "clip", "contrastive", "ema", "matching", "leak_guard"}


def ours() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="unisd")
            if ep.dist is not None and ep.dist.name == "unisd-components"}


def test_each_mechanism_is_its_own_entry_point():
    assert ours() == {**{m: f"unisd_components.{m}" for m in MECHANISMS}, "presets": "unisd_components.plugin"}


@pytest.mark.parametrize("left_out", sorted(MECHANISMS))
def test_disabling_one_mechanism_keeps_the_others(monkeypatch, left_out):
    monkeypatch.setenv("UNISD_DISABLE_PLUGINS", left_out)
    components = get_plugin_manager().registries.components
    expected = {m.replace("_", "-") for m in MECHANISMS}
    assert left_out.replace("_", "-") not in components
    assert all(name in components for name in expected - {left_out.replace("_", "-")})
