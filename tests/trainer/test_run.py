"""``python -m trainer.run`` end to end: smoke run, exact resume, clean shutdown, errors.

The slow tests run the embedded default model with the real reward server, rollout worker
(vLLM where installed) and learner, on a deliberately tiny configuration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "run.progress=false",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_response_tokens=32",
    # Dynamic sampling on (3 rounds): a batch of groups whose verdicts all agree has zero
    # advantage and, rightly, takes no optimiser step; the smoke run must train.
    "task.spec=arithmetic:0",
    "optim.mini_batches=2",
    "eval.num_problems=8",
    "eval.every=0",
    "run.checkpoint_every=1",
]


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _descendants(pid: int) -> set[int]:
    """All live descendants of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_bad_config_fails_fast_with_the_field_named() -> None:
    result = _run(["rollout.group_size=1"], timeout=120)
    assert result.returncode == 2
    assert "rollout.group_size must be >= 2" in result.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = _run([f"run.out_dir={tmp_path}", "--model", str(tmp_path / "nope")], timeout=120)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "never downloaded" in result.stderr
    assert list(tmp_path.iterdir()) == [], "a failed --model check left a run folder behind"


def test_unreachable_reward_server_is_a_clear_error(tmp_path: Path) -> None:
    result = _run(
        [
            f"run.out_dir={tmp_path}",
            "rollout.reward_address=127.0.0.1:1",
            "rollout.reward_connect_timeout_s=3",
        ],
        timeout=300,
    )
    assert result.returncode == 3
    assert "reward server at 127.0.0.1:1 is unreachable" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_smoke_two_steps_then_resume(tmp_path: Path) -> None:
    result = _run([*TINY, f"run.out_dir={tmp_path}", "run.name=smoke", "run.steps=2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2]
    # Every mini-batch (2 per step) either stepped or was skipped for having nothing to learn
    # (all-zero advantages); "optim/steps" counts the run's optimiser steps so far.
    skipped_zero = sum(r["optim/skipped_zero_advantage"] for r in train)
    assert train[-1]["optim/steps"] + skipped_zero == 2 * len(train)
    assert train[-1]["optim/steps"] > 0
    for r in train:
        assert r["optim/skipped_nonfinite"] == 0
        assert -1.0 <= r["reward/mean"] <= 1.0
        assert r["rollout/staleness_max"] <= 1  # the default max_staleness
    evals = _records(run_dir, "eval")
    assert [r["step"] for r in evals] == [0, 2]
    assert all(r["eval/num_problems"] == 8 for r in evals)
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (run_dir / "plots" / "reward.png").is_file()
    assert (run_dir / "final_model" / "config.json").is_file()
    assert "step 2/2" in result.stdout + result.stderr

    # Resume to step 3: continues from the checkpoint, not from scratch.
    result = _run(["--resume", str(run_dir), "run.steps=3"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed at step 2 (policy version 2)" in result.stdout
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"
    # Run totals continue from the checkpoint (the new process counts from 0).
    assert train[2]["reward/client_requests"] > train[1]["reward/client_requests"] > 0
    # One rollouts.jsonl record per step (the resumed process keeps steps 1-2, adds 3).
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1, 2, 3]
    assert all(len(g["lengths"]) == len(g["correct"]) >= 2 for r in rollouts for g in r["groups"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigterm_checkpoints_and_leaves_no_orphans(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "out.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer.run",
            *TINY,
            f"run.out_dir={tmp_path}",
            "run.name=t",
            "run.steps=100",
            "run.checkpoint_every=0",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # After the step-0 eval the worker is producing batches and the learner waits
            # for one or trains on it: the signal lands in the middle of training.
            if metrics.exists() and '"eval"' in metrics.read_text():
                time.sleep(5)
                break
            time.sleep(1)
        assert proc.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
        children = _descendants(proc.pid)
        assert children  # reward server + rollout worker (+ vLLM's processes)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # the test failed: still stop the run the graceful way
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    out = (tmp_path / "out.log").read_text()
    assert rc == 0, out[-3000:]
    assert "SIGTERM: saving a checkpoint" in out
    assert (tmp_path / "t" / "checkpoints" / "latest").is_file()
    time.sleep(2)
    orphans = [p for p in children if _alive(p)]
    assert not orphans, f"processes left running after SIGTERM: {orphans}"


def test_groups_the_filter_drops_get_zero_advantage_and_a_short_batch_is_flagged() -> None:
    import numpy as np

    from trainer.config import build_config
    from trainer.run import batch_advantages
    from trainer.types import RolloutBatch, RolloutGroup

    def group(correct: list[bool], penalty: float) -> RolloutGroup:
        ok = np.asarray(correct)
        rewards = np.where(ok, 1.0, -1.0) + np.array([0.0] * (len(ok) - 1) + [penalty])
        return RolloutGroup((1,), ((2,),) * len(ok), ((0.0,),) * len(ok), rewards, ok,
                            np.zeros(len(ok), bool), 0)  # fmt: skip

    # An all-correct group whose last response is soft-penalised, and a mixed group: only
    # the mixed one is informative by accuracy, so the batch of 2 is short.
    batch = RolloutBatch((group([True] * 4, -0.1), group([True, False] * 2, 0.0)), 6, 0.0, 0)
    cfg = build_config({"rollout": {"prompts_per_step": 2, "group_size": 4}})
    adv, metrics = batch_advantages(batch, cfg)
    assert adv[0].tolist() == [0.0] * 4 and np.abs(adv[1]).min() > 0.5
    assert metrics == {"rollout/informative_groups": 1.0, "rollout/short_batch": 1.0}
    cfg = build_config({"rollout": {"prompts_per_step": 2, "group_size": 4,
                                    "filter_metric": "reward"}})  # fmt: skip
    adv, metrics = batch_advantages(batch, cfg)
    assert adv[0][-1] < -1.0 and metrics["rollout/short_batch"] == 0.0


def test_batch_metrics_report_response_length_percentiles() -> None:
    import numpy as np

    from trainer.run import batch_metrics
    from trainer.types import RolloutBatch, RolloutGroup

    lengths = list(range(1, 11))
    group = RolloutGroup((1,), tuple((2,) * n for n in lengths), tuple((0.0,) * n for n in lengths),
                         np.zeros(10), np.zeros(10, bool), np.zeros(10, bool), 0)  # fmt: skip
    m = batch_metrics(RolloutBatch((group,), 1, 1.0, 55), learner_version=0)
    assert m["rollout/response_len_p10"] == np.percentile(lengths, 10)
    assert m["rollout/response_len_p50"] == 5.5 and m["rollout/response_len_p90"] == 9.1


def test_rollout_record_keeps_every_response_and_one_text_per_group() -> None:
    import numpy as np

    from trainer.run import rollout_record
    from trainer.types import RolloutBatch, RolloutGroup

    group = RolloutGroup((1,), ((5, 6, 7), (8,)), ((0.0,) * 3, (0.0,)), np.array([1.0, -1.0]),
                         np.array([True, False]), np.array([False, True]), 3, "1+1", "2")  # fmt: skip
    record = rollout_record(RolloutBatch((group,), 1, 1.0, 4), lambda ids: "-".join(map(str, ids)))
    assert record == {"groups": [{
        "problem": "1+1", "answer": "2", "version": 3, "lengths": [3, 1],
        "correct": [True, False], "truncated": [False, True], "rewards": [1.0, -1.0],
        "sample": "5-6-7",
    }]}  # fmt: skip
