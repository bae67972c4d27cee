"""Experiment trackers (``--report-to``): where a run's configuration, step metrics and evaluations also go.

A tracker is a plugin class registered through the ``register_trackers`` hook, with a ``name`` (what
``--report-to`` selects) and these methods:

- ``check()`` (classmethod): raise :class:`~unisd.errors.UsageError` when it cannot work here (its package
  is missing), so a run fails before training instead of after;
- ``__init__(run_dir, config)``: start (``config`` is the resolved run configuration as a dict);
- ``log_metrics(metrics, step)``: one step's numbers (also ``eval/...`` ones when evaluated);
- ``log_summary(metrics)``: the held-out results before and after training (``before/...``, ``after/...``);
- ``close()``: flush and finish.

The built-in ones import their package only when selected; each is an optional extra of unisd-core
(``pip install 'unisd-core[tensorboard]'``). A tracker that fails during a run is reported once and
dropped: losing a dashboard must not lose a training run (metrics.jsonl has everything).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UsageError


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"--report-to {extra} needs the {module} package: pip install 'unisd-core[{extra}]'") from None


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record (trackers take scalars; booleans and strings are left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Tracker:
    """Base class: a tracker that records nothing. Subclasses override what they support."""

    name: ClassVar[str] = ""

    @classmethod
    def check(cls) -> None:
        """Raise UsageError when this tracker cannot run here."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        self.run_dir, self.config = Path(run_dir), config

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_summary(self, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """TensorBoard event files under ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``)."""

    name: ClassVar[str] = "tensorboard"

    @classmethod
    def check(cls) -> None:
        _require("tensorboard", "tensorboard")

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        super().__init__(run_dir, config)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()), 0)
        self.last_step = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.last_step = step
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, self.last_step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """Weights & Biases (project from WANDB_PROJECT, else "unisd"; run named after the run directory)."""

    name: ClassVar[str] = "wandb"

    @classmethod
    def check(cls) -> None:
        _require("wandb", "wandb")

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        super().__init__(run_dir, config)
        import os

        self.wandb = _require("wandb", "wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "unisd"), name=self.run_dir.name,
                                   config=config, dir=str(self.run_dir))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    """trackio (a local, wandb-compatible tracker): project "unisd", run named after the run directory."""

    name: ClassVar[str] = "trackio"

    @classmethod
    def check(cls) -> None:
        _require("trackio", "trackio")

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        super().__init__(run_dir, config)
        self.trackio = _require("trackio", "trackio")
        self.trackio.init(project="unisd", name=self.run_dir.name, config=config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics)

    def close(self) -> None:
        self.trackio.finish()


class MLflowTracker(Tracker):
    """MLflow (tracking URI and experiment from MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME as usual)."""

    name: ClassVar[str] = "mlflow"

    @classmethod
    def check(cls) -> None:
        _require("mlflow", "mlflow")

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        super().__init__(run_dir, config)
        self.mlflow = _require("mlflow", "mlflow")
        self.mlflow.start_run(run_name=self.run_dir.name)
        # MLflow params are strings of bounded length: the config's scalars, nested tables as text
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # MLflow metric names allow letters, digits, _ - . / and spaces: "eval/demo/x" is fine as it is
        self.mlflow.log_metrics(metrics, step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics)

    def close(self) -> None:
        self.mlflow.end_run()


BUILTIN_TRACKERS = (TensorBoardTracker, WandbTracker, TrackioTracker, MLflowTracker)


def check_trackers(names: Sequence[str], registry: Any) -> list[type]:
    """The tracker classes ``names`` select (``none`` selects nothing), each checked to work here."""
    chosen = [registry.get(name) for name in dict.fromkeys(names) if name != "none"]
    for cls in chosen:
        cls.check()
    return chosen


class Trackers:
    """The run's open trackers, called together; one that fails is reported once and dropped."""

    def __init__(self, classes: Sequence[type], run_dir: Path, config: dict[str, Any], warn: Callable[[str], None]):
        self.warn = warn
        self.open: list[Any] = []
        for cls in classes:
            self._guard(cls.name, lambda c=cls: self.open.append(c(run_dir, config)))

    def _guard(self, name: str, work: Callable[[], Any]) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a dashboard failing must not stop the training run
            self.warn(f"tracker {name} failed and is switched off for this run: {type(exc).__name__}: {exc}")
            self.open = [t for t in self.open if t.name != name]

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        values = numeric({k: v for k, v in record.items() if k != "step"})
        for tracker in list(self.open):
            self._guard(tracker.name, lambda t=tracker: t.log_metrics(values, step))

    def log_summary(self, metrics: dict[str, Any]) -> None:
        values = numeric(metrics)
        for tracker in list(self.open):
            self._guard(tracker.name, lambda t=tracker: t.log_summary(values))

    def close(self) -> None:
        for tracker in list(self.open):
            self._guard(tracker.name, tracker.close)
        self.open = []
