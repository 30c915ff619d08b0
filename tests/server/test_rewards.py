"""DAPO soft overlong penalty and reward schemes (pure functions)."""

from __future__ import annotations

import pytest

from server.rewards import overlong_penalty, verdict_reward
from server.types import RewardScheme, ScoreItem


def _it(n, l_max, l_buf):
    return ScoreItem(
        "x", "", ("1",), response_tokens=n, max_response_tokens=l_max, overlong_buffer=l_buf
    )


@pytest.mark.parametrize(
    "n,l_max,l_buf,expected",
    [
        (None, 100, 20, 0.0),
        (50, None, 20, 0.0),
        (80, 100, 20, 0.0),
        (90, 100, 20, -0.5),
        (100, 100, 20, -1.0),
        (150, 100, 20, -1.0),
        (100, 100, 0, 0.0),
        (101, 100, 0, -1.0),
    ],
)
def test_overlong_penalty(n, l_max, l_buf, expected):
    assert overlong_penalty(_it(n, l_max, l_buf)) == pytest.approx(expected)


def test_verdict_reward():
    assert verdict_reward(True, RewardScheme.BINARY) == 1.0
    assert verdict_reward(False, RewardScheme.BINARY) == 0.0
    assert verdict_reward(False, RewardScheme.SIGNED) == -1.0
