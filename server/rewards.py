"""Verdict -> reward: the scheme's verdict reward plus DAPO's soft overlong penalty.

Pure functions, used by the pool's supervisor, so a cached verdict serves any reward scheme.
"""

from __future__ import annotations

from server.types import RewardScheme, ScoreItem, ScoreResult, Status


def overlong_penalty(item: ScoreItem) -> float:
    """DAPO's soft overlong penalty for ``item`` (0 when not configured).

    ``min(0, -(len - (L_max - L_buf)) / L_buf)``, clamped at -1: zero up to ``L_max - L_buf``
    tokens, falling linearly to -1 at ``L_max`` (with ``L_buf = 0``: -1 beyond ``L_max``).

    Args:
        item: The item; uses ``response_tokens``, ``max_response_tokens``, ``overlong_buffer``.

    Returns:
        The penalty, in [-1, 0].
    """
    n, l_max = item.response_tokens, item.max_response_tokens
    if n is None or l_max is None:
        return 0.0
    l_buf = item.overlong_buffer or 0
    start = l_max - l_buf
    if n <= start:
        return 0.0
    if l_buf == 0:
        return -1.0
    return max(-1.0, -(n - start) / l_buf)


def verdict_reward(correct: bool, scheme: RewardScheme) -> float:
    """1 / 0 (binary) or +1 / -1 (signed)."""
    if correct:
        return 1.0
    return -1.0 if scheme is RewardScheme.SIGNED else 0.0


def make_result(
    item: ScoreItem,
    status: Status,
    *,
    prediction: str = "",
    gold: str = "",
    message: str = "",
    flags: tuple[str, ...] = (),
    latency_ms: float = 0.0,
) -> ScoreResult:
    """Build the ``ScoreResult`` for ``item`` from a verdict.

    Args:
        item: The scored item.
        status: The verdict's status; only ``Status.OK`` is correct.
        prediction: Extracted prediction string.
        gold: Parsed gold string.
        message: Detail for non-OK/WRONG statuses.
        flags: Extra notes.
        latency_ms: Time from submission to result.

    Returns:
        The result with its reward computed.
    """
    correct = status is Status.OK
    penalty = overlong_penalty(item)
    return ScoreResult(
        id=item.id,
        reward=verdict_reward(correct, item.reward_scheme) + penalty,
        correct=correct,
        status=status,
        extracted_prediction=prediction,
        extracted_gold=gold,
        overlong_penalty=penalty,
        latency_ms=latency_ms,
        message=message,
        flags=flags,
    )
