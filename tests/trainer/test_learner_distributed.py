"""The data-parallel learner: K = 2 gloo ranks make the update one rank makes (CPU, fp32).

The ranks run as ``torch.multiprocessing`` spawn processes (the Ray placement is tested in
``test_learner_group.py``). The optimiser is plain SGD here, so the weights move by exactly
``lr * grad`` and compare at ``atol=1e-6`` (each update moves them by > 1e-2): AdamW's
first step is ~``lr * sign(grad)`` and would turn rounding-level differences of near-zero
gradients (summation order differs between 1 and 2 ranks) into ``lr``-sized ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_support import advantages, build_learner, free_port, make_batch, rank_main, weights

WEIGHT_ATOL = 1e-6

CASES = {
    # The sequence-drop rule fires (c = 1.02, SGD lr 20 moves the policy between the two
    # mini-batches); two epochs, so ranks train on rows another rank had first.
    "fipo-drop-2-epochs": (
        {
            "model": {"micro_batch_tokens": 16},
            "algorithm": {"name": "fipo", "clip_high": 0.0, "dual_clip": 1.02},
            "mini_batches": 2,
            "epochs": 2,
            "sgd_lr": 20.0,
        },
        9,
        {"groups": 4, "g": 4},
        (),
    ),
    # One group per mini-batch (< 2 ranks: split by responses), one of them all-zero
    # advantage (skipped on every rank), GRPO's per-sequence aggregation.
    "grpo-zero-group": (
        {"algorithm": {"name": "grpo"}, "mini_batches": 4, "sgd_lr": 5.0},
        3,
        {"groups": 4, "g": 4},
        (2,),
    ),
    # One response per mini-batch: rank 1 trains on nothing and still joins every reduce.
    "dapo-empty-rank": (
        {"algorithm": {"name": "dapo"}, "mini_batches": 4, "sgd_lr": 5.0},
        5,
        {"groups": 2, "g": 2},
        (),
    ),
}
EXACT = (
    "loss/num_tokens",
    "loss/num_sequences",
    "loss/dropped_sequences",
    "optim/steps",
    "optim/skipped_zero_advantage",
    "optim/skipped_nonfinite",
    "learner/sequences",
)


def test_two_ranks_make_the_one_rank_update(tiny_model_dir: Path, tmp_path: Path) -> None:
    cases = []
    for settings, seed, shape, zero in CASES.values():
        batch = make_batch(seed, **shape)
        cases.append((settings, batch, advantages(batch, zero)))
    torch.multiprocessing.start_processes(
        rank_main,
        args=(2, free_port(), tiny_model_dir, cases, tmp_path),
        nprocs=2,
        start_method="spawn",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (name, (settings, batch, adv)) in enumerate(zip(CASES, cases, strict=True)):
            one = build_learner(tiny_model_dir, settings)
            before = weights(one)
            m1 = one.update(batch, adv)
            w1 = weights(one)
            r0, r1 = (torch.load(tmp_path / f"rank{r}_case{i}.pt") for r in (0, 1))
            for k in w1:  # the ranks stay replicas, bit for bit
                assert torch.equal(r0["weights"][k], r1["weights"][k]), (name, k)
            assert max(float((w1[k] - before[k]).abs().max()) for k in w1) > 1e-2, name
            for k in w1:
                torch.testing.assert_close(
                    r0["weights"][k], w1[k], rtol=0, atol=WEIGHT_ATOL, msg=f"{name} {k}"
                )
            for key in EXACT:
                assert r0["metrics"][key] == m1[key] == r1["metrics"][key], (name, key)
            for key in ("loss/policy", "optim/grad_norm", "loss/token_loss_mean"):
                assert r0["metrics"][key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    finally:
        torch.set_num_threads(threads)
    first = torch.load(tmp_path / "rank0_case0.pt")["metrics"]
    assert first["loss/dropped_sequences"] > 0  # the drop rule fired
    assert torch.load(tmp_path / "rank0_case1.pt")["metrics"]["optim/skipped_zero_advantage"] == 1
