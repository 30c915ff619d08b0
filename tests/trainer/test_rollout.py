"""The rollout worker process and ``ProcessRolloutSource`` (HF engine, tiny model).

Covers what the learner relies on: batches arrive in order, every group is stamped with
the policy version that generated it, the worker never runs more than ``max_staleness``
versions ahead, a crashed worker is restarted from the newest weights, and ``close()``
leaves no process behind. Nothing here depends on timing: staleness is checked through
the versions and the worker's own report of what it is waiting for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: find the helpers
from test_engines_support import live_descendants  # noqa: E402

from trainer.config import RolloutConfig  # noqa: E402
from trainer.engines import EngineConfig, SamplingConfig, vllm_available  # noqa: E402
from trainer.rollout import (  # noqa: E402
    ProcessRolloutSource,
    RolloutTimeoutError,
    RolloutWorkerConfig,
    RolloutWorkerError,
    build_groups,
    informative_mask,
    keep_informative,
)
from trainer.types import Generation, RolloutGroup  # noqa: E402

TIMEOUT_S = 600  # generous: the machine is shared; no assertion depends on speed


@pytest.fixture(scope="module")
def tiny_weights(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).state_dict()


def worker_config(model_dir, **kw) -> RolloutWorkerConfig:
    """A small worker config; ``kw`` may name ``rollout`` fields or worker fields."""
    rollout = {
        "group_size": 2,
        "prompts_per_step": 2,
        "max_prompt_tokens": 96,
        "max_response_tokens": 6,
        "dynamic_sampling": False,
    }
    worker = {"engine": EngineConfig(model_dir=str(model_dir), kind="hf", dtype="float32")}
    worker_fields = {f.name for f in dataclasses.fields(RolloutWorkerConfig)}
    for key, value in kw.items():  # `engine` is the worker's EngineConfig, not rollout.engine
        (worker if key in worker_fields else rollout)[key] = value
    return RolloutWorkerConfig(rollout=RolloutConfig(**rollout), **worker)


def assert_no_orphans(source: ProcessRolloutSource, pid: int | None) -> None:
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert live_descendants() == []


# ---------------------------------------------------------------- pure pieces


def gen(tokens, lp=-0.5, reason="stop"):
    return Generation(tuple(tokens), tuple(lp for _ in tokens), reason)


def test_build_groups_cuts_responses_to_what_the_env_consumed():
    gens = [[gen([5, 6, 2]), gen([7, 8, 9, 2])], [gen([1, 2]), gen([3, 3, 3], reason="length")]]
    groups = build_groups(
        prompts=[[10, 11], [12]],
        generations=gens,
        consumed=[3, 2, 2, 3],  # the env stopped sample 1 early (its length limit)
        rewards=[1.0, 0.0, 0.0, 0.0],
        correct=[True, False, False, False],
        truncated=[False, True, False, True],
        version=7,
        problems=["p0", "p1"],
        answers=["a0", "a1"],
    )
    assert [g.policy_version for g in groups] == [7, 7]
    assert groups[0].response_ids == ((5, 6, 2), (7, 8))
    assert groups[0].behaviour_logp == ((-0.5,) * 3, (-0.5,) * 2)
    assert groups[0].rewards.tolist() == [1.0, 0.0] and groups[0].truncated.tolist() == [0, 1]
    assert groups[1].prompt_ids == (12,) and groups[1].problem == "p1"
    with pytest.raises(RuntimeError, match="consumed"):
        build_groups([[1]], [[gen([4])]], [2], [0.0], [False], [False], 0)


def test_keep_informative_drops_groups_with_equal_rewards():
    def group(rewards):
        g = len(rewards)
        return RolloutGroup(
            prompt_ids=(1,),
            response_ids=((2,),) * g,
            behaviour_logp=((0.0,),) * g,
            rewards=np.asarray(rewards, dtype=float),
            correct=np.asarray(rewards) > 0,
            truncated=np.zeros(g, dtype=bool),
            policy_version=0,
        )

    groups = [group([1, 1]), group([0, 1]), group([0, 0]), group([1, 0])]
    assert keep_informative(groups) == [groups[1], groups[3]]
    assert keep_informative([]) == []


def test_dynamic_sampling_filters_on_correctness_by_default():
    """An all-correct group whose rewards differ only by the soft overlong penalty is
    dropped (DAPO's acc filter); metric="reward" keeps it."""
    g = 16

    def group(correct, penalty):
        correct = np.asarray(correct, dtype=bool)
        return RolloutGroup(
            prompt_ids=(1,),
            response_ids=((2,),) * g,
            behaviour_logp=((0.0,),) * g,
            rewards=np.where(correct, 1.0, -1.0) + np.asarray(penalty),
            correct=correct,
            truncated=np.zeros(g, dtype=bool),
            policy_version=0,
        )

    long_one = group([True] * g, [0.0] * (g - 1) + [-0.1])
    mixed = group([True, False] * (g // 2), [0.0] * g)
    # What the reward filter lets through: A = -3.75 for the long response.
    from trainer.advantages import group_advantages

    assert group_advantages(long_one.rewards[None])[0, -1] == pytest.approx(-3.75, abs=1e-3)
    assert keep_informative([long_one, mixed]) == [mixed]
    assert keep_informative([long_one, mixed], "acc") == [mixed]
    assert keep_informative([long_one, mixed], "reward") == [long_one, mixed]
    assert informative_mask([long_one, mixed]).tolist() == [False, True]
    with pytest.raises(ValueError, match="metric"):
        keep_informative([mixed], "loss")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"group_size": 0}, "group_size"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"reward_scheme": "ternary"}, "reward_scheme"),
        ({"max_response_tokens": 4000}, "max_response_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_sampling_rounds": 0}, "max_sampling_rounds"),
    ],
)
def test_worker_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        worker_config("m", **kwargs)


