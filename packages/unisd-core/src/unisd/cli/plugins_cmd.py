"""``unisd plugins``: what is installed — components, tasks, backends, presets — and from where."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ..components import describe_options
from ..plugins import UnisdPluginManager
from ..recipes import describe_recipes
from .errors import cli_errors


def _first_line(obj: Any) -> str:
    text = getattr(obj, "description", "") or (obj.__doc__ or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def inventory(pm: UnisdPluginManager, show_all: bool = False) -> dict[str, Any]:
    """Everything ``unisd plugins --json`` prints, as plain data."""
    regs = pm.registries
    reports = [r for r in pm.reports if show_all or r.status != "disabled"]
    return {
        "plugins": [
            {"name": r.name, "distribution": r.distribution, "status": r.status, "error": r.error, "module": r.module}
            for r in reports
        ],
        "components": [
            {"name": e.name, "provider": e.provider, "status": "loaded", "description": _first_line(e.item),
             "options": describe_options(e.item)}
            for e in regs.components.entries()
        ],
        "tasks": [
            {"name": e.name, "provider": e.provider, "status": "loaded", "description": _first_line(e.item),
             "splits": list(getattr(e.item, "splits", ())), "trainable": getattr(e.item, "train_split", "train") is not None}
            for e in regs.tasks.entries()
        ],
        "backends": [
            {"name": e.name, "provider": e.provider, "status": "loaded", "description": _first_line(e.item)}
            for e in regs.backends.entries()
        ],
        "presets": [
            {"name": e.name, "provider": e.provider, **preset_status(e.item.components, regs.components.names()),
             "description": e.item.help, "components": {k: dict(v) for k, v in e.item.components.items()},
             "run": dict(e.item.run)}
            for e in regs.presets.entries()
        ],
        "recipes": describe_recipes(),
    }


def preset_status(components: Any, installed: list[str]) -> dict[str, Any]:
    """``loaded``, or ``unavailable`` with the ``missing`` components (not installed, or their plugin
    disabled by ``UNISD_DISABLE_PLUGINS``): such a preset is listed, but training with it fails."""
    missing = [name for name in components if name not in installed]
    return {"status": "unavailable", "missing": missing} if missing else {"status": "loaded"}


def settings_text(values: dict[str, Any]) -> str:
    """``batch_size=2, alpha=0.0``; ``(defaults)`` when there are none, so an empty run is visible too."""
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(defaults)"


def short_options(options: list[dict[str, Any]]) -> str:
    """``gamma=1.0, num_contexts=3``: each option's default, the plain listing."""
    return ", ".join(f"{o['name']}={o['default']}" for o in options)


def option_text(option: dict[str, Any]) -> str:
    """``gamma=1.0 (float): Strength ...``, with the choices where there are some: the ``--all`` listing."""
    choices = f", one of {'|'.join(map(str, option['choices']))}" if option.get("choices") else ""
    return f"{option['name']}={option['default']} ({option['type']}{choices}): {option['help']}"


def components_text(components: dict[str, dict[str, Any]]) -> str:
    """``ema(beta=0.98), contrastive``: a preset's components and the options it sets."""
    return ", ".join(f"{name}({settings_text(opts)})" if opts else name for name, opts in components.items()) or "none"


def recipe_text(recipe: dict[str, Any]) -> str:
    """One recipe's settings: those for every task, then the per-task ones and the tasks it swaps."""
    parts = [f"every task: {settings_text(recipe['run'])}"]
    parts += [f"{task}: {settings_text(values)}" for task, values in recipe["per_task"].items()]
    parts += [f"{task}: trains {other}" for task, other in recipe["tasks"].items()]
    return "; ".join(parts)


def row_description(kind: str, row: dict[str, Any], show_all: bool) -> str:
    """One row's description, with what each kind adds under it (dimmed); ``--all`` adds more."""
    desc = row["description"]
    if kind == "components" and row["options"]:
        if show_all:  # every option with its type, choices and help
            desc += "".join(f"\n[dim]-o {row['name']}.{option_text(o)}[/]" for o in row["options"])
        else:
            desc += f"\n[dim]options: {short_options(row['options'])}[/]"
    if kind == "tasks" and show_all:
        splits = ", ".join(row["splits"]) or "?"
        desc += f"\n[dim]splits: {splits}; {'trains and evaluates' if row['trainable'] else 'evaluation only'}[/]"
    if kind == "presets":
        desc = f"{desc}\n[dim]components: {components_text(row['components'])}; run: {settings_text(row['run'])}[/]" \
            if show_all else f"{desc}\n[dim]run: {settings_text(row['run'])}[/]"
        if row["status"] == "unavailable":
            desc += f"\n[yellow]unavailable: needs {', '.join(row['missing'])} (not installed, or its plugin disabled)[/]"
    return desc


def kind_table(kind: str, rows: list[dict[str, Any]], show_all: bool) -> Table:
    """The table of one kind of entry: components, tasks, backends or presets."""
    table = Table(title=kind, title_justify="left")
    for col in ("name", "provider", "description"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["provider"], row_description(kind, row, show_all))
    return table


def recipes_table(recipes: list[dict[str, Any]]) -> Table:
    """The recipes, each with its settings under its description."""
    table = Table(title="recipes (--recipe NAME)", title_justify="left")
    for col in ("name", "description"):
        table.add_column(col)
    for row in recipes:
        table.add_row(row["name"], f"{row['description']}\n[dim]{recipe_text(row)}[/]")
    return table


def plugins_table(plugins: list[dict[str, Any]], show_all: bool) -> Table | None:
    """Plain: only the plugins with a problem (None when there is none). --all: every plugin, where it
    comes from and its status."""
    problems = plugins if show_all else [p for p in plugins if p["status"] != "loaded"]
    if not problems:
        return None
    table = Table(title="plugins" if show_all else "plugins not loaded", title_justify="left")
    for col in ("name", "distribution", "status", "error"):
        table.add_column(col)
    for p in problems:
        table.add_row(p["name"], p["distribution"], p["status"], p["error"] or "")
    return table


def register(app: typer.Typer, pm: UnisdPluginManager) -> None:
    @app.command("plugins")
    def plugins_command(
        show_all: bool = typer.Option(False, "--all", help="Every option with its type and help, task splits, preset "
                                      "components, and every plugin (disabled ones too) with its distribution."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        """List installed plugins: components, tasks, backends and presets, with provider and status."""
        with cli_errors():
            data = inventory(pm, show_all)
        if as_json:
            typer.echo(json.dumps(data, indent=2, default=str))
            return
        console = Console()
        for kind in ("components", "tasks", "backends", "presets"):
            console.print(kind_table(kind, data[kind], show_all))
        console.print(recipes_table(data["recipes"]))
        problems = plugins_table(data["plugins"], show_all)
        if problems is not None:
            console.print(problems)
