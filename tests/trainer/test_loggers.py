"""``trainer.loggers``: TensorBoard event files by default, wandb / MLflow on request."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

from trainer.config import ConfigError, parse_args
from trainer.loggers import check_installed, make_sinks, parse_loggers
from trainer.plots import MetricsLog, carried_totals, eval_missing, read_metrics


def read_events(path: Path) -> list:
    """The ``Event`` protos of one event file: TFRecord framing (u64 length, u32 crc, data,
    u32 crc) read directly, so no TensorBoard install is needed."""
    from tensorboardX.proto import event_pb2

    data, i, events = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return events


def read_scalars(log_dir: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the event files of ``log_dir``."""
    return [
        (e.step, v.tag, v.simple_value)
        for path in sorted(log_dir.glob("events.out.tfevents.*"))
        for e in read_events(path)
        for v in e.summary.value
    ]


def test_tensorboard_by_default_gets_every_record(tmp_path: Path) -> None:
    cfg = parse_args([]).config
    assert parse_loggers(cfg.run.loggers) == ("tensorboard",)
    sinks = make_sinks(parse_loggers(cfg.run.loggers), tmp_path, cfg.to_dict())
    log = MetricsLog(tmp_path / "metrics.jsonl", sinks=sinks)
    log.write("eval", 0, {"eval/accuracy": 0.25, "perf/eval_s": 3.0})
    log.write("train", 1, {"reward/mean": -0.5, "note": "text is skipped", "bad": float("nan")})
    log.write("eval", 4, {"eval/accuracy": 0.5})
    log.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert (0, "eval/accuracy", 0.25) in scalars and (4, "eval/accuracy", 0.5) in scalars
    assert (1, "reward/mean", -0.5) in scalars
    assert not any(tag in ("note", "bad") for _, tag, _ in scalars)


def test_resume_drops_the_interrupted_tail(tmp_path: Path) -> None:
    """Like metrics.jsonl, a resumed run's curves do not fork at the checkpoint."""
    first = MetricsLog(tmp_path / "m.jsonl", sinks=make_sinks(["tensorboard"], tmp_path, {}))
    for step in (1, 2, 3):
        first.write("train", step, {"reward/mean": float(step)})
    first.close()
    resumed = make_sinks(["tensorboard"], tmp_path, {}, resume_step=2)
    log = MetricsLog(tmp_path / "m.jsonl", truncate_after_step=2, sinks=resumed)
    log.write("train", 3, {"reward/mean": 30.0})
    log.close()
    # The first process's event file still holds its step 3; TensorBoard honours the purge
    # marker (a START session log at the purge step) that the resumed writer records.
    newest = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))[-1]
    events = read_events(newest)
    assert any(e.session_log.status == e.session_log.START and e.step == 3 for e in events)
    assert any(v.simple_value == 30.0 for e in events for v in e.summary.value)


def test_a_resumed_run_carries_its_totals_from_the_checkpoint_step(tmp_path: Path) -> None:
    """Counters logged as run totals continue after --resume instead of restarting at 0."""
    path = tmp_path / "m.jsonl"
    assert carried_totals([], 2) == {}  # no log yet
    log = MetricsLog(path)
    log.write("eval", 0, {"eval/accuracy": 0.5})
    for step in (1, 2, 3):
        log.write("train", step, {"reward/client_requests": 10.0 * step,
                                  "rollout/reissued_prompts": float(step),
                                  "reward/mean": 0.1})  # fmt: skip
    log.write("eval", 2, {"eval/accuracy": 0.6})
    log.close()
    records = read_metrics(path)
    assert carried_totals(records, 2) == {
        "reward/client_requests": 20.0,
        "rollout/reissued_prompts": 2.0,
    }  # step 3 is after the checkpoint; reward/mean is not a total
    assert carried_totals(records, 0) == {}


def test_a_resumed_run_owes_the_evaluation_a_stop_signal_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for step in range(1, 9):
        log.write("train", step, {"reward/mean": 0.1})
        if step == 4:
            log.write("eval", 4, {"eval/accuracy": 0.3})
    log.close()  # stopped during the step-8 evaluation, checkpoint at 8
    records = read_metrics(path)
    assert eval_missing(records, 8, every=4)
    assert not eval_missing(records, 4, every=4)  # logged
    assert not eval_missing(records, 6, every=4)  # not due at 6
    assert not eval_missing(records, 8, every=0)  # evaluation off
    assert not eval_missing(records, 0, every=4)  # step 0 is eval.at_start's


def test_bad_or_missing_loggers_are_clear_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"run.loggers is invalid: unknown logger\(s\) \['tensorbored'\]"
    ):
        parse_args(["run.loggers=tensorbored"])
    assert parse_args(["run.loggers="]).config.run.loggers == ""
    assert parse_loggers(" wandb , tensorboard,wandb") == ("wandb", "tensorboard")
    for name, package in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ModuleNotFoundError, match=f"pip install {package}"):
                check_installed([name])
