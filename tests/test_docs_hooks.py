"""Meta-test: every plugin hook and Component method is documented in docs/plugin-hooks.md and tested.

A hook of ``unisd.hookspecs`` or a method of ``unisd.components.COMPONENT_METHODS`` must have a
heading in the doc with its exact signature, and some test (other than this file) must implement
or call it.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from unisd import hookspecs
from unisd.components import COMPONENT_METHODS, ComponentHooks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugin-hooks.md"
HOOKS = sorted(name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, "unisd_spec"))
# The documented signature of each Component method, read from the typed protocol (self left out).
METHOD_SIGNATURES = {
    name: f"{name}({', '.join(list(inspect.signature(getattr(ComponentHooks, name)).parameters)[1:])})"
    for name in COMPONENT_METHODS
}


def headings() -> list[str]:
    return [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def _test_sources() -> dict[Path, str]:
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("packages/*/tests/**/*.py")]
    return {p: p.read_text(encoding="utf-8") for p in files if p.resolve() != Path(__file__).resolve()}


def used_in_tests(name: str) -> list[Path]:
    pattern = re.compile(rf"(def\s+{name}\s*\(|\.{name}\s*\()")
    return [p for p, text in _test_sources().items() if pattern.search(text)]


def test_there_is_something_to_check():
    assert {"register_components", "register_commands"} <= set(HOOKS)
    assert METHOD_SIGNATURES["setup"] == "setup(run)"
    assert METHOD_SIGNATURES["transform_divergence"] == "transform_divergence(div, batch)"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    signature = f"`{hook}({params})`"
    assert any(signature in h for h in headings()), f"docs/plugin-hooks.md needs a heading with {signature}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    assert used_in_tests(hook), f"no test implements or calls the hook {hook}"


@pytest.mark.parametrize("method", COMPONENT_METHODS)
def test_component_method_is_documented(method):
    signature = f"`{METHOD_SIGNATURES[method]}`"
    assert any(signature in h for h in headings()), f"docs/plugin-hooks.md needs a heading with {signature}"


@pytest.mark.parametrize("method", COMPONENT_METHODS)
def test_component_method_is_exercised_by_a_test(method):
    assert used_in_tests(method), f"no test calls the Component method {method}"


def test_doc_python_examples_compile():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert blocks
    for i, block in enumerate(blocks):
        compile(block, f"{DOC.name}[python block {i}]", "exec")
