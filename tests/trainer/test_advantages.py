"""trainer.advantages: group normalisation, dynamic sampling, soft overlong penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.advantages import dynamic_sampling_mask, group_advantages, soft_overlong_penalty


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
    pen = soft_overlong_penalty(torch.tensor([10, 19]), max_length=20, buffer_length=4)
    assert isinstance(pen, torch.Tensor) and pen.tolist() == [0.0, -0.75]


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


def test_soft_overlong_penalty_shape() -> None:
    lengths = np.array([0, 15, 16, 17, 18, 19, 20, 21, 1000])
    got = soft_overlong_penalty(lengths, max_length=20, buffer_length=4)
    np.testing.assert_allclose(got, [0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1])
    assert not np.signbit(got[:3]).any()  # a clean 0.0, not -0.0
    # Buffer = whole length: the ramp starts at 0 tokens.
    np.testing.assert_allclose(
        soft_overlong_penalty([0, 5, 10], max_length=10, buffer_length=10), [0, -0.5, -1]
    )
    grid = soft_overlong_penalty(np.arange(6).reshape(2, 3), max_length=4, buffer_length=2)
    assert grid.shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_length=0, buffer_length=1), "max_length"),
        (dict(max_length=10, buffer_length=0), "buffer_length"),
        (dict(max_length=10, buffer_length=11), "buffer_length"),
        (dict(max_length=10.5, buffer_length=2), "max_length"),
    ],
)
def test_soft_overlong_penalty_bad_limits(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        soft_overlong_penalty([1, 2], **kwargs)


def test_soft_overlong_penalty_bad_lengths() -> None:
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        soft_overlong_penalty([-1, 2], max_length=10, buffer_length=2)
    with pytest.raises(ValueError, match="finite"):
        soft_overlong_penalty([np.nan], max_length=10, buffer_length=2)
