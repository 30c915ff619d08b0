"""trainer.kernels.reverse_scan: the blocked discounted reverse scan behind Future-KL.

Long rows (where ``gamma^(-t)`` tricks overflow) are checked against a float64 recurrence
``y_t = x_t + gamma * y_{t+1}``, which is exact and cheap enough at these sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.fipo import future_kl
from trainer.kernels.reverse_scan import discounted_reverse_cumsum


def recurrence(x: np.ndarray, gamma: float) -> np.ndarray:
    y = np.zeros_like(x, dtype=np.float64)
    acc = np.zeros(x.shape[0])
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + gamma * acc
        y[:, t] = acc
    return y


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 4095, 4097, 16384, 20000])
@pytest.mark.parametrize("tau", [1.0, 32.0, 1000.0])
def test_long_rows_match_recurrence(length: int, tau: float) -> None:
    gamma = 2.0 ** (-1.0 / tau)
    x = torch.randn(2, length, generator=torch.Generator().manual_seed(length), dtype=torch.float64)
    got = discounted_reverse_cumsum(x, gamma)
    np.testing.assert_allclose(got.numpy(), recurrence(x.numpy(), gamma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block", [2, 7, 32, 128])
def test_block_size_does_not_change_the_result(block: int) -> None:
    x = torch.randn(3, 3000, generator=torch.Generator().manual_seed(block), dtype=torch.float64)
    gamma = 2.0 ** (-1.0 / 32)
    np.testing.assert_allclose(
        discounted_reverse_cumsum(x, gamma, block=block).numpy(),
        recurrence(x.numpy(), gamma),
        rtol=1e-9,
        atol=1e-9,
    )


def test_float32_stays_exact_where_inverse_powers_overflow() -> None:
    # gamma^(-t) exceeds float32's range past t ~ 4,096 at tau = 32 and t ~ 128 at tau = 1.
    T = 50_000
    x = torch.randn(2, T, generator=torch.Generator().manual_seed(0)) * 0.1
    for tau in (1.0, 32.0):
        F = future_kl(x, torch.ones(2, T), tau)
        assert torch.isfinite(F).all()
        want = recurrence(x.double().numpy(), 2.0 ** (-1.0 / tau))
        np.testing.assert_allclose(F.double().numpy(), want, rtol=1e-6, atol=1e-6)


def test_edge_gammas() -> None:
    x = torch.randn(2, 300, dtype=torch.float64)
    assert torch.equal(discounted_reverse_cumsum(x, 0.0), x)
    np.testing.assert_allclose(
        discounted_reverse_cumsum(x, 1 - 1e-9).numpy(), recurrence(x.numpy(), 1 - 1e-9), atol=1e-9
    )
    with pytest.raises(ValueError, match="gamma"):
        discounted_reverse_cumsum(x, 1.0)
    with pytest.raises(ValueError, match="block"):
        discounted_reverse_cumsum(x, 0.5, block=1)
