"""The algorithm comparison's planning, resume logic and report, on synthetic run folders
(the real runs take hours; a broken report would lose them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import compare_algorithms as ca  # noqa: E402


def _write_run(out: Path, name: str, steps: int, growth: float, finished: bool = True) -> None:
    run = out / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(f"step_{steps:06d}")
    metrics, rollouts = [], []
    for step in range(0, steps + 1):
        if step % 2 == 0:
            metrics.append({"kind": "eval", "step": step, "eval/accuracy": 0.1 + 0.02 * step})
        if step == 0:
            continue
        length = 40 + growth * step
        metrics.append({"kind": "train", "step": step, "reward/accuracy": 0.3,
                        "rollout/response_len_mean": length, "rollout/response_len_max": 256,
                        **{f"rollout/response_len_p{q}": length * q / 50 for q in (10, 50, 90)},
                        "fipo/future_kl_abs_mean": 0.01, "fipo/influence_mean": 1.01,
                        "policy/entropy": 0.5, "loss/clip_frac_high": 0.01,
                        "loss/clip_frac_low": 0.0})  # fmt: skip
        groups = [{"problem": "12 + 30", "answer": "42", "version": step - 1,
                   "lengths": [int(length), int(length) + 20], "correct": [False, True],
                   "truncated": [False, False], "rewards": [-1.0, 1.0],
                   "sample": "12 + 30 = 42\nSo \\boxed{42}"}]  # fmt: skip
        rollouts.append({"kind": "rollouts", "step": step, "groups": groups})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    (run / "config.yaml").write_text(
        "# precision: CPU capability AVX2 without native bf16\nmodel: {}\n"
    )
    if finished:
        (run / "final_model").mkdir()
        (run / "final_model" / "config.json").write_text("{}")


def test_plan_is_seed_major_and_the_ablation_can_have_its_own_seeds() -> None:
    args = ca.parse_args(["--algorithms", "fipo,dapo,fipo-nofilter", "--seeds", "0,1",
                          "--ablation-seeds", "0"])  # fmt: skip
    assert ca.planned_runs(args) == [("fipo", 0), ("dapo", 0), ("fipo-nofilter", 0),
                                     ("fipo", 1), ("dapo", 1)]  # fmt: skip
    cmd = ca.trainer_args(args, "fipo-nofilter", 1)
    assert "algorithm.participation_filter=false" in cmd and "run.seed=1" in cmd
    assert f"run.steps={ca.CPU_STEPS}" in cmd and "rollout.overlong_buffer=64" in cmd


@pytest.mark.parametrize("bad", [["--algorithms", "ppo"], ["--seeds", "a"], ["--steps", "-1"]])
def test_bad_arguments_are_named(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ca.parse_args(bad)
    assert bad[0] in capsys.readouterr().err


def test_run_state_tells_done_from_resumable_from_new(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", steps=4, growth=1.0)
    _write_run(tmp_path, "b", steps=2, growth=1.0, finished=False)
    assert ca.run_state(tmp_path / "a", 4) == "done"
    assert ca.run_state(tmp_path / "a", 8) == "resume"  # asked for more steps than it has
    assert ca.run_state(tmp_path / "b", 4) == "resume"
    assert ca.run_state(tmp_path / "c", 4) == "new"


def test_the_machine_of_a_run_comes_from_its_config_or_its_log(tmp_path: Path) -> None:
    run = tmp_path / "fipo-s1"
    run.mkdir()
    assert ca.run_machine(run) == "?"
    # Resumed by an older trainer with explicit dtypes: the config no longer says; the
    # first launch's line in the run's log does.
    (run / "config.yaml").write_text("# precision: set explicitly\nmodel: {}\n")
    (tmp_path / "fipo-s1.log").write_text(
        "[fipo] precision: rollout engine bfloat16, learner bfloat16 (CPU capability AVX512 "
        "with native bf16 (AVX-512 BF16/AMX))\n[fipo] precision: (set explicitly)\n"
    )
    assert ca.run_machine(run) == "CPU AVX512, native bf16 yes"
    (run / "config.yaml").write_text(
        "# precision: set explicitly, on GPU NVIDIA H200 with native bf16\nmodel: {}\n"
    )
    assert ca.run_machine(run) == "GPU NVIDIA H200"


def test_report_draws_figures_and_replaces_its_block_in_the_docs(tmp_path: Path) -> None:
    out, docs = tmp_path / "runs", tmp_path / "docs"
    docs.mkdir()
    (docs / "fipo.md").write_text("# FIPO\n\nprose before\n")
    for seed in (0, 1):
        _write_run(out, f"fipo-s{seed}", steps=6, growth=4.0)
        _write_run(out, f"dapo-s{seed}", steps=6, growth=0.0)
    ca.save_ledger(str(out), {"fipo-s0": {"wall_s": 600.0, "load": [2.0, 3.0]}})
    argv = ["--algorithms", "fipo,dapo", "--seeds", "0,1", "--out", str(out), "--docs",
            str(docs), "--steps", "6", "--report-only"]  # fmt: skip
    assert ca.main(argv) == 0
    for name in ("curves", "lengths", "acc_vs_length"):
        assert (docs / "figures" / f"compare_{name}.png").stat().st_size > 1000
    text = (docs / "fipo.md").read_text()
    assert text.startswith("# FIPO\n\nprose before\n")
    rows = [
        line for line in text.splitlines() if line.startswith("| fipo") or line.startswith("| dapo")
    ]
    assert len(rows) == 2 and "| 2 (0,1) |" in rows[0]
    # Final held-out accuracy 0.1 + 0.02 * 6 = 0.22 in every run; fipo's length grew (the
    # mean of the last two steps: 40 + 4 * 5.5).
    assert "0.220 ± 0.000" in rows[0] and "| 62 ± 0 /" in rows[0] and "| 40 ± 0 /" in rows[1]
    assert "gap +20.0 -> +20.0 tokens" in text
    assert "Runs made on: CPU AVX2, native bf16 no (4 runs). Report drawn" in text
    assert "fipo** (seed 0), early" in text and "\\boxed{42}" in text
    # A second report replaces the block instead of appending another; an unfinished run
    # is named, not averaged into the curves.
    _write_run(out, "fipo-s2", steps=3, growth=4.0, finished=False)
    argv[argv.index("0,1")] = "0,1,2"
    assert ca.main(argv) == 0
    text = (docs / "fipo.md").read_text()
    assert text.count("<!-- compare:begin") == 1
    assert "Not finished yet (rerun the command to finish them): fipo-s2, dapo-s2." in text
