"""How the environments get rewards: any ``server.types.Scorer``.

``Verifier`` is the reward server's ``Scorer`` protocol (``score(items) -> results``, same
order). Two implementations are used, and neither holds math-verify logic of its own:

- ``server.client.RewardClient``: the gRPC client of a running reward server;
- ``LocalVerifier``: the server's supervised worker pool (``server.pool.WorkerPool``)
  in this process, started lazily on the first ``score`` call so that creating an env
  stays cheap.

``make_verifier`` picks one from a short spec: ``"local"`` or an address.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from server.types import ScoreItem, Scorer, ScoreResult

if TYPE_CHECKING:
    from server.pool import WorkerPool

Verifier = Scorer
"""The environments' reward interface: exactly the reward service's ``Scorer`` protocol."""


class LocalVerifier:
    """The reward server's worker pool, used in-process (no gRPC, same verdicts).

    Args:
        workers: Worker processes of the pool.
        **pool_kwargs: Other ``server.config.PoolConfig`` fields (deadlines, limits, ...).
    """

    def __init__(self, workers: int = 1, **pool_kwargs: Any) -> None:
        from server.config import PoolConfig

        self.config = PoolConfig(workers=workers, **pool_kwargs)  # validated now, started later
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()

    def _ensure_pool(self) -> WorkerPool:
        with self._lock:
            if self._pool is None:
                from server.pool import WorkerPool

                self._pool = WorkerPool(self.config)
            return self._pool

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Score ``items`` in the local worker pool; one result per item, in order."""
        if not items:
            return []
        return self._ensure_pool().score(items)

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __deepcopy__(self, memo: dict[int, Any]) -> LocalVerifier:
        # A verifier is a handle to a service (worker processes), not a value: copies of an
        # env's kwargs (``EnvSpec.make``, ``check_env``) share it instead of cloning a pool.
        return self

    def __enter__(self) -> LocalVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_verifier(spec: str | Scorer | None = "local", **kwargs: Any) -> tuple[Scorer, bool]:
    """Resolve a verifier spec.

    Args:
        spec: ``None`` or ``"local"`` for a ``LocalVerifier``; ``"host:port"``,
            ``"grpc://host:port"`` or a comma-separated list of reward-server replicas
            (``"h1:p1,h2:p2"``, load-balanced with failover) for a ``RewardClient``; or any
            object with a ``score`` method, used as is.
        **kwargs: Passed to the created verifier's constructor.

    Returns:
        ``(verifier, owned)``: ``owned`` says the caller created it and must close it.
    """
    if spec is None or spec == "local":
        return LocalVerifier(**kwargs), True
    if isinstance(spec, str):
        from server.addresses import parse_addresses

        try:
            addresses = parse_addresses(spec)
        except ValueError as e:
            raise ValueError(
                f"verifier spec {spec!r} is neither 'local' nor an address like "
                f"'localhost:50051' or a list like 'h1:50051,h2:50051': {e}"
            ) from None
        from server.client import RewardClient

        return RewardClient(addresses, **kwargs), True
    if not callable(getattr(spec, "score", None)):
        raise TypeError(f"verifier {spec!r} has no score(items) method (see server.types.Scorer)")
    return spec, False


def close_verifier(verifier: Scorer) -> None:
    """Close a verifier if it can be closed."""
    close = getattr(verifier, "close", None)
    if callable(close):
        close()
