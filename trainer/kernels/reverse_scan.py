"""Discounted reverse cumulative sum, ``y_t = sum_{k >= t} gamma^(k-t) * x_k``, in O(N*T*K).

This is the recurrence ``y_t = x_t + gamma * y_{t+1}`` that Future-KL needs. A Python loop
over T is far too slow, and the textbook vectorisation ``gamma^(-t) * revcumsum(gamma^k x_k)``
overflows float32 once ``t * log2(1/gamma) > 128`` (t ~ 4,096 for tau = 32). Public ports
instead multiply by a T x 128 decay matrix per chunk, which is O(T^2) per row.

Here the row is cut into blocks of K tokens and solved in two steps, each made of
matmuls with only non-negative powers of gamma (nothing can overflow):

1. within each block, ``local = x_block @ D`` with the K x K upper-triangular decay matrix
   ``D[k, t] = gamma^(k-t)`` (k >= t): one GEMM for the whole batch;
2. the value entering block b from the right is ``C_{b+1}``, the full sum at the first token
   of block b+1. The block-start sums obey the same recurrence,
   ``C_b = local_b[0] + gamma^K * C_{b+1}``, one K-th as long: recurse with ``gamma^K``.
   Then ``y = local + gamma^(K-t) * C_{b+1}``.

Work is N*T*K*(1 + 1/K + ...) multiply-adds with no Python loop over T (the recursion depth
is log_K(T), three levels for T = 16,384 at K = 64). Decay entries below 2^-100 are set to
zero: they are far below float32 resolution, and it keeps denormals (slow on CPUs) out of
the matmuls.
"""

from __future__ import annotations

import functools
import math

import torch

# Block length K. On the 2-core CPU (B=8, T=16,384, float64 as future_kl runs it) K=64
# took 0.36 ms (min of 50) against 1.19 ms for K=32; in float32 32, 64 and 128 were within
# 0.15-0.23 ms. 64 keeps the recursion at three levels for T = 16,384.
DEFAULT_BLOCK = 64

# Powers of gamma below this are flushed to zero (see the module docstring).
_TINY = 2.0**-100


@functools.lru_cache(maxsize=64)
def _decay_tables(gamma: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 CPU tables for one level: the K x K decay matrix and the carry factors.

    Returns:
        ``(decay, tail)``: ``decay[k, t] = gamma^(k-t)`` for k >= t else 0  # [K, K]
        and ``tail[t] = gamma^(K-t)``, the factor applied to the carry  # [K]
    """
    idx = torch.arange(block, dtype=torch.float64)
    dist = idx[:, None] - idx[None, :]
    decay = torch.where(dist >= 0, gamma ** dist.clamp(min=0), torch.zeros((), dtype=torch.float64))
    tail = gamma ** (block - idx)
    decay[decay < _TINY] = 0.0
    tail[tail < _TINY] = 0.0
    return decay, tail


@functools.lru_cache(maxsize=64)
def _tables_for(
    gamma: float, block: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    decay, tail = _decay_tables(gamma, block)
    return decay.to(device=device, dtype=dtype), tail.to(device=device, dtype=dtype)


def _tables_on(gamma: float, block: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _tables_for(gamma, block, like.dtype, like.device)


def discounted_reverse_cumsum(
    x: torch.Tensor, gamma: float, *, block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """Return ``y`` with ``y[n, t] = sum_{k >= t} gamma^(k - t) * x[n, k]``.

    Args:
        x: Values to accumulate, float32 or float64 (the caller picks the accumulation
            dtype; the result has the same dtype).  # [N, T]
        gamma: Decay per position, in [0, 1).
        block: Block length K of the two-level scan (>= 2).

    Returns:
        The discounted reverse cumulative sum, same shape and dtype as ``x``.  # [N, T]

    Raises:
        ValueError: If ``x`` is not 2-D floating point, or gamma/block are out of range.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D floating tensor [N, T], got {x.dtype} {tuple(x.shape)}")
    if not (0.0 <= gamma < 1.0) or math.isnan(gamma):
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    n, t = x.shape
    if n == 0 or t == 0:
        return x.clone()
    if gamma < _TINY:
        # gamma^1 already vanishes: each position only sees itself.
        return x.clone()
    return _scan(x, float(gamma), block)


def _scan(x: torch.Tensor, gamma: float, block: int) -> torch.Tensor:
    n, t = x.shape
    if t <= block:
        decay, _ = _tables_on(gamma, block, x)
        return x @ decay[:t, :t]
    nb = -(-t // block)
    pad = nb * block - t
    # Zeros after the end add nothing to a reverse sum, so right-padding is exact.
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    decay, tail = _tables_on(gamma, block, x)
    local = (xp.reshape(n * nb, block) @ decay).reshape(n, nb, block)
    starts = local[:, :, 0].contiguous()  # [N, nb]
    gamma_k = gamma**block
    if gamma_k >= _TINY:
        # Block-start sums obey the same recurrence with gamma^K; when gamma^K vanishes
        # the local block-start sums are already the full ones.
        starts = _scan(starts, gamma_k, block)
    # The carry into block b is the full sum at the start of block b+1 (0 after the end).
    carry = torch.nn.functional.pad(starts[:, 1:], (0, 1))
    local = local + carry[:, :, None] * tail
    y = local.reshape(n, nb * block)
    return y[:, :t] if pad else y
