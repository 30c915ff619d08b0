"""trainer.advantages: group normalisation, dynamic sampling, soft overlong penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainer.advantages
from trainer.advantages import dynamic_sampling_mask, group_advantages


def test_group_advantages_match_the_formula() -> None:
    rewards = np.array([[1.0, -1.0, -1.0, -1.0], [0.5, 2.0, -1.0, 3.5]])
    got = group_advantages(rewards)
    for row, adv in zip(rewards, got, strict=True):
        want = (row - row.mean()) / (row.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(adv, want, rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-12)
    pop = group_advantages(rewards, unbiased_std=False, eps=0.0)
    np.testing.assert_allclose(pop.std(axis=1), 1.0, rtol=1e-12)


def test_dr_grpo_keeps_only_the_mean_removal() -> None:
    rewards = np.array([[1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        group_advantages(rewards, scale_by_std=False), [[0.75, -0.25, -0.25, -0.25]]
    )


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_degenerate_groups_get_zero_not_nan(eps: float) -> None:
    got = group_advantages(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), eps=eps)
    assert np.array_equal(got, np.zeros((2, 3)))
    single = group_advantages(np.array([[3.0], [-1.0]]), eps=eps)  # G = 1
    assert np.array_equal(single, np.zeros((2, 1)))
    assert group_advantages(np.zeros((0, 4))).shape == (0, 4)
    assert group_advantages(np.zeros((2, 0))).shape == (2, 0)
    assert dynamic_sampling_mask(np.zeros((2, 0))).tolist() == [False, False]


def test_types_round_trip() -> None:
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = group_advantages(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    ints = group_advantages(torch.tensor([[1, 0, 0]]))
    assert ints.dtype == torch.float32
    lst = group_advantages([[1, 0], [2, 2]])
    assert isinstance(lst, np.ndarray)
    keep = dynamic_sampling_mask(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.bool
    assert keep.tolist() == [False, True]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.array([1.0, 0.0]), "2-D"),
        (np.array([[1.0, np.nan]]), r"rewards\[\(0, 1\)\]"),
        (np.array([[1.0, np.inf]]), "finite"),
        ([[1.0, 0.0], [1.0]], "equal-length"),
    ],
)
def test_bad_rewards_are_named(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_advantages(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        dynamic_sampling_mask(bad)  # type: ignore[arg-type]


def test_dynamic_sampling_mask() -> None:
    rewards = np.array(
        [[1, 1, 1, 1], [-1, -1, -1, -1], [1, -1, -1, -1], [0.5, 0.5 + 1e-9, 0.5, 0.5]]
    )
    assert dynamic_sampling_mask(rewards).tolist() == [False, False, True, True]
    assert dynamic_sampling_mask(rewards, atol=1e-6).tolist() == [False, False, True, False]
    # A kept group always has a non-zero advantage somewhere; a dropped one never does.
    adv = group_advantages(rewards)
    assert ((np.abs(adv).max(axis=1) > 0) == dynamic_sampling_mask(rewards)).all()
    with pytest.raises(ValueError, match="atol"):
        dynamic_sampling_mask(rewards, atol=-1.0)


def test_the_overlong_penalty_is_defined_once_by_the_server() -> None:
    """DAPO's soft overlong penalty had a second copy here that disagreed with the server's
    at a zero buffer (it refused L_buf = 0; the server gives -1 beyond L_max). Rewards come
    from the server, so its definition is the only one (tests/server/test_rewards.py)."""
    assert not hasattr(trainer.advantages, "soft_overlong_penalty")
