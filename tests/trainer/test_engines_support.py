"""Helpers shared by the engine and rollout tests (no tests of its own).

A tiny randomly initialised Llama with the embedded model's tokenizer keeps the rollout
worker tests fast: the machinery under test (processes, queues, versions, env driving)
does not depend on the model being any good.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_model(dst: Path, tokenizer_src: Path, seed: int = 0, head_dim: int = 16) -> Path:
    """Save a 2-layer, 64-wide Llama (~3 M parameters) with ``tokenizer_src``'s tokenizer.

    ``head_dim``: vLLM-CPU's attention kernels support only some head sizes (not 16: use
    64 for a model vLLM serves); the attention then projects to 4 x ``head_dim``.
    """
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    src_cfg = AutoConfig.from_pretrained(tokenizer_src, local_files_only=True)
    cfg = LlamaConfig(
        vocab_size=src_cfg.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=src_cfg.bos_token_id,
        eos_token_id=src_cfg.eos_token_id,
        pad_token_id=src_cfg.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (tokenizer_src / name).exists():
            shutil.copy(tokenizer_src / name, dst / name)
    return dst


def tiny_llama(vocab: int = 97, seed: int = 0):
    """A 2-layer, 32-wide random Llama over ``vocab`` tokens (no tokenizer), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
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


def teacher_forced_logprobs(model, prompt: Sequence[int], response: Sequence[int]) -> torch.Tensor:
    """Log-prob of each response token under ``model`` (temperature 1), ``[T]``."""
    ids = torch.tensor([list(prompt) + list(response)], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    target = torch.tensor(list(response), device=model.device).view(-1, 1)
    return torch.log_softmax(logits, dim=-1).gather(1, target).squeeze(1).cpu()


def live_descendants() -> list[psutil.Process]:
    """This process's live descendants, minus multiprocessing's shared helpers.

    The resource tracker and forkserver are started once per interpreter and live until
    it exits by design; they are not orphans of anything under test.
    """
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" in cmd or "forkserver" in cmd:
            continue
        out.append(p)
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL what a failed clean-up left, so one leak fails one test and does not leave
    processes that every later leftover check in the session would count as its own."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def perturb_(model, scale: float = 0.02, seed: int = 0) -> None:
    """Add Gaussian noise of std ``scale`` to every parameter of ``model``, in place.

    In place on ``named_parameters()`` so tied weights (embeddings = LM head) stay tied.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def check_well_formed(gens, n_prompts, n, max_tokens, stop_ids):
    """Shape and content rules every engine's output must satisfy."""
    assert len(gens) == n_prompts
    for group in gens:
        assert len(group) == n
        for g in group:
            assert len(g.token_ids) == len(g.logprobs) >= 1
            assert len(g.token_ids) <= max_tokens
            assert all(isinstance(t, int) for t in g.token_ids)
            assert all(math.isfinite(lp) and lp <= 1e-6 for lp in g.logprobs)
            if g.finish_reason == "stop":
                assert g.token_ids[-1] in stop_ids
                assert not any(t in stop_ids for t in g.token_ids[:-1])
            else:
                assert g.finish_reason == "length"
                assert len(g.token_ids) == max_tokens
                assert not any(t in stop_ids for t in g.token_ids)