# ---------------------------------------------------------------- worker processes


def test_synchronous_source_stamps_versions_restarts_and_closes_cleanly(tiny_dir, tiny_weights):
    """max_staleness=0: batch k is made by version k exactly; a killed worker comes back."""
    source = ProcessRolloutSource(worker_config(tiny_dir, max_staleness=0), initial_version=3)
    first_pid = source.worker_pid
    try:
        for step in range(3, 5):
            batch = source.next_batch(timeout_s=TIMEOUT_S)
            assert len(batch.groups) == 2 and batch.num_generated_groups == 2
            assert [g.policy_version for g in batch.groups] == [step, step]
            for g in batch.groups:
                assert len(g.response_ids) == 2 and g.problem and g.answer
                for ids, lps in zip(g.response_ids, g.behaviour_logp, strict=True):
                    assert 1 <= len(ids) == len(lps) <= 6
            assert batch.gen_tokens >= sum(len(r) for g in batch.groups for r in g.response_ids)
            # Without a publish the next batch can never be made: a clear error, no hang.
            with pytest.raises(RuntimeError, match="publish"):
                source.next_batch(timeout_s=TIMEOUT_S)
            source.publish(tiny_weights, version=step + 1)
        with pytest.raises(ValueError, match="increase"):
            source.publish(tiny_weights, version=5)

        # A crash (SIGKILL, no goodbye) is noticed and the worker restarted from the
        # newest weights; the learner just gets its next batch.
        os.kill(first_pid, signal.SIGKILL)
        batch = source.next_batch(timeout_s=TIMEOUT_S)
        assert [g.policy_version for g in batch.groups] == [5, 5]
        assert source.restarts == 1 and source.worker_pid != first_pid
        source.publish(tiny_weights, version=6)
        out, version = source.generate([[1, 2, 3]], 2, SamplingConfig(max_tokens=3))
        assert version == 6 and len(out) == 1 and len(out[0]) == 2
    finally:
        pid = source.worker_pid
        source.close()
    assert_no_orphans(source, pid)
    assert not source._files.dir.exists()  # weight and batch files are gone
    with pytest.raises(RuntimeError, match="closed"):
        source.next_batch()


def test_async_source_respects_max_staleness(tiny_dir, tiny_weights):
    """max_staleness=1: the worker makes one batch ahead, then waits for the learner."""
    cfg = worker_config(tiny_dir, max_staleness=1, dynamic_sampling=True, max_sampling_rounds=2)
    with ProcessRolloutSource(cfg) as source:
        pid = source.worker_pid
        b0 = source.next_batch(timeout_s=TIMEOUT_S)
        b1 = source.next_batch(timeout_s=TIMEOUT_S)
        assert b0.min_policy_version == b1.min_policy_version == 0
        # The worker has made batches 0 and 1 and now needs version 1 for batch 2; it
        # answers this only while it waits, so it cannot be generating batch 2.
        state = source.worker_state(timeout_s=TIMEOUT_S)
        assert state == {
            "version": 0,
            "next_batch": 2,
            "waiting_for_version": 1,
            "started": True,
        }
        assert not source.worker_busy()  # waiting: the learner may take every core
        for learner_version in range(1, 4):
            source.publish(tiny_weights, version=learner_version)
            batch = source.next_batch(timeout_s=TIMEOUT_S)
            assert learner_version - batch.min_policy_version <= 1
            assert batch.min_policy_version >= learner_version - 1
        # The random tiny model solves nothing, so every group has equal rewards: dynamic
        # sampling drops them all, stops after max_sampling_rounds and returns the last
        # round's groups rather than an empty batch.
        assert batch.num_generated_groups == 2 * 2
        assert all(np.ptp(g.rewards) == 0 for g in batch.groups)
    assert_no_orphans(source, pid)


def test_worker_start_failure_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    source = ProcessRolloutSource(worker_config(tmp_path))
    pid = source.worker_pid
    with pytest.raises(RolloutWorkerError, match="could not start"):
        source.wait_ready(timeout_s=TIMEOUT_S)
    assert_no_orphans(source, pid)


_FAKE_WORKER = """
import os, subprocess, sys, time
os.setpgid(0, 0)
from trainer.rollout.procs import die_with_parent
die_with_parent()
child = subprocess.Popen(["sleep", "600"])  # like vLLM's EngineCore: unaware of our parent
print(os.getpid(), child.pid, flush=True)
time.sleep(600)
"""

