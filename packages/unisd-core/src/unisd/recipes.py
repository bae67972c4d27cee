"""Run-level settings that come from a name: a preset's own (per method) and a recipe's (per task).

The research code's experiment runner changed some run settings for every job and some per method
(unisd-method.md §6.2): prompts up to 3072 tokens and 1024 new tokens for every task, MBPP's full
training set, truncated completions masked for tool use, and a halved batch for UniSD*. They live in
two places because they vary along two axes:

* a **preset** (``Preset.run``) carries what the runner set *per method* — UniSD*'s halved batch;
* the **paper recipe** (``--recipe paper``) carries what it set for *every* method, per task (and the
  research trainer's loss reduction and JSD scale, which our defaults change on purpose). Putting
  those in each method preset would make a preset run and a plain run (or a plugin component) differ
  in budget as well as in method, could not say "full MBPP, but only for MBPP", and would silently turn
  the 24-token demo into a 1024-token run for anyone who picks a preset.

Precedence, later winning: RunConfig defaults < recipe < preset < ``--config`` file < flags.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError

PAPER = "paper"
RECIPES = (PAPER,)

# Every training job of the runner: --max_prompt_length 3072 --max_completion_length 1024; and the
# research trainer's loss arithmetic (§1.7, §1.5): a per-sequence mean, and the unscaled JSD at 0 < α < 1
# (the runner's α is 0, where the scale changes nothing, but a clip cap or weight then means the same).
PAPER_COMMON: dict[str, Any] = {"max_prompt_tokens": 3072, "max_new_tokens": 1024, "loss_reduction": "sequence",
                                "gjsd_scale": "research"}
# Per dataset: tooluse gets --mask_truncated_completions (mbpp's --mbpp_config full is a task, below).
PAPER_BY_TASK: dict[str, dict[str, Any]] = {"tooluse": {"mask_truncated": True}}
# The runner trained MBPP on the full config (374 rows), our "mbpp" task is the sanitized one (120).
PAPER_TASKS: dict[str, str] = {"mbpp": "mbpp-full"}


def check_recipe(recipe: str | None) -> None:
    """A ConfigError naming the choices for an unknown recipe (None, no recipe, is fine)."""
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got '{recipe}'")


def recipe_task(recipe: str | None, task: str | None) -> str | None:
    """The task the recipe trains for ``task``: the paper's MBPP is the full set (``mbpp-full``).

    Applied even to an explicit ``--task mbpp``: asking for the paper recipe asks for its training data.
    """
    check_recipe(recipe)
    return PAPER_TASKS.get(task or "", task) if recipe == PAPER else task


def recipe_settings(recipe: str | None, task: str | None) -> dict[str, Any]:
    """The run settings a recipe gives a run on ``task`` (empty without a recipe)."""
    check_recipe(recipe)
    if recipe != PAPER:
        return {}
    return {**PAPER_COMMON, **PAPER_BY_TASK.get(task or "", {})}


def named_run_settings(recipe: str | None, task: str | None, preset_run: Mapping[str, Any] | None) -> dict[str, Any]:
    """The recipe's settings for ``task``, then the preset's run settings over them."""
    return {**recipe_settings(recipe, task), **dict(preset_run or {})}


def apply_unless_set(cfg: Any, settings: Mapping[str, Any], explicit: Iterable[str]) -> None:
    """Set each of ``settings`` on ``cfg`` unless the user set that key explicitly (a flag or the file)."""
    given = set(explicit)
    for key, value in settings.items():
        if key not in given:
            setattr(cfg, key, value)


def describe_recipes() -> list[dict[str, Any]]:
    """Each recipe's settings, for ``unisd plugins`` and the README."""
    return [{
        "name": PAPER,
        "description": "the research runner's settings for every method (unisd-method.md §6.2)",
        "run": dict(PAPER_COMMON),
        "per_task": {name: dict(values) for name, values in PAPER_BY_TASK.items()},
        "tasks": dict(PAPER_TASKS),
    }]
