"""The Component protocol and typed ``-o name.key=value`` options.

A component is one mechanism (EMA teacher, agreement weights, ...). It is a class with a ``name``,
an ``Options`` dataclass, and any of the methods of :class:`Component`; the loop calls the methods
that exist, in the fixed order documented in docs/plugin-hooks.md. Absent methods cost nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .errors import ConfigError, OptionError
from .registry import Registry
from .values import convert_value

if TYPE_CHECKING:  # the types hooks speak in; their modules import this one
    import torch

    from .data.tasks import Example
    from .model.scoring import Scores
    from .model.teacher import TeacherView
    from .run import Run
    from .step import StepBatch


@runtime_checkable
class Component(Protocol):
    """What the loop knows about a component. Every method is optional; only ``name`` is required.

    ``setup(run)``
        Once, after model, tokenizer and data exist (build caches, create an EMA adapter).
    ``inert_reason(run) -> str | None``
        After setup, before the first step: why the component cannot act in this configured run (the
        loop prints it as a warning), or None.
    ``teacher_contexts(example) -> dict[str, str]``
        Extra *named* teacher prompts (user-message text) for this example, e.g. ``agree/0``.
        The teacher scores the same completion under each. Set the class attribute
        ``context_temperature`` to score them at a temperature other than the run's.
    ``teacher(run) -> TeacherView``
        The weights the teacher uses. At most one selected component may provide it.
    ``transform_divergence(div, batch) -> div``
        Change the per-token divergence ``[B, C]`` (e.g. clip it).
    ``token_weights(scores, batch) -> Tensor``
        Per-token weights ``[B, C]``; weights of all components are multiplied.
    ``extra_losses(scores, batch) -> dict[str, Tensor]``
        Per-token loss terms ``[B, C]``, already multiplied by the component's own weight; the loop
        sums them over loss tokens and divides by the token count of the whole optimiser step.
    ``on_step_end(run)``
        After each optimiser step.
    ``state_dict()`` / ``load_state_dict(state)``
        Saved in and restored from checkpoints.
    ``metrics() -> dict[str, float]``
        Logged to metrics.jsonl after each optimiser step, prefixed by the component name. The key
        ``activity``, 0 exactly when the component changed nothing in the step, is watched: 0 over the
        first steps (``activity_window``, default 10) prints one warning with the class attribute
        ``inactive_hint``; ``unisd report`` shows its mean beside the outcome (``unisd.activity``).

    Class attributes: ``distill_weight`` (float, default 1.0) scales the divergence term, 0 replaces
    it; ``needs_hidden`` (bool) asks the loop for final hidden states in ``scores``;
    ``needs_step_scores`` (bool) asks for the student's divergence and entropy of every micro-batch of
    the step (``StepBatch.step_divergence``/``step_entropy``, no grad) before the first backward, for
    thresholds that must not depend on the micro-batch split.
    """

    name: ClassVar[str]


class ComponentHooks(Protocol):
    """Every method a component *may* define, with its types, in the order the loop calls them.

    A component implements any subset (see :class:`Component` for what each is for); the loop calls
    them only through :func:`call_each` and :func:`implements`, which know this list. The types are
    ``unisd.run.Run``, ``unisd.step.StepBatch``, ``unisd.model.scoring.Scores``,
    ``unisd.model.teacher.TeacherView`` and ``unisd.data.tasks.Example``.
    """

    def setup(self, run: Run) -> None:
        """Once, after model, tokenizer and data exist."""

    def inert_reason(self, run: Run) -> str | None:
        """Why the component cannot act in this configured run, or None."""

    def teacher_contexts(self, example: Example) -> dict[str, str]:
        """Extra named teacher prompts (user-message text) for this example."""

    def teacher(self, run: Run) -> TeacherView:
        """The weights the teacher scores with."""

    def transform_divergence(self, div: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The per-token divergence ``[B, C]``, changed."""

    def token_weights(self, scores: Scores, batch: StepBatch) -> torch.Tensor:
        """Per-token weights ``[B, C]`` (multiplied with the other components')."""

    def extra_losses(self, scores: Scores, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Per-token loss terms ``[B, C]``, already weighted."""

    def on_step_end(self, run: Run) -> None:
        """After each optimiser step."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data to save in a checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def metrics(self) -> dict[str, float]:
        """Numbers for metrics.jsonl (``activity``: how much it acted this step)."""


# The methods of ComponentHooks, in the order the loop calls them during a run.
COMPONENT_METHODS = tuple(name for name in ComponentHooks.__dict__ if not name.startswith("_"))

# Class attributes a component may set, and the value the loop assumes when it does not.
COMPONENT_ATTRIBUTES: dict[str, Any] = {
    "distill_weight": 1.0,  # scales the divergence term; 0 replaces it
    "needs_hidden": False,  # final hidden states in ``scores``
    "needs_step_scores": False,  # the whole step's student divergences before the first backward
    "context_temperature": None,  # temperature of its teacher contexts (None: the run's)
    "activity_window": 10,  # steps the activity watch waits before warning (unisd.activity)
    "inactive_hint": "",  # what to change when it did not act
}


def implements(component: Any, method: str) -> bool:
    """Whether ``component`` defines ``method``, one of :class:`ComponentHooks`' methods."""
    if method not in COMPONENT_METHODS:
        raise ValueError(f"{method!r} is not a component method; they are {', '.join(COMPONENT_METHODS)}")
    return callable(getattr(component, method, None))


def call_each(components: list[Any], method: str, *args: Any) -> list[Any]:
    """``method(*args)`` of every component that implements it, in the order they were selected."""
    return [getattr(c, method)(*args) for c in components if implements(c, method)]


def attribute(component: Any, name: str) -> Any:
    """One of :data:`COMPONENT_ATTRIBUTES` of ``component``: its own value, else the default."""
    return getattr(component, name, COMPONENT_ATTRIBUTES[name])


@dataclass(frozen=True)
class Preset:
    """A named list of components with option values, selected by ``--preset NAME``."""

    name: str
    components: Mapping[str, Mapping[str, Any]]
    help: str = ""
    run: Mapping[str, Any] = field(default_factory=dict)  # run-level settings, e.g. {"alpha": 0.0}


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """Declare one field of a component's ``Options`` with its help text (shown by ``unisd plugins``)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


@dataclass
class NoOptions:
    """Options of a component that has none."""


def options_class(component_cls: type) -> type:
    return getattr(component_cls, "Options", NoOptions)


def describe_options(component_cls: type) -> list[dict[str, Any]]:
    """Each option's name, type, default, choices and help: for ``unisd plugins`` and the docs."""
    cls = options_class(component_cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": f.default if f.default is not dataclasses.MISSING else None,
                "choices": list(f.metadata.get("choices", ())) or None,
                "help": f.metadata.get("help", ""),
            }
        )
    return rows


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_name(args[0]) + "?"
    return getattr(tp, "__name__", str(tp))


