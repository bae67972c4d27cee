"""Which module may import which (issue 15): read from the sources with ``ast``, so a violation fails here.

* mechanism and plugin packages do not reach into the parallel machinery (``unisd.parallel``: they use
  :mod:`unisd.runtime`) or the CLI's internals (``unisd.cli``: they use :mod:`unisd.commands`);
* the run configuration does not import the component machinery;
* the divergence math (``unisd.divergence.chunk_math``) imports nothing of unisd;
* the core's module-level imports form no circle, between modules nor between its folders (``data``,
  ``divergence``, ``model``, ``parallel``, ``io``, ``evaluation``, ``ops``, ``cli``; each top-level module
  counts as its own).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "packages" / "unisd-core" / "src" / "unisd"
PLUGIN_SOURCES = [ROOT / "packages" / p / "src" for p in ("unisd-components", "unisd-eval", "unisd-plugin-example")]


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, src: Path, top_level_only: bool = False) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as a and a.b), relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path, src).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*.py") if "egg-info" not in str(p))


@pytest.mark.parametrize("src", PLUGIN_SOURCES, ids=lambda p: p.parent.name)
def test_plugin_packages_use_the_public_runtime_and_commands(src):
    forbidden = ("unisd.parallel", "unisd.cli")
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in sources(src) for name in sorted(imports(p, src))
           if name.startswith(forbidden) and (name in forbidden or name.startswith(tuple(f + "." for f in forbidden)))]
    assert not bad, "\n".join(bad)


def test_configuration_does_not_import_the_component_machinery():
    names = imports(CORE / "config.py", CORE.parent)
    assert not {n for n in names if n.startswith(("unisd.components", "unisd.registry", "unisd.plugins"))}


def test_the_divergence_math_imports_nothing_of_unisd():
    names = imports(CORE / "divergence" / "chunk_math.py", CORE.parent)
    assert not {n for n in names if n == "unisd" or n.startswith("unisd.")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle in a module graph (``a -> b -> a``), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def core_graph() -> dict[str, set[str]]:
    """The core's modules and what each imports of them at module level."""
    modules = {module_name(p, CORE.parent): p for p in sources(CORE)}
    graph = {m: {n for n in imports(p, CORE.parent, top_level_only=True) if n in modules and n != m}
             for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a circle of concern
    return {m: {n for n in deps if m != n.rsplit(".", 1)[0]} for m, deps in graph.items()}


def folder_of(module: str) -> str:
    """``unisd.io.atomic`` -> ``unisd.io``; a top-level module (``unisd.loop``) stands for itself."""
    return ".".join(module.split(".")[:2])


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for m, deps in graph.items():
        folders.setdefault(folder_of(m), set()).update(folder_of(n) for n in deps)
    return {f: deps - {f} for f, deps in folders.items()}


def test_core_module_imports_form_no_circle():
    cycle = find_cycle(core_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_core_folders_import_each_other_in_no_circle():
    graph = folder_graph(core_graph())
    assert {"unisd.data", "unisd.divergence", "unisd.model", "unisd.parallel", "unisd.io", "unisd.evaluation",
            "unisd.loop", "unisd.step", "unisd.run"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle between folders: " + " -> ".join(cycle or [])


def test_the_checks_themselves_find_what_they_look_for(tmp_path):
    pkg = tmp_path / "mech"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from unisd.parallel import sharding\n    from . import b\n")
    assert {"unisd.parallel", "unisd.parallel.sharding", "mech", "mech.b"} <= imports(pkg / "a.py", tmp_path)
    assert imports(pkg / "a.py", tmp_path, top_level_only=True) == set()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # io.x -> model.y -> io.z is no circle of modules, but one of folders
    modules = {"unisd.io.x": {"unisd.model.y"}, "unisd.model.y": {"unisd.io.z"}, "unisd.io.z": set()}
    assert find_cycle(modules) is None
    assert find_cycle(folder_graph(modules)) == ["unisd.io", "unisd.model", "unisd.io"]
