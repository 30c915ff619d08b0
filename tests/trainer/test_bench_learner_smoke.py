"""The GPU learner benchmark's code path, run at toy size on CPU (it is otherwise only
run on a lent GPU machine, where a broken script would waste the device time)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_learner  # noqa: E402


def test_random_qwen2_mode_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--random-qwen2", "--tiny", "--device", "cpu", "--batch", "2",
            "--response-tokens", "24", "--prompt-tokens", "6", "--repeats", "1"]  # fmt: skip
    assert bench_learner.main(args) == 0
    out = capsys.readouterr().out
    assert "response tokens/s" in out and "policy_loss forward share" in out
