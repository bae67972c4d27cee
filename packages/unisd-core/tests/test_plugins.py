"""Plugin discovery: entry points, failures, duplicates, allow/deny lists, did-you-mean."""

import json

import pytest
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.errors import PluginConflictError, UnknownNameError
from unisd.hookspecs import hookimpl
from unisd.plugins import get_plugin_manager
from unisd.registry import Registry

GOOD_PLUGIN = """
from dataclasses import dataclass
from unisd.hookspecs import hookimpl

class Sharpen:
    \"\"\"A third-party test component.\"\"\"
    name = "sharpen"

    @dataclass
    class Options:
        amount: float = 1.0

    def __init__(self, options):
        self.options = options

@hookimpl
def register_components(register):
    register(Sharpen)
"""


def _plugins(pm):
    return {r.name: r for r in pm.reports}


def test_fake_third_party_distribution_is_listed(fake_dist):
    fake_dist("unisd-sharpen", "sharpen", "unisd_sharpen_plugin", GOOD_PLUGIN)
    pm = get_plugin_manager()
    assert _plugins(pm)["sharpen"].status == "loaded"
    assert _plugins(pm)["sharpen"].distribution == "unisd-sharpen"
    result = CliRunner().invoke(make_app(pm), ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    entry = next(c for c in data["components"] if c["name"] == "sharpen")
    assert entry["provider"] == "unisd-sharpen"
    assert entry["options"][0]["name"] == "amount"
    assert {t["name"] for t in data["tasks"]} >= {"demo"}
    assert {b["name"] for b in data["backends"]} >= {"hf"}


def test_broken_plugin_is_reported_not_fatal(fake_dist):
    fake_dist("unisd-broken", "broken", "unisd_broken_plugin", "raise ImportError('missing thing')\n")
    pm = get_plugin_manager()
    report = _plugins(pm)["broken"]
    assert report.status == "failed"
    assert "missing thing" in report.error
    data = json.loads(CliRunner().invoke(make_app(pm), ["plugins", "--json"]).output)
    assert any(p["name"] == "broken" and p["status"] == "failed" for p in data["plugins"])


def test_misspelt_hook_fails_only_that_plugin(fake_dist):
    fake_dist("unisd-typo", "typo", "unisd_typo_plugin",
              "from unisd.hookspecs import hookimpl\n@hookimpl\ndef register_componentz(register):\n    pass\n")
    pm = get_plugin_manager()
    assert _plugins(pm)["typo"].status == "failed"
    assert _plugins(pm)["core"].status == "loaded"


def test_hook_that_raises_marks_plugin_failed(fake_dist):
    fake_dist("unisd-raiser", "raiser", "unisd_raiser_plugin",
              "from unisd.hookspecs import hookimpl\n@hookimpl\ndef register_components(register):\n    raise RuntimeError('boom')\n")
    pm = get_plugin_manager()
    _ = pm.registries  # collecting runs the hooks
    assert _plugins(pm)["raiser"].status == "failed"
    assert "boom" in _plugins(pm)["raiser"].error


def test_duplicate_entry_point_names_both_distributions(fake_dist, tmp_path):
    fake_dist("unisd-first", "samename", "unisd_first_plugin", "x = 1\n")
    fake_dist("unisd-second", "samename", "unisd_second_plugin", "x = 2\n")
    pm = get_plugin_manager()
    dup = [r for r in pm.reports if r.status == "duplicate"]
    assert dup and "unisd-first" in dup[0].error and "unisd-second" in dup[0].error


def test_same_component_name_from_two_plugins_names_both():
    pm = get_plugin_manager(load_entry_points=False)

    class One:
        name = "dup"

    class Two:
        name = "dup"

    class P1:
        @hookimpl
        def register_components(self, register):
            register(One)

    class P2:
        @hookimpl
        def register_components(self, register):
            register(Two)

    pm.register_plugin(P1(), "p1", "dist-one")
    pm.register_plugin(P2(), "p2", "dist-two")
    with pytest.raises(PluginConflictError) as err:
        _ = pm.registries
    assert "dist-one" in str(err.value) and "dist-two" in str(err.value)


def test_allow_and_deny_lists(fake_dist, monkeypatch):
    fake_dist("unisd-sharpen", "sharpen", "unisd_sharpen_plugin", GOOD_PLUGIN)
    monkeypatch.setenv("UNISD_DISABLE_PLUGINS", "sharpen")
    pm = get_plugin_manager()
    assert _plugins(pm)["sharpen"].status == "disabled"
    assert "sharpen" not in pm.registries.components
    monkeypatch.delenv("UNISD_DISABLE_PLUGINS")
    monkeypatch.setenv("UNISD_LOAD_PLUGINS", "unisd-sharpen")  # distribution names work too
    pm = get_plugin_manager()
    assert "sharpen" in pm.registries.components
    assert all(r.status == "disabled" for r in pm.reports if r.name not in {"sharpen", "core"})
    assert "demo" in pm.registries.tasks  # built-ins are always there


def test_fresh_manager_each_time():
    a, b = get_plugin_manager(load_entry_points=False), get_plugin_manager(load_entry_points=False)
    assert a is not b
    a.register_plugin(object(), "extra", "x")
    assert "extra" not in {r.name for r in b.reports}


def test_registry_suggestions():
    reg = Registry("component")
    for name in ("agreement", "clip", "contrastive", "ema", "matching"):
        reg.register(name, object(), "t")
    with pytest.raises(UnknownNameError) as err:
        reg.get("emma")
    assert str(err.value) == (
        "Unknown component 'emma'. Did you mean: ema? Available: agreement, clip, contrastive, ema, matching"
    )
    with pytest.raises(UnknownNameError) as err:
        reg.get("zzzzzz")
    assert "(is the plugin installed?)" in str(err.value)


def test_plugins_all_shows_what_the_plain_listing_leaves_out():
    pytest.importorskip("unisd_components")
    app = make_app(get_plugin_manager())
    plain = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "200"})
    full = CliRunner().invoke(app, ["plugins", "--all"], env={"COLUMNS": "200"})
    assert plain.exit_code == full.exit_code == 0
    assert "options: gamma=1.0, num_contexts=3" in plain.output
    assert "-o agreement.gamma=1.0 (float): Strength" in full.output  # every option, typed, with its help
    assert "-o agreement.stat=var (str, one of var|range)" in full.output
    assert "-o agreement.gamma" not in plain.output
    assert "splits:" in full.output and "splits:" not in plain.output
    assert "unisd-components" in full.output.split("plugins")[-1]  # every plugin and its distribution
    assert full.output != plain.output


