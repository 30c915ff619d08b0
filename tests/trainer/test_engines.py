"""Engines without vLLM: configs, the weight-file path, and the Hugging Face engine.

The HF engine runs in this process on a tiny random model; the vLLM engine (which must
live in a child process) is tested in ``test_engines_vllm.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib (no test dir on sys.path); the shared helpers
# live next to this file.
sys.path.insert(0, str(Path(__file__).parent))
from test_engines_support import (  # noqa: E402
    check_well_formed,
    perturb_,
    teacher_forced_logprobs,
)

from trainer.engines import EngineConfig, SamplingConfig  # noqa: E402
from trainer.engines.base import validate_prompts  # noqa: E402
from trainer.engines.weights import WeightFiles, iter_weights, save_weights  # noqa: E402


@pytest.fixture(scope="module")
def hf_engine(tiny_dir):
    from trainer.engines.hf_engine import HFEngine

    engine = HFEngine(EngineConfig(model_dir=str(tiny_dir), kind="hf", dtype="float32"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts():
    from fipo_env.models import load_tokenizer

    tok = load_tokenizer()
    chats = ["What is 3 + 4?", "Compute 12 * 3 and explain."]
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": c}], add_generation_prompt=True, return_dict=False
        )
        for c in chats
    ]


# ---------------------------------------------------------------- configs and inputs


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ],
)
def test_sampling_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "tgi"}, "kind"),
        ({"dtype": "int8"}, "dtype"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_engine_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model_dir="x", **kwargs)


@pytest.mark.parametrize(
    ("prompts", "n", "message"),
    [
        ([], 1, "at least one prompt"),
        ([[]], 1, "prompt 0 is empty"),
        ([[1, 2], [3, 99]], 1, "prompt 1 holds token id 99"),
        ([[1, "a"]], 1, "non-integer"),
        ([[1]], 0, "n "),
    ],
)
def test_validate_prompts_rejects_bad_input(prompts, n, message):
    with pytest.raises(ValueError, match=message):
        validate_prompts(prompts, n, vocab_size=50)


def test_engine_refuses_a_missing_model_dir(tmp_path):
    from trainer.engines.hf_engine import HFEngine

    with pytest.raises(FileNotFoundError, match="config.json"):
        HFEngine(EngineConfig(model_dir=str(tmp_path), kind="hf"))


# ---------------------------------------------------------------- weight files


def test_save_weights_clones_tied_tensors_and_round_trips(tmp_path):
    emb = torch.randn(8, 4)
    sd = {"embed.weight": emb, "lm_head.weight": emb, "t.weight": torch.randn(4, 3).t()}
    path = save_weights(sd, tmp_path / "w.safetensors")
    back = dict(iter_weights(path))
    assert set(back) == set(sd)
    for name, t in sd.items():
        assert torch.equal(back[name], t)
    half = dict(iter_weights(save_weights(sd, tmp_path / "h.safetensors", dtype="bfloat16")))
    assert half["embed.weight"].dtype == torch.bfloat16


def test_save_weights_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        save_weights({}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="not a tensor"):
        save_weights({"a": [1.0]}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="dtype"):
        save_weights({"a": torch.ones(1)}, tmp_path / "w.safetensors", dtype="int3")


def test_weight_files_keep_only_the_newest_after_prune(tmp_path):
    files = WeightFiles(root=tmp_path)
    first = files.write({"a": torch.ones(2)}, 1)
    files.set_current(first)
    second = files.write({"a": torch.zeros(2)}, 2)
    files.set_current(second)
    assert first.exists()  # still readable by an engine that has not switched yet
    files.prune()
    assert not first.exists() and second.exists()
    files.cleanup()
    assert not files.dir.exists()


def test_weight_files_remove_folders_of_dead_processes(tmp_path):
    import subprocess

    proc = subprocess.Popen(["true"])  # exits at once: its pid no longer exists after wait
    proc.wait()
    orphan = tmp_path / f"fipo-weights-{proc.pid}-abc"
    orphan.mkdir()
    alive = tmp_path / f"fipo-weights-{os.getppid()}-def"  # our parent is alive
    alive.mkdir()
    files = WeightFiles(root=tmp_path)
    assert not orphan.exists() and alive.exists()
    files.cleanup()


# ---------------------------------------------------------------- HF engine


def test_hf_generations_are_well_formed(hf_engine, prompts):
    sampling = SamplingConfig(max_tokens=12, temperature=1.0, stop_token_ids=(2,))
    gens = hf_engine.generate(prompts, 3, sampling)
    check_well_formed(gens, len(prompts), 3, 12, {2})


def test_hf_logprobs_are_the_sampling_distribution(hf_engine, prompts):
    # Temperature 1, no truncation: the engine's log-probs are the policy's, token by token.
    sampling = SamplingConfig(max_tokens=10, temperature=1.0)
    gens = hf_engine.generate(prompts, 2, sampling)
    for prompt, group in zip(prompts, gens, strict=True):
        for g in group:
            ref = teacher_forced_logprobs(hf_engine.model, prompt, g.token_ids)
            torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-4, rtol=0)
    # At temperature T the recorded log-probs are those of logits / T.
    hot = hf_engine.generate(prompts[:1], 1, SamplingConfig(max_tokens=6, temperature=2.0))[0][0]
    ids = torch.tensor([prompts[0] + list(hot.token_ids)])
    with torch.no_grad():
        logits = hf_engine.model(ids).logits[0, len(prompts[0]) - 1 : -1] / 2.0
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(hot.token_ids).view(-1, 1))
    torch.testing.assert_close(torch.tensor(hot.logprobs), ref.squeeze(1), atol=1e-4, rtol=0)


def test_hf_greedy_is_deterministic_and_top_k_1_matches_it(hf_engine, prompts):
    greedy = SamplingConfig(max_tokens=8, temperature=0.0)
    a = hf_engine.generate(prompts, 2, greedy)
    b = hf_engine.generate(prompts, 1, greedy)
    assert a[0][0].token_ids == a[0][1].token_ids == b[0][0].token_ids
    top1 = hf_engine.generate(prompts, 1, SamplingConfig(max_tokens=8, top_k=1))
    assert top1[0][0].token_ids == b[0][0].token_ids
    # Sampling from a single allowed token: its log-prob is 0.
    assert max(abs(x) for x in top1[0][0].logprobs) < 1e-5


def test_hf_load_weights_changes_the_policy(hf_engine, prompts, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    learner = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    perturb_(learner, scale=0.05)
    greedy = SamplingConfig(max_tokens=8, temperature=0.0)
    before = hf_engine.generate(prompts[:1], 1, greedy)[0][0]
    ref_before = teacher_forced_logprobs(learner, prompts[0], before.token_ids)
    assert (torch.tensor(before.logprobs) - ref_before).abs().max() > 1e-2
    original = {k: v.clone() for k, v in hf_engine.model.state_dict().items()}
    try:
        hf_engine.load_weights(save_weights(learner.state_dict(), tmp_path / "w.safetensors"))
        after = hf_engine.generate(prompts[:1], 1, greedy)[0][0]
        ref_after = teacher_forced_logprobs(learner, prompts[0], after.token_ids)
        torch.testing.assert_close(torch.tensor(after.logprobs), ref_after, atol=1e-4, rtol=0)
    finally:
        hf_engine.load_weights(save_weights(original, tmp_path / "orig.safetensors"))


def test_hf_load_weights_rejects_foreign_tensors(hf_engine, tmp_path):
    path = save_weights({"not.a.param": torch.ones(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(KeyError, match="not.a.param"):
        hf_engine.load_weights(path)
    with pytest.raises(FileNotFoundError):
        hf_engine.load_weights(tmp_path / "missing.safetensors")
