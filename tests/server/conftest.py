"""Fixtures for the reward-server tests: one shared worker pool, item helpers."""

from __future__ import annotations

import pytest

from server.config import PoolConfig
from server.pool import WorkerPool
from server.types import ScoreItem


@pytest.fixture(scope="session")
def pool() -> WorkerPool:
    """A 2-worker pool shared by the verdict tests (starting one costs about a second)."""
    with WorkerPool(PoolConfig(workers=2, default_deadline_s=10.0)) as p:
        yield p


def item(response: str, gold: str | tuple[str, ...], id: str = "x", **kw) -> ScoreItem:
    """A ScoreItem with one or more golds."""
    golds = (gold,) if isinstance(gold, str) else gold
    return ScoreItem(id=id, response=response, golds=golds, **kw)
