"""``RayLearnerGroup``: K = 2 learner ranks as Ray actors on a local Ray (CPU, gloo).

One test, one group (starting the actors dominates the cost): the group's update equals
one ``Learner``'s on the same batch with the sequence-drop rule firing; then rank 1 is
killed, the next update raises ``LearnerRankError`` naming it, ``close()`` leaves no
rank process, the last checkpoint resumes in a single-process learner, and after
``ray.shutdown()`` no Ray process of this test is left.

Ray runs its own local instance (``address="local"``): never one another test or user
started on this machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
import torch
from distributed_support import (
    advantages,
    build_learner,
    init_local_ray,
    make_batch,
    train_config,
    weights,
)

# AdamW (the real optimiser) makes its first steps ~lr * sign(grad): rounding-level
# gradient differences between 1 and 2 ranks (summation order) can move a weight whose
# gradient is ~0 by up to ~lr. lr = 0.05; measured max difference 3e-6.
WEIGHT_ATOL = 1e-4
SETTINGS = {
    "model": {"micro_batch_tokens": 16},
    "algorithm": {"name": "fipo", "clip_high": 0.0, "dual_clip": 1.02},
    "mini_batches": 2,
    "lr": 0.05,
}


RAY_PROCESS = "<any Ray process>"


def _ray_children(pattern: str = "") -> list[str]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            line = " ".join(proc.cmdline()) or proc.name()
        except psutil.NoSuchProcess:
            continue
        # RAY_PROCESS: Ray's own (gcs_server, raylet, dashboard, monitors: they run from
        # the ray package) and its workers (which rename themselves "ray::..."); not
        # multiprocessing's forkserver, whose command line lists sys.path (Ray adds its
        # thirdparty_files folder there) and which lives as long as this interpreter.
        is_ray = line.startswith("ray::") or (
            f"{os.sep}ray{os.sep}" in line and "multiprocessing" not in line
        )
        if is_ray if pattern == RAY_PROCESS else pattern in line:
            out.append(line[:120])
    return out


def _wait_until_none(pattern: str, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := _ray_children(pattern)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_ray_group_matches_one_learner_and_a_killed_rank_stops_cleanly(
    tiny_model_dir: Path,
) -> None:
    ray = pytest.importorskip("ray")
    from trainer.learner import build_loss_config
    from trainer.learner_group import LearnerRankError, RayLearnerGroup

    batch = make_batch(9)
    adv = advantages(batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = build_learner(tiny_model_dir, SETTINGS)
        m1 = one.update(batch, adv)
    finally:
        torch.set_num_threads(threads)
    w1 = weights(one)

    init_local_ray(2)
    try:
        cfg = train_config(tiny_model_dir, **SETTINGS)
        group = RayLearnerGroup(cfg, tiny_model_dir, build_loss_config(cfg.algorithm), 0, ranks=2)
        try:
            assert len(_ray_children("ray::_LearnerRank")) == 2  # what close() must end
            m2 = group.update(batch, adv)
            assert group.version == 1
            assert m2["loss/dropped_sequences"] == m1["loss/dropped_sequences"] > 0
            for key in ("loss/num_tokens", "loss/num_sequences", "optim/steps"):
                assert m2[key] == m1[key], key
            w2 = group.hf_state_dict()
            for k in w1:
                torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
            # What a publish sends: rank 0's weights in the engine dtype, by reference.
            ref = group.weights_ref("bfloat16")
            assert isinstance(ref, ray.ObjectRef)
            sent = ray.get(ref)
            assert sent.keys() == w2.keys()
            for k, v in sent.items():
                assert v.dtype == torch.bfloat16 and torch.equal(v, w2[k].to(torch.bfloat16)), k
            checkpoint = group.state_dict()

            ray.kill(group.actors[1])
            with pytest.raises(LearnerRankError) as info:
                group.update(batch, adv)
            assert info.value.rank == 1 and "rank 1" in str(info.value)
            with pytest.raises(LearnerRankError):  # the group stays stopped
                group.hf_state_dict()
        finally:
            group.close()
        assert _wait_until_none("ray::_LearnerRank") == []
        with pytest.raises(RuntimeError, match="closed"):
            group.update(batch, adv)
    finally:
        ray.shutdown()
    assert _wait_until_none(RAY_PROCESS) == []

    # The checkpoint resumes on one process: the group's weights, version and steps.
    resumed = build_learner(tiny_model_dir, SETTINGS)
    resumed.load_state_dict(checkpoint)
    assert resumed.version == 1 and resumed.optimizer_steps == one.optimizer_steps
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, w1[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
