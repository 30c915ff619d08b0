"""Chunked token log-probs equal a full-vocabulary log-softmax, values and gradients."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_engines_support import tiny_llama  # noqa: E402 (tests/trainer/conftest.py puts it on sys.path)

from trainer.logprobs import chunked_token_logprobs, micro_batch_logprobs  # noqa: E402
from trainer.packing import Sequences, make_micro_batch  # noqa: E402
from trainer.segment_attention import use_segment_attention  # noqa: E402


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


def _shared_prompt_rows() -> Sequences:
    """Two prompts with three and two samples (one empty), interleaved."""
    prompts = [(5, 6, 7), (8, 9), (5, 6, 7), (8, 9), (5, 6, 7)]
    responses = [(10, 11, 12, 13), (14,), (15, 16), (17, 18, 19, 20, 21), ()]
    n = len(prompts)
    return Sequences(
        prompts=prompts,
        responses=responses,
        behaviour_logp=[tuple(0.0 for _ in r) for r in responses],
        advantages=torch.zeros(n),
        versions=torch.zeros(n, dtype=torch.long),
        groups=torch.tensor([0, 1, 0, 1, 0]),
    )


@pytest.mark.parametrize("shared", [False, True], ids=["padded", "shared-prompt"])
def test_micro_batch_logprobs_match_model_logits(shared: bool) -> None:
    model = tiny_llama()
    if shared:
        use_segment_attention(model)
    seqs = _shared_prompt_rows()
    mb = make_micro_batch(seqs, range(len(seqs)), pad_id=0, shared_prompt=shared)
    got = micro_batch_logprobs(model, mb, chunk_tokens=2)
    for i, (p, r) in enumerate(zip(seqs.prompts, seqs.responses, strict=True)):
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].float()
        full = torch.log_softmax(logits, -1)
        want = torch.tensor([full[len(p) + t - 1, tok] for t, tok in enumerate(r)])
        torch.testing.assert_close(got[i, : len(r)], want, rtol=1e-5, atol=1e-5)
        assert torch.all(got[i, len(r) :] == 0)


def test_shared_prompt_layout_gives_the_padded_layouts_gradients() -> None:
    seqs = _shared_prompt_rows()
    weights = torch.linspace(-1, 1, 8)  # a fixed, non-uniform loss over the tokens
    grads = []
    for shared in (False, True):
        model = tiny_llama()
        if shared:
            use_segment_attention(model)
        mb = make_micro_batch(seqs, range(len(seqs)), pad_id=0, shared_prompt=shared)
        assert mb.padded_tokens == (17 if shared else 5 * 7)  # 5 prompt + 12 response tokens
        lp = micro_batch_logprobs(model, mb, chunk_tokens=3)
        (lp * weights[: lp.shape[1]]).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_recomputed_chunks_give_the_same_gradients_as_kept_ones() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(31, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 31, (40,))
    out = []
    for threshold in (0, 1 << 40):  # always checkpoint / never checkpoint
        lp = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=7,
                                    recompute_above_bytes=threshold)  # fmt: skip
        out.append((lp, torch.autograd.grad(lp.sum(), (hidden, weight))))
    torch.testing.assert_close(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_shared_prompt_micro_batch_needs_block_attention() -> None:
    model = tiny_llama()  # not switched to block attention
    seqs = _shared_prompt_rows()
    mb = make_micro_batch(seqs, range(len(seqs)), pad_id=0, shared_prompt=True)
    with pytest.raises(ValueError, match="block attention"):
        micro_batch_logprobs(model, mb)


def test_chunked_entropy_matches_the_full_softmax() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 5), torch.randn(11, 5)
    targets = torch.randint(0, 11, (7,))
    logp, entropy = chunked_token_logprobs(
        hidden, weight, targets, chunk_tokens=3, temperature=0.7, with_entropy=True
    )
    full = torch.log_softmax(hidden @ weight.T / 0.7, dim=-1)
    torch.testing.assert_close(logp, full.gather(1, targets[:, None])[:, 0])
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))
    assert not entropy.requires_grad
