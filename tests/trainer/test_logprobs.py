"""Chunked token log-probs equal a full-vocabulary log-softmax, values and gradients."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.logprobs import chunked_token_logprobs, response_logprobs  # noqa: E402


def _tiny_llama(vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_full_log_softmax(chunk: int, temperature: float) -> None:
    torch.manual_seed(1)
    hidden = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(31, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(31, dtype=torch.float64)
    targets = torch.randint(0, 31, (53,))
    got = chunked_token_logprobs(
        hidden, weight, targets, bias=bias, chunk_tokens=chunk, temperature=temperature
    )
    full = torch.log_softmax((hidden @ weight.T + bias).float() / temperature, -1)
    want = full.gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g_got = torch.autograd.grad(got.sum(), (hidden, weight))
    g_want = torch.autograd.grad(want.sum(), (hidden, weight))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logprobs(
            torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long)
        )


def test_response_logprobs_match_model_logits_on_padded_rows() -> None:
    model = _tiny_llama()
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, 12, 13], [14]]
    L = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    T = max(len(r) for r in responses)
    ids = torch.zeros(2, L, dtype=torch.long)
    attn = torch.zeros(2, L, dtype=torch.long)
    rmask = torch.zeros(2, T)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        rmask[i, : len(r)] = 1
    plens = torch.tensor([len(p) for p in prompts])
    got = response_logprobs(model, ids, attn, plens, rmask, chunk_tokens=2)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(seq).logits[0].float()
        full = torch.log_softmax(logits, -1)
        want = torch.stack([full[len(p) + t - 1, tok] for t, tok in enumerate(r)])
        torch.testing.assert_close(got[i, : len(r)], want, rtol=1e-5, atol=1e-5)
        assert torch.all(got[i, len(r) :] == 0)
