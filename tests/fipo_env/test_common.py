"""Shared env pieces (decoder fast path, prompt cache) and the embedded model's tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from fipo_env.config import EnvConfig
from fipo_env.envs import common
from fipo_env.envs.math_reasoning import MathReasoningEnv


def _random_seqs(tok, n, length, seed):
    rng = np.random.default_rng(seed)
    specials = list(tok.all_special_ids)
    out = []
    for _ in range(n):
        seq = rng.integers(0, len(tok), size=length)
        seq[rng.random(length) < 0.05] = rng.choice(specials)
        out.append(seq.tolist())
    return out


def test_batch_decoder_matches_transformers(tiny_tokenizer):
    decode = common.make_batch_decoder(tiny_tokenizer)
    seqs = _random_seqs(tiny_tokenizer, 20, 50, 0) + [[]]
    assert decode(seqs) == tiny_tokenizer.batch_decode(seqs, skip_special_tokens=True)


def test_prompt_cache_returns_the_rendered_prompt_read_only(tiny_tokenizer):
    cfg = EnvConfig()
    cache = common.PromptCache(tiny_tokenizer, cfg, maxsize=2)
    a = cache("What is 1 + 2?")
    assert a.tolist() == common.render_prompt(tiny_tokenizer, cfg, "What is 1 + 2?")
    assert cache("What is 1 + 2?") is a and not a.flags.writeable
    cache("q2")
    cache("q3")  # evicts the oldest entry
    assert cache("What is 1 + 2?") is not a


def test_embedded_smollm2_tokenizer_end_to_end(default_model_dir, local_verifier):
    import gymnasium as gym

    import fipo_env

    # No tokenizer argument: the embedded default model's tokenizer, loaded offline.
    env = gym.make(fipo_env.ENV_ID, verifier=local_verifier, max_response_tokens=32)
    tok = env.tokenizer
    assert tok.name_or_path == str(default_model_dir)
    assert env.stop_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert env.action_space.n == len(tok) == 49152
    obs, info = env.reset(seed=0)
    prompt = tok.decode(obs["prompt_ids"][: int(obs["prompt_len"])].tolist())
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert info["problem"] in prompt
    ids = tok(f"The sum is \\boxed{{{info['gold']}}}.", add_special_tokens=False)["input_ids"]
    *_, r, term, trunc, fin = env.step_tokens([*ids, tok.eos_token_id, 17, 18])
    assert (r, term, trunc, fin["status"]) == (1.0, True, False, "OK")
    assert fin["tokens_consumed"] == len(ids) + 1
    decode = common.make_batch_decoder(tok)
    seqs = _random_seqs(tok, 8, 64, 1)
    assert decode(seqs) == tok.batch_decode(seqs, skip_special_tokens=True)


@pytest.mark.parametrize("bad", [0, 1])
def test_vocab_size_override_is_validated(tiny_tokenizer, local_verifier, bad):
    with pytest.raises(ValueError, match="vocab_size"):
        MathReasoningEnv(tokenizer=tiny_tokenizer, verifier=local_verifier, vocab_size=bad)
