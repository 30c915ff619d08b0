"""Future-KL as one Triton kernel: filter, mask and discounted reverse scan in one pass.

STATUS: functionally tested on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, tests/trainer/test_fipo_triton.py) but never compiled or timed on
a GPU (the project's machines had none when it was written). ``trainer.fipo.future_kl``
therefore uses it only when asked (``backend="triton"``); run ``pytest -m gpu`` and
``benchmarks/bench_future_kl.py --device cuda --backend triton`` on a GPU before relying
on it.

Design: one program per row streams the row from its end in blocks of ``BLOCK`` tokens.
Each block is loaded in reverse order, so the reverse recurrence ``F_t = x_t + g F_{t+1}``
becomes a forward linear recurrence solved by ``tl.associative_scan`` over affine maps
``(a, b)``; the value carried in from the right is added with ``g^(i+1)`` (i = distance to
the block's end, a negative power of 2 in ``exp2``, so nothing overflows). Reads the input
and the mask once and writes F once: memory-bound, as the recurrence is.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 1024


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    # Compose h -> a_left*h + b_left, then h -> a_right*h + b_right (left comes first).
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _future_kl_kernel(
    x_ptr,
    mask_ptr,
    out_ptr,
    T,
    stride_x,
    stride_mask,
    stride_out,
    log2_gamma,
    log_cap,
    USE_CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    gamma = tl.exp2(log2_gamma)
    a = tl.zeros([BLOCK], dtype=tl.float32) + gamma
    carry_decay = tl.exp2(log2_gamma * (i + 1).to(tl.float32))  # g^(i+1) <= 1
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    for blk in range(0, tl.cdiv(T, BLOCK)):
        t = T - 1 - blk * BLOCK - i  # reversed positions of this block
        valid = t >= 0
        x = tl.load(x_ptr + row * stride_x + t, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + row * stride_mask + t, mask=valid, other=0)
        keep = valid & (m != 0)
        if USE_CAP:
            keep = keep & (x <= log_cap)
        x = tl.where(keep, x, 0.0)
        _, h = tl.associative_scan((a, x), 0, _affine_combine)
        f = h + carry_decay * carry
        tl.store(out_ptr + row * stride_out + t, f, mask=valid)
        # F at this block's first token, carried into the next block to the left.
        carry = tl.sum(tl.where(i == BLOCK - 1, f, 0.0), axis=0)


def future_kl_triton(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    decay_rate: float,
    ratio_cap: float | None = None,
    *,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Future-KL of ``[B, T]`` inputs, float32 out (see ``trainer.fipo.future_kl``).

    Inputs are validated by the caller; float32/bf16/fp16 log-ratios are read as they are
    and accumulated in float32.
    """
    if block & (block - 1) or block < 16:
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    x = log_ratio.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = mask.detach()
    m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
    if m.stride(-1) != 1:
        m = m.contiguous()
    B, T = x.shape
    out = torch.empty((B, T), dtype=torch.float32, device=x.device)
    if B == 0 or T == 0:
        return out
    _future_kl_kernel[(B,)](
        x,
        m,
        out,
        T,
        x.stride(0),
        m.stride(0),
        out.stride(0),
        -1.0 / float(decay_rate),
        math.log(ratio_cap) if ratio_cap is not None else 0.0,
        USE_CAP=ratio_cap is not None,
        BLOCK=block,
    )
    return out
