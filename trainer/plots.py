"""The run's metrics file and its PNG plots (matplotlib is imported only here).

``metrics.jsonl`` holds one JSON object per line: training steps (``"kind": "train"``)
and evaluations (``"kind": "eval"``), each with the step and namespaced metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.loggers import MetricsSink

# (file name, title, [(metric, label)], kind) of each plot.
PLOTS: tuple[tuple[str, str, tuple[tuple[str, str], ...], str], ...] = (
    (
        "reward.png",
        "Training reward",
        (("reward/mean", "mean reward"), ("reward/accuracy", "accuracy")),
        "train",
    ),
    ("eval_accuracy.png", "Held-out accuracy (greedy)", (("eval/accuracy", "accuracy"),), "eval"),
    (
        "response_length.png",
        "Response length (tokens)",
        (("rollout/response_len_mean", "train (sampled)"),),
        "train",
    ),
    (
        "eval_response_length.png",
        "Held-out response length (tokens)",
        (("eval/response_len_mean", "eval (greedy)"),),
        "eval",
    ),
    (
        "future_kl.png",
        "Future-KL",
        (
            ("fipo/future_kl_mean", "mean"),
            ("fipo/future_kl_abs_mean", "mean |F|"),
            ("fipo/future_kl_max", "max"),
            ("fipo/future_kl_min", "min"),
        ),
        "train",
    ),
    (
        "influence_weights.png",
        "Influence weights",
        (
            ("fipo/influence_mean", "mean"),
            ("fipo/influence_min", "min"),
            ("fipo/influence_max", "max"),
            ("fipo/influence_clip_frac_high", "clipped at 1+eps_f"),
        ),
        "train",
    ),
    (
        "staleness.png",
        "Policy staleness (versions)",
        (("rollout/staleness_mean", "mean"), ("rollout/staleness_max", "max")),
        "train",
    ),
)


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer, flushed per line.

    Args:
        path: The file.
        truncate_after_step: On resume, drop records of steps after this one (they
            belonged to the interrupted tail of the previous process).
    """

    def __init__(
        self,
        path: str | Path,
        truncate_after_step: int | None = None,
        sinks: Sequence[MetricsSink] = (),
    ):
        self.path = Path(path)
        self.sinks = list(sinks)  # TensorBoard, wandb, MLflow (trainer.loggers)
        if truncate_after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 -- closed in close()

    def write(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record."""
        record = {"kind": kind, "step": step}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink.log(kind, step, metrics)

    def close(self) -> None:
        """Close the file and the sinks."""
        self._file.close()
        for sink in self.sinks:
            sink.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


#: Counters a run reports as totals since its start; each process counts from 0.
RUN_TOTALS = (
    "reward/client_requests",
    "reward/client_retries",
    "reward/client_failovers",
    "rollout/reissued_prompts",
    "rollout/worker_restarts",
)


def carried_totals(records: Sequence[Mapping[str, Any]], step: int) -> dict[str, float]:
    """The run totals (``RUN_TOTALS``) logged at the last training step <= ``step`` in
    ``records`` (``read_metrics``): what a resumed run adds to its own counts, so the
    logged totals stay the run's."""
    rows = [r for r in records if r.get("kind") == "train" and r["step"] <= step]
    if not rows:
        return {}
    last = rows[-1]
    return {k: float(last[k]) for k in RUN_TOTALS if last.get(k) is not None}


def eval_missing(records: Sequence[Mapping[str, Any]], step: int, every: int) -> bool:
    """Whether a run resumed at ``step`` owes the evaluation due there: ``step`` is a
    multiple of ``every`` and ``records`` (``read_metrics``) have none for it (a stop
    signal during that evaluation interrupts it, and the checkpoint is then written at
    the same step)."""
    if not every or step <= 0 or step % every:
        return False
    return not any(r.get("kind") == "eval" and r.get("step") == step for r in records)


def write_plots(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Render every plot of :data:`PLOTS` that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, title, series, kind in PLOTS:
        rows = [r for r in records if r.get("kind") == kind]
        lines = []
        for key, label in series:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                lines.append((label, pts))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, pts in lines:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