_FAKE_LEARNER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", {worker!r}], stdout=sys.stdout)
time.sleep(600)
"""


def test_killing_the_learner_takes_the_workers_children_down():
    """kill -9 of the learner: the rollout worker and every process it started (vLLM's
    EngineCore and workers do not watch the learner themselves) go too."""
    import subprocess

    script = _FAKE_LEARNER.format(worker=_FAKE_WORKER)
    learner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in learner.stdout.readline().split()]
        procs = [psutil.Process(pid) for pid in pids]
        learner.kill()
        learner.wait(30)
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert alive == [], f"orphans left after the learner died: {alive}"
    finally:
        if learner.poll() is None:
            learner.kill()
        for pid in pids if "pids" in locals() else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


# ---------------------------------------------------------------- failing clearly


def test_kv_cache_is_sized_in_bytes_from_the_model(default_model_dir):
    from trainer.engines.vllm_engine import cpu_kv_cache_bytes, kv_cache_bytes

    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, a key and a value, 2 bytes in bf16.
    assert kv_cache_bytes(default_model_dir, 1, "bfloat16") == 2 * 30 * 3 * 64 * 2
    assert kv_cache_bytes(default_model_dir, 10, "float32") == 10 * 2 * 30 * 3 * 64 * 4
    cfg = EngineConfig(model_dir=str(default_model_dir), max_num_seqs=64, max_model_len=352)
    assert cpu_kv_cache_bytes(cfg, default_model_dir, "bfloat16") == 64 * 352 * 23040
    fixed = EngineConfig(model_dir=str(default_model_dir), kv_cache_gib=0.5)
    assert cpu_kv_cache_bytes(fixed, default_model_dir, "bfloat16") == 2**29


def test_too_little_free_memory_is_refused_with_the_figures(tiny_dir):
    from trainer.engines.vllm_engine import EngineStartError, check_free_memory

    with pytest.raises(
        EngineStartError, match=r"needs .* GiB .* only .* GiB is free.*kv_cache_gib"
    ):
        check_free_memory(2**50, tiny_dir)
    check_free_memory(2**20, tiny_dir)  # a MiB always fits


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed: auto is HF already")
def test_auto_engine_falls_back_to_hf_with_a_reason(tiny_dir, tmp_path):
    """vLLM that cannot start (here: a KV cache larger than the machine) under
    ``kind="auto"``: the worker runs HF ``generate`` and says why in one line; the
    traceback goes to the worker's log file. ``kind="vllm"`` fails loudly instead."""
    log = tmp_path / "worker.log"
    huge = {"model_dir": str(tiny_dir), "dtype": "float32", "kv_cache_gib": 2.0**20}
    source = ProcessRolloutSource(
        worker_config(tiny_dir, engine=EngineConfig(kind="auto", **huge), log_file=str(log)),
        autostart=False,
    )
    with source:
        source.wait_ready(timeout_s=TIMEOUT_S)
        assert source.engine_kind == "hf"
        assert "falling back to Hugging Face generate" in source.engine_note
        assert "needs" in source.engine_note and "\n" not in source.engine_note
        out, _ = source.generate([[1, 2, 3]], 2, SamplingConfig(max_tokens=3))
        assert len(out[0]) == 2
    assert "EngineStartError" in log.read_text()

    loud = ProcessRolloutSource(
        worker_config(tiny_dir, engine=EngineConfig(kind="vllm", **huge), log_file=str(log)),
        autostart=False,
    )
    with loud, pytest.raises(RolloutWorkerError, match="could not start(.|\n)*needs"):
        loud.wait_ready(timeout_s=TIMEOUT_S)


def test_a_worker_that_does_not_answer_in_time_names_phase_and_setting(tiny_dir):
    source = ProcessRolloutSource(worker_config(tiny_dir), autostart=False)
    with source:
        with pytest.raises(RolloutTimeoutError, match=r"start-up within 0 s.*start_timeout_s"):
            source.wait_ready(timeout_s=1e-6)
        source.wait_ready(timeout_s=TIMEOUT_S)
        prompts = [[1, 2, 3]] * 4
        with pytest.raises(TimeoutError, match=r"its eval within 0 s.*request_timeout_s"):
            source.generate(prompts, 1, SamplingConfig(max_tokens=3), timeout_s=1e-6, phase="eval")


def test_a_generate_requests_wait_grows_with_the_work(tiny_dir):
    from trainer.rollout.source import MIN_TOKENS_PER_S, request_timeout

    cfg = worker_config(tiny_dir, request_timeout_s=60.0)
    assert request_timeout(cfg, prompts=1, n=1, max_tokens=1) == pytest.approx(
        60 + 1 / MIN_TOKENS_PER_S
    )
    # 200 eval problems x 96 tokens: far more than the base wait.
    assert request_timeout(cfg, prompts=200, n=1, max_tokens=96) == 60 + 200 * 96 / MIN_TOKENS_PER_S