DEFAULT_COMPONENT_SEED = 42  # a component's seed outside a run (tests, library calls without a run)


def run_seed(seed: int | None, run: Any) -> int:
    """A component's seed: its own option when set, else the run's ``--seed`` (so seeds vary everything)."""
    if seed is not None:
        return seed
    config = getattr(run, "config", None)
    return int(getattr(config, "seed", DEFAULT_COMPONENT_SEED))


def make_options(component_cls: type, values: Mapping[str, Any]) -> Any:
    """Build the component's Options from raw values, with did-you-mean for unknown keys."""
    cls = options_class(component_cls)
    name = getattr(component_cls, "name", component_cls.__name__)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            avail = ", ".join(sorted(known)) or "(none)"
            raise OptionError(f"Unknown option '{name}.{key}'.{hint} Options of {name}: {avail}")
        value = convert_value(raw, hints[key], f"option {name}.{key}")
        choices = known[key].metadata.get("choices")
        if choices and value not in choices:
            raise OptionError(f"option {name}.{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"options of {name}: {exc}") from None


def parse_option_flags(flags: list[str]) -> dict[str, dict[str, str]]:
    """Parse repeated ``-o name.key=value`` flags into ``{name: {key: value}}``."""
    parsed: dict[str, dict[str, str]] = {}
    for flag in flags:
        head, sep, value = flag.partition("=")
        comp, dot, key = head.partition(".")
        if not sep or not dot or not comp or not key:
            raise OptionError(f"-o {flag!r}: expected name.key=value, e.g. -o ema.beta=0.98")
        parsed.setdefault(comp.strip(), {})[key.strip()] = value.strip()
    return parsed


def resolve_selection(
    names: list[str],
    options: Mapping[str, Mapping[str, Any]],
    components: Registry,
    presets: Registry,
    preset: str | None = None,
    base: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Merge a preset, ``--with`` names and ``-o`` options into ``{component: {key: raw value}}``.

    Order of precedence: the preset's values, then ``base`` (a config file's ``[components.*]``
    tables), then the user's ``-o`` values. Every name is checked
    against the registry (unknown names raise with suggestions) and every option must belong to a
    selected component.
    """
    selection: dict[str, dict[str, Any]] = {}
    if preset:
        chosen = presets.get(preset)
        for comp, values in chosen.components.items():
            selection[comp] = dict(values)
    for comp, values in (base or {}).items():
        selection.setdefault(comp, {}).update(values)
    for name in names:
        components.get(name)  # raises UnknownNameError with suggestions
        selection.setdefault(name, {})
    for comp, values in options.items():
        if comp not in selection:
            if comp in components:
                raise OptionError(f"-o {comp}.…: component '{comp}' is not selected; add --with {comp}")
            components.get(comp)  # unknown name: raises with suggestions
        selection[comp].update(values)
    for comp in selection:
        components.get(comp)
    return selection


def option_values(component: Any) -> dict[str, Any]:
    """A component instance's options, every one typed and defaults included: what config.toml records."""
    options = getattr(component, "options", None)
    if options is None or not dataclasses.is_dataclass(options):
        return {}
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def instantiate(selection: Mapping[str, Mapping[str, Any]], components: Registry) -> list[Any]:
    """Create component instances, each with its typed Options, in a stable (sorted) order."""
    instances = []
    for name in sorted(selection):
        cls = components.get(name)
        opts = make_options(cls, selection[name])
        instances.append(cls(opts))
    owners = [c.name for c in instances if implements(c, "teacher")]
    if len(owners) > 1:
        raise ConfigError(
            f"Components {', '.join(owners)} each want to own the teacher weights; select at most one of them."
        )
    return instances
