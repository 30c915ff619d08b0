"""Per-token log-probabilities of responses without a full-vocabulary fp32 log-softmax.

A naive ``log_softmax(logits.float())`` over ``[B, L, V]`` costs ``4 * B * L * V`` bytes
(2 x 16k tokens x 152k vocab = 19 GiB, before autograd keeps a copy). Here only the
response positions are projected, in chunks of ``chunk_tokens`` rows: for each chunk the
``[chunk, V]`` logits are made, upcast to fp32, reduced to ``logit[target] -
logsumexp(logits)`` and dropped. Under autograd each chunk runs inside
``torch.utils.checkpoint`` so backward recomputes the chunk's logits instead of keeping
them: peak memory is one chunk's logits, whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_logp(
    hidden: torch.Tensor,  # [n, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [n]
    temperature: float,
    softcap: float,
) -> torch.Tensor:  # [n] fp32
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Log-prob of each target token under ``softmax(hidden @ weight.T + bias)``.

    Args:
        hidden: Final hidden states of the positions that predict ``targets``.  # [N, H]
        weight: Output-embedding (LM head) matrix.  # [V, H]
        targets: Token ids to score.  # [N]
        bias: Optional LM-head bias.  # [V]
        chunk_tokens: Rows projected at once; bounds memory to ``chunk_tokens * V`` fp32.
        temperature: Logits are divided by it (match the sampling temperature).
        softcap: Final-logit soft-capping constant (Gemma-2 style); 0 = none.

    Returns:
        fp32 log-probs.  # [N]
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]} entries"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
    use_checkpoint = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start : start + chunk_tokens]
        t = targets[start : start + chunk_tokens]
        if use_checkpoint:
            piece = checkpoint(
                _chunk_logp, h, weight, bias, t, temperature, softcap, use_reentrant=False
            )
        else:
            piece = _chunk_logp(h, weight, bias, t, temperature, softcap)
        pieces.append(piece)
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lens: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs of the response tokens of right-padded ``prompt + response`` rows.

    Args:
        model: A Hugging Face causal LM (``base_model`` + output embeddings).
        input_ids: Prompt then response tokens, right-padded.  # [B, L]
        attention_mask: 1 on real tokens.  # [B, L]
        prompt_lens: Prompt length of each row.  # [B]
        response_mask: 1 on real response tokens (response token t of row b sits at
            ``input_ids[b, prompt_lens[b] + t]``).  # [B, T]
        chunk_tokens: See :func:`chunked_token_logprobs`.
        temperature: Sampling temperature the responses were drawn with.

    Returns:
        fp32 log-probs, 0 where ``response_mask`` is 0.  # [B, T]
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]  # [B, L, H]
    rows, cols = response_mask.nonzero(as_tuple=True)  # [N], [N]
    positions = prompt_lens.to(rows.device)[rows] + cols  # where each response token sits
    h = hidden[rows, positions - 1]  # the position before a token predicts it  # [N, H]
    targets = input_ids[rows, positions]  # [N]
    head = model.get_output_embeddings()
    softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
    flat = chunked_token_logprobs(
        h,
        head.weight,
        targets,
        bias=getattr(head, "bias", None),
        chunk_tokens=chunk_tokens,
        temperature=temperature,
        softcap=softcap,
    )
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((rows, cols), flat)
