"""Outcome-reward shaping shared by GRPO, DAPO and FIPO: advantages, filters, penalties.

All functions are pure and take numpy arrays, torch tensors or nested lists; they return
the same kind they got (lists come back as numpy), as float arrays (torch keeps a float
input's dtype and device; integer inputs become float32 tensors / float64 arrays). Rewards
of a rollout batch are laid out as ``[num_groups, G]``: one row per prompt, G samples each.

- ``group_advantages``: ``A_i = (R_i - mean(R)) / (std(R) + eps)`` per group (GRPO); with
  ``scale_by_std=False`` only the mean is removed (Dr. GRPO).
- ``dynamic_sampling_mask``: DAPO's dynamic sampling: a group whose rewards are all equal
  has zero advantage everywhere and only dilutes the batch, so it is dropped.

DAPO's soft overlong penalty is not here: the reward server adds it to the reward it
returns (``server.rewards.overlong_penalty``), so there is exactly one definition of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

__all__ = ["dynamic_sampling_mask", "group_advantages"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _to_numpy(name: str, value: ArrayT) -> tuple[np.ndarray, Callable[[np.ndarray], ArrayT]]:
    """Float64 numpy copy of ``value`` and a function that turns a result back."""
    if isinstance(value, torch.Tensor):
        out_dtype = value.dtype if value.is_floating_point() else torch.float32
        device = value.device

        def back(a: np.ndarray) -> torch.Tensor:
            if a.dtype == np.bool_:
                return torch.from_numpy(a).to(device)
            return torch.from_numpy(a).to(device=device, dtype=out_dtype)

        array = value.detach().to("cpu", torch.float64).numpy()
        return array, back
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} must be a numeric array (equal-length rows), got: {exc}"
        ) from None
    return array, lambda a: a


def _check_finite(name: str, array: np.ndarray) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite; {name}[{first}] = {array[first]}")


def _grouped(name: str, value: ArrayT) -> tuple[np.ndarray, Callable[[np.ndarray], ArrayT]]:
    array, back = _to_numpy(name, value)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_groups, G], got shape {list(array.shape)}")
    _check_finite(name, array)
    return array, back


def group_advantages(
    rewards: ArrayT,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased_std: bool = True,
) -> ArrayT:
    """Group-normalised advantages, one per sample.

    Args:
        rewards: Final reward of each sample.  # [num_groups, G]
        scale_by_std: Divide by the group's std (GRPO). False keeps only the mean removal,
            as Dr. GRPO recommends (no bias towards easy or hard prompts).
        eps: Added to the std so a zero-variance group gets advantage 0, not NaN.
        unbiased_std: Use the sample std (ddof = 1, as TRL and verl do) rather than the
            population std. A group of one sample has std 0 either way.

    Returns:
        Advantages with the shape of ``rewards``; each row sums to ~0.  # [num_groups, G]

    Raises:
        ValueError: If rewards is not 2-D, holds a non-finite value, or eps < 0.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    array, back = _grouped("rewards", rewards)
    g = array.shape[1]
    if g == 0:
        return back(array.copy())
    centred = array - array.mean(axis=1, keepdims=True)
    # An all-equal group has advantage exactly 0 (its mean may round, e.g. 16 x -1.3).
    centred[array.max(axis=1) == array.min(axis=1)] = 0.0
    if scale_by_std:
        ddof = 1 if unbiased_std and g > 1 else 0
        std = array.std(axis=1, ddof=ddof, keepdims=True)
        # With eps = 0 an all-equal group still has centred = 0: divide by 1 there.
        denom = std + eps
        centred = np.divide(centred, denom, out=np.zeros_like(centred), where=denom > 0)
    return back(centred)


def dynamic_sampling_mask(rewards: ArrayT, *, atol: float = 0.0) -> ArrayT:
    """Which groups to keep under DAPO's dynamic sampling.

    Args:
        rewards: Final reward of each sample.  # [num_groups, G]
        atol: Rewards within ``atol`` of each other count as equal (for float noise).

    Returns:
        Boolean keep-mask, True where the group's rewards are not all equal.  # [num_groups]

    Raises:
        ValueError: If rewards is not 2-D, holds a non-finite value, or atol < 0.
    """
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    array, back = _grouped("rewards", rewards)
    if array.shape[1] == 0:
        return back(np.zeros(array.shape[0], dtype=bool))
    spread = array.max(axis=1) - array.min(axis=1)
    return back(spread > atol)