def test_names_differing_in_underscore_and_dash_find_one_entry():
    reg = Registry("preset")
    reg.register("unisd-star", "star", provider="p")
    reg.register("match_joint", "joint", provider="p")
    assert reg.get("unisd_star") == "star" and reg.get("match-joint") == "joint"
    assert "unisd_star" in reg and "unisd-star" in reg and "unisd star" not in reg
    assert reg.names() == ["match_joint", "unisd-star"]  # listed once, under the registered name
    with pytest.raises(UnknownNameError):
        reg.get("unisd-sta")


def test_components_are_called_through_the_protocol_helpers():
    from unisd.components import attribute, call_each, implements

    class Weights:
        name = "w"
        distill_weight = 0.5

        def token_weights(self, scores, batch):
            return ("weights", scores, batch)

    class Bare:
        name = "bare"
        token_weights = "not callable"

    comps = [Weights(), Bare()]
    assert call_each(comps, "token_weights", 1, 2) == [("weights", 1, 2)]
    assert implements(comps[0], "token_weights") and not implements(comps[1], "token_weights")
    assert [attribute(c, "distill_weight") for c in comps] == [0.5, 1.0]
    assert attribute(comps[1], "inactive_hint") == ""
    with pytest.raises(ValueError, match="not a component method"):
        implements(comps[0], "token_weight")
    with pytest.raises(KeyError):
        attribute(comps[0], "no_such_attribute")


def test_a_preset_whose_component_is_disabled_is_marked_unavailable(monkeypatch):
    pytest.importorskip("unisd_components")
    monkeypatch.setenv("UNISD_DISABLE_PLUGINS", "ema")
    app = make_app(get_plugin_manager())
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    presets = {p["name"]: p for p in json.loads(result.output)["presets"]}
    assert presets["ema"]["status"] == "unavailable" and presets["ema"]["missing"] == ["ema"]
    assert presets["clip"]["status"] == "loaded" and "missing" not in presets["clip"]
    table = CliRunner().invoke(app, ["plugins"], terminal_width=200)
    assert "unavailable: needs ema" in table.output
    monkeypatch.delenv("UNISD_DISABLE_PLUGINS")
    listed = CliRunner().invoke(make_app(get_plugin_manager()), ["plugins", "--json"])
    assert {p["status"] for p in json.loads(listed.output)["presets"]} == {"loaded"}
