"""Publishing by broadcast on Ray (``cluster.weight_sync=broadcast``): one learner rank
(``RayLearnerGroup``, the bus's sender) and two HF rollout workers (``RayRolloutSource``,
ranks 1 and 2) on a local Ray, gloo on CPU.

After each update the learner's rank 0 broadcasts its weights; the workers' greedy
log-probs must then be the learner's (teacher-forced, float32) and their batches stamped
with its version. One worker's actor is killed between steps: the next broadcast finds
it dead, Ray restarts it, the bus is rebuilt (new port, every member joins again) and
the version sent again, and the restarted worker serves it. At the end no process of
this test is left.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: find the helpers
from distributed_support import advantages, init_local_ray, make_batch, train_config  # noqa: E402
from test_engines_support import kill_all, live_descendants, teacher_forced_logprobs  # noqa: E402

from trainer.config import ConfigError, RolloutConfig, build_config  # noqa: E402
from trainer.engines import EngineConfig, SamplingConfig  # noqa: E402
from trainer.rollout import RolloutWorkerConfig, RolloutWorkerError  # noqa: E402

TIMEOUT_S = 600  # generous: the machine is shared; no assertion depends on speed
GREEDY = SamplingConfig(max_tokens=8, temperature=0.0)


def test_weight_sync_setting_is_checked_by_name():
    assert build_config({}).cluster.weight_sync == "object_store"
    with pytest.raises(
        ConfigError, match=r"cluster.weight_sync must be 'object_store' or 'broadcast'"
    ):
        build_config({"cluster": {"address": "local", "weight_sync": "nccl"}})
    with pytest.raises(
        ConfigError, match=r"cluster.weight_sync is broadcast, which needs cluster.address"
    ):
        build_config({"cluster": {"weight_sync": "broadcast"}})
    cfg = build_config({"cluster": {"address": "local", "weight_sync": "broadcast"}})
    assert cfg.cluster.weight_sync == "broadcast"


def served_by_learner(source, learner_weights, model_dir, prompts, version):
    """Both workers serve ``version`` and sample with the learner's log-probs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(learner_weights)
    out, served = source.generate(prompts, 1, GREEDY, timeout_s=TIMEOUT_S)  # 1 per worker
    assert served == version
    for prompt, (gen,) in zip(prompts, out, strict=True):
        ref = teacher_forced_logprobs(model, prompt, gen.token_ids)
        torch.testing.assert_close(torch.tensor(gen.logprobs), ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_rank0_broadcasts_to_two_workers_and_a_restarted_worker_rejoins(tiny_dir):
    ray = pytest.importorskip("ray")
    from fipo_env.models import load_tokenizer
    from trainer.learner import build_loss_config
    from trainer.learner_group import RayLearnerGroup
    from trainer.rollout.ray_source import RayRolloutSource

    tok = load_tokenizer(tiny_dir)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in ("What is 3 + 4?", "Compute 12 * 3.")
    ]
    worker_cfg = RolloutWorkerConfig(
        engine=EngineConfig(model_dir=str(tiny_dir), kind="hf", dtype="float32"),
        rollout=RolloutConfig(
            group_size=2,
            prompts_per_step=3,
            max_prompt_tokens=96,
            max_response_tokens=6,
            dynamic_sampling=False,
            max_staleness=0,
        ),
    )
    earlier = {p.pid for p in live_descendants()}
    init_local_ray(3)
    group = source = None
    try:
        cfg = train_config(tiny_dir, lr=0.05)
        group = RayLearnerGroup(cfg, tiny_dir, build_loss_config(cfg.algorithm), 0, ranks=1)
        source = RayRolloutSource(worker_cfg, num_workers=2, sender=group, bus_timeout_s=120)
        source.wait_ready(timeout_s=TIMEOUT_S)
        batch = source.next_batch(timeout_s=TIMEOUT_S)
        assert [g.policy_version for g in batch.groups] == [0, 0, 0]
        with pytest.raises(ValueError, match="increase"):
            source.broadcast(0)

        for version in (1, 2):
            if version == 2:  # killed between steps; Ray restarts the actor
                pid = source.worker_info()[1]["pid"]
                ray.kill(source.actors[1], no_restart=False)
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).wait(timeout=60)
            group.update(make_batch(version), advantages(make_batch(version)))
            assert group.version == version
            source.broadcast(version)  # rank 0 sends, both workers receive
            served_by_learner(source, group.hf_state_dict(), tiny_dir, prompts, version)
            batch = source.next_batch(timeout_s=TIMEOUT_S)
            assert [g.policy_version for g in batch.groups] == [version] * 3
        assert source.restarts == 1
        assert source.worker_info()[1]["pid"] != pid
        # A version the learner is not at is refused by rank 0, and the workers are told
        # at once (an abort over the bus), not after the 120 s bus timeout.
        t0 = time.monotonic()
        with pytest.raises(RolloutWorkerError, match="learner is at version 2, not 3"):
            source.broadcast(3)
        assert time.monotonic() - t0 < 60
    finally:
        if source is not None:
            source.close()
        if group is not None:
            group.close()
        ray.shutdown()
        ours = [p for p in live_descendants() if p.pid not in earlier]
        _, alive = psutil.wait_procs(ours, timeout=30)
        kill_all(alive)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"
