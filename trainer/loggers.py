"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, wandb, MLflow.

``run.loggers`` names them (comma-separated, verl's ``trainer.logger`` convention):

* ``tensorboard`` (default): event files in the run folder, written offline with
  ``tensorboardX``; ``tensorboard --logdir runs/`` shows every run side by side.
* ``wandb`` / ``mlflow``: through those libraries, imported only when asked for; they are
  not dependencies of this project, and a missing one is a clear error at start (before
  any model is loaded), naming the package to install.

Each logger gets every record the run writes (``kind`` = ``train`` / ``eval`` /
``setup``, a step, and namespaced metrics such as ``eval/accuracy``), from
``trainer.plots.MetricsLog``; only the trainer logs.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

#: The names ``run.loggers`` accepts, and the package each needs.
LOGGERS: dict[str, str] = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


class MetricsSink(Protocol):
    """Receives every metrics record of a run."""

    def log(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        """One record: ``kind`` (train / eval / setup), the step, namespaced metrics."""
        ...

    def close(self) -> None:
        """Flush and release."""
        ...


def parse_loggers(text: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ``("tensorboard", "wandb")``; empty text -> ``()``.

    Raises:
        ValueError: An unknown name (the message lists the known ones).
    """
    names = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; known: {sorted(LOGGERS)}")
    return names


def check_installed(names: Sequence[str]) -> None:
    """Fail before a run starts when a requested logger's package is missing.

    Raises:
        ModuleNotFoundError: Naming the logger, the package and how to install it.
    """
    for name in names:
        package = LOGGERS[name]
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(
                f"run.loggers asks for {name!r}, but the {package!r} package is not installed "
                f"here: `pip install {package}` in this environment, or drop {name!r} from "
                "run.loggers"
            )


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class TensorBoardSink:
    """TensorBoard event files in ``log_dir`` (one scalar per metric name)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter

        # purge_step: a resumed run drops the events the interrupted process wrote after
        # its checkpoint, as metrics.jsonl does, so curves do not fork.
        self._writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in _numbers(metrics).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A wandb run (its own settings, e.g. ``WANDB_MODE=offline``, apply)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self._run = wandb.init(
            project="fipo", name=run_dir.name, dir=str(run_dir), config=dict(config), resume="allow"
        )

    def log(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowSink:
    """An MLflow run (tracking URI from ``MLFLOW_TRACKING_URI``, else ``./mlruns``)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        flat = {f"{s}.{k}": v for s, fields in config.items() for k, v in fields.items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        self._mlflow.log_metrics(_numbers(metrics), step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def make_sinks(
    names: Sequence[str],
    run_dir: Path,
    config: Mapping[str, Any],
    resume_step: int | None = None,
) -> list[MetricsSink]:
    """The sinks ``names`` asks for (``check_installed`` first)."""
    check_installed(names)
    sinks: list[MetricsSink] = []
    for name in names:
        if name == "tensorboard":
            purge = resume_step + 1 if resume_step is not None else None
            sinks.append(TensorBoardSink(run_dir / "tensorboard", purge_step=purge))
        elif name == "wandb":
            sinks.append(WandbSink(run_dir, config))
        else:
            sinks.append(MlflowSink(run_dir, config))
    return sinks
