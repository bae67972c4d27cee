"""Every registration hook, exercised by a throw-away plugin on a fresh plugin manager."""

from __future__ import annotations

from typing import ClassVar

import typer
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.components import Preset
from unisd.data.tasks import Example, Score, Task
from unisd.hookspecs import hookimpl
from unisd.plugins import get_plugin_manager


class EchoTask(Task):
    """A task that expects the prompt back."""

    name: ClassVar[str] = "echo-test"

    def load(self, split, path=None, limit=None):
        return [Example("e0", "say hi", "hi")]

    def score(self, example, completion):
        return Score(float(completion.strip() == example.reference))


class NullBackend:
    """A backend that never generates."""

    name: ClassVar[str] = "null-test"


class Marker:
    """A component with no methods at all (every Component method is optional)."""

    name: ClassVar[str] = "marker-test"


class TestPlugin:
    @hookimpl
    def register_components(self, register):
        register(Marker)

    @hookimpl
    def register_tasks(self, register):
        register(EchoTask)

    @hookimpl
    def register_backends(self, register):
        register(NullBackend)

    @hookimpl
    def register_presets(self, register):
        register(Preset("marker-preset", {"marker-test": {}}, help="just the marker"))

    @hookimpl
    def register_commands(self, app):
        @app.command("hello-test")
        def hello() -> None:
            typer.echo("hello from a plugin")


def test_every_hook_registers_and_unregistering_removes_it():
    pm = get_plugin_manager()
    plugin = TestPlugin()
    try:
        pm.register_plugin(plugin, "test-plugin", "tests")
        regs = pm.registries
        assert regs.components.get("marker-test") is Marker
        assert regs.tasks.get("echo-test") is EchoTask
        assert regs.backends.get("null-test") is NullBackend
        assert regs.presets.get("marker-preset").components == {"marker-test": {}}
        assert regs.components.entry("marker-test").provider == "tests"
        result = CliRunner().invoke(make_app(pm), ["hello-test"])
        assert result.exit_code == 0 and "hello from a plugin" in result.output
    finally:
        pm.unregister(plugin)
    assert not pm.is_registered(plugin)
    fresh = get_plugin_manager()
    assert "marker-test" not in fresh.registries.components and "echo-test" not in fresh.registries.tasks


def test_components_plugin_adds_the_cache_group_once():
    app = make_app(get_plugin_manager())
    groups = [g.name for g in app.registered_groups]
    assert groups.count("cache") == 1
    result = CliRunner().invoke(app, ["cache", "negatives", "--help"])
    assert result.exit_code == 0 and "--num-negatives" in result.output
