"""Per-token log-probabilities of responses without a full-vocabulary fp32 log-softmax.

A naive ``log_softmax(logits.float())`` over ``[B, L, V]`` costs ``4 * B * L * V`` bytes
(2 x 16k tokens x 152k vocab = 19 GiB, before autograd keeps a copy). Here only the
response positions are projected, in chunks of ``chunk_tokens`` rows: for each chunk the
``[chunk, V]`` logits are made, upcast to fp32, reduced to ``logit[target] -
logsumexp(logits)`` and dropped. Under autograd, when all the logits would be large
(over 1 GiB by default), each chunk runs inside ``torch.utils.checkpoint`` so backward
recomputes the chunk's logits instead of keeping them: peak memory is then one chunk's
logits, whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.packing import MicroBatch


def _chunk_logp(
    hidden: torch.Tensor,  # [n, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [n]
    temperature: float,
    softcap: float,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [n] fp32 (and entropy [n])
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    if not with_entropy:
        return target_logits - lse
    with torch.no_grad():  # H = lse - sum(p * logits): a metric, detached, this chunk only
        entropy = lse.detach() - (torch.softmax(logits.detach(), dim=-1) * logits.detach()).sum(-1)
    return target_logits - lse, entropy


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    softcap: float = 0.0,
    recompute_above_bytes: int = 1 << 30,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token under ``softmax(hidden @ weight.T + bias)``.

    Args:
        hidden: Final hidden states of the positions that predict ``targets``.  # [N, H]
        weight: Output-embedding (LM head) matrix.  # [V, H]
        targets: Token ids to score.  # [N]
        bias: Optional LM-head bias.  # [V]
        chunk_tokens: Rows projected at once; bounds memory to ``chunk_tokens * V`` fp32.
        temperature: Logits are divided by it (match the sampling temperature).
        softcap: Final-logit soft-capping constant (Gemma-2 style); 0 = none.
        recompute_above_bytes: Under autograd, chunks are checkpointed (logits recomputed
            in backward) when all ``N x V`` fp32 logits would take more than this; below
            it they are kept, which saves a second LM-head projection (~4 % of an update
            for the CPU default, whose ~900-token micro-batches need ~180 MB).
        with_entropy: Also return the entropy of each position's full distribution
            (detached; computed chunk by chunk from the same logits, nothing kept).

    Returns:
        fp32 log-probs  # [N]
        (and, with ``with_entropy``, fp32 entropies  # [N])
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]} entries"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
    use_checkpoint = (
        torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad)
        and hidden.shape[0] * weight.shape[0] * 4 > recompute_above_bytes
    )
    pieces, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start : start + chunk_tokens]
        t = targets[start : start + chunk_tokens]
        args = (h, weight, bias, t, temperature, softcap, with_entropy)
        if use_checkpoint:
            piece = checkpoint(_chunk_logp, *args, use_reentrant=False)
        else:
            piece = _chunk_logp(*args)
        if with_entropy:
            piece, entropy = piece
            entropies.append(entropy)
        pieces.append(piece)
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if with_entropy else empty
    if with_entropy:
        return torch.cat(pieces), torch.cat(entropies)
    return torch.cat(pieces)


def micro_batch_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    *,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens of a :class:`trainer.packing.MicroBatch`.

    Args:
        model: A Hugging Face causal LM (``base_model`` + output embeddings), on the device
            the result should be on.
        mb: The micro-batch, padded or shared-prompt layout (``trainer.packing``).
        chunk_tokens: See :func:`chunked_token_logprobs`.
        temperature: Sampling temperature the responses were drawn with.
        with_entropy: Also return the policy's entropy at each response token (detached).

    Returns:
        fp32 log-probs, 0 where ``mb.response_mask`` is 0  # [b, T]
        (and, with ``with_entropy``, the entropies laid out the same way  # [b, T])
    """
    device = model.get_output_embeddings().weight.device
    extra = {}
    if mb.segments is not None:
        from trainer.segment_attention import NAME

        if getattr(model.config, "_attn_implementation", None) != NAME:
            raise ValueError(
                "a shared-prompt micro-batch needs the model switched to block attention "
                "(trainer.segment_attention.use_segment_attention)"
            )
        extra["segments"] = mb.segments
    mask = None if mb.attention_mask is None else mb.attention_mask.to(device)
    hidden = model.base_model(
        input_ids=mb.input_ids.to(device),
        attention_mask=mask,
        position_ids=mb.position_ids.to(device),
        use_cache=False,
        **extra,
    )[0]  # [R, L, H]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [R * L, H]
    h = hidden[mb.src.to(device)]  # [N, H]
    head = model.get_output_embeddings()
    softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
    flat = chunked_token_logprobs(
        h,
        head.weight,
        mb.targets.to(device),
        bias=getattr(head, "bias", None),
        chunk_tokens=chunk_tokens,
        temperature=temperature,
        softcap=softcap,
        with_entropy=with_entropy,
    )
    index = (mb.out_row.to(device), mb.out_col.to(device))
    result = torch.zeros(mb.response_mask.shape, dtype=torch.float32, device=device)
    if with_entropy:
        flat, entropy = flat
        return result.index_put(index, flat), torch.zeros_like(result).index_put(index, entropy)
    return result.index_put(index, flat)
