"""Whether each selected component acts: a warning when one cannot, and the number that says how much.

A component that never acts makes an ablation row that looks like "no effect" (an EMA teacher that is
never updated, a clip cap the divergence never reaches). Two checks tell the two apart while the run
is still young:

* **before the first step**: a component may define ``inert_reason(run) -> str | None``, a reason it
  cannot act in this configured run (``ema`` with ``sync_steps`` ≥ ``steps``);
* **after the first steps**: a component whose ``metrics()`` has an ``activity`` key (a number that is
  0 exactly when the component changed nothing in that step: clip's clipped share, agreement's
  down-weighted share, ...) and that stayed 0 for the first :data:`WATCH_STEPS` steps gets one warning,
  with the component's ``inactive_hint`` (a class attribute) saying what to change.

``unisd report`` averages ``COMPONENT/activity`` over the steps of each run and shows it beside the
outcome.
"""

from __future__ import annotations

from typing import Any

from .components import COMPONENT_ATTRIBUTES, attribute, implements

ACTIVITY = "activity"
WATCH_STEPS = COMPONENT_ATTRIBUTES["activity_window"]


def inert_warnings(components: list[Any], run: Any) -> dict[str, str]:
    """Each component's own reason (if any) why it cannot act in this run, by component name."""
    out = {}
    for comp in components:
        reason = comp.inert_reason(run) if implements(comp, "inert_reason") else None
        if reason:
            out[comp.name] = f"{comp.name} will not act in this run: {reason}"
    return out


class ActivityWatch:
    """Warns once per component that reported ``activity`` 0 at each of its first watched steps.

    A component watches :data:`WATCH_STEPS` steps unless it sets ``activity_window`` (EMA: its sync
    interval, since it acts only every so many steps). ``skip`` names components already warned about
    before the first step.
    """

    def __init__(self, components: list[Any], total_steps: int, first_step: int = 1, skip: tuple[str, ...] = ()):
        # A resumed run watches its own first steps: the warning is about what happens now.
        self.first = first_step
        self.windows: dict[str, tuple[int, str]] = {}
        for comp in components:
            count = min(int(attribute(comp, "activity_window")), total_steps - first_step + 1)
            if comp.name not in skip and count > 0:
                self.windows[comp.name] = (first_step - 1 + count, attribute(comp, "inactive_hint"))
        self.acted: dict[str, bool] = {}

    def observe(self, step: int, record: dict[str, Any]) -> list[str]:
        """The warnings that become due with this step's metrics record (each component at most once)."""
        out = []
        for name, (last, hint) in self.windows.items():
            if not self.first <= step <= last:
                continue
            value = record.get(f"{name}/{ACTIVITY}")
            if isinstance(value, int | float):
                self.acted[name] = self.acted.get(name, False) or value != 0
            if step == last and self.acted.get(name) is False:  # it reported activity, 0 every time
                steps = f"step {self.first}" if last == self.first else f"steps {self.first}-{last}"
                out.append(f"{name} did not act in {steps} ({name}/{ACTIVITY} = 0 each time)"
                           + (f": {hint}" if hint else ""))
        return out
