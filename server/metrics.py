"""Prometheus metrics of the reward server (the pool's ``PoolEvents`` receiver).

Every metric lives in its own ``CollectorRegistry`` (not the process-global one), so several
servers can run in one process (tests) without name clashes. Names are namespaced
``fipo_reward_*``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.types import ScoreResult

# Stage latencies span microseconds (guards, cache hits) to seconds (deadlines).
_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class ServerMetrics:
    """The server's metrics; pass it to ``WorkerPool(events=...)``.

    Args:
        queue_depth: Returns the number of items queued or running.
        live_workers: Returns the number of live worker processes.
    """

    def __init__(self, queue_depth: Callable[[], float], live_workers: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.items = Counter(
            "fipo_reward_items", "Items scored, by result status.", ["status"], registry=r
        )
        self.stage_seconds = Histogram(
            "fipo_reward_stage_seconds",
            "Time per scoring stage: queue, guard, gold_parse, pred_parse, compare, total.",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.worker_events = Counter(
            "fipo_reward_worker_events",
            "Worker events: start, respawn, kill_timeout, died, recycle, slow, retire.",
            ["event"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "fipo_reward_cache_lookups",
            "Cache lookups by cache (result, gold) and outcome (hit, miss).",
            ["cache", "outcome"],
            registry=r,
        )
        self.cache_hit_ratio = Gauge(
            "fipo_reward_cache_hit_ratio",
            "Hits / lookups since start, by cache.",
            ["cache"],
            registry=r,
        )
        self.rpcs = Counter(
            "fipo_reward_rpcs",
            "RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "fipo_reward_rpc_seconds",
            "RPC latency by method.",
            ["method"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.rejected_items = Counter(
            "fipo_reward_rejected_items",
            "Items refused with RESOURCE_EXHAUSTED because the queue was full.",
            registry=r,
        )
        Gauge("fipo_reward_queue_depth", "Items queued or running.", registry=r).set_function(
            queue_depth
        )
        Gauge("fipo_reward_live_workers", "Worker processes alive.", registry=r).set_function(
            live_workers
        )
        self._hits: dict[str, list[int]] = {"result": [0, 0], "gold": [0, 0]}
        for cache in self._hits:
            self.cache_hit_ratio.labels(cache).set_function(
                lambda c=cache: self._hits[c][0] / self._hits[c][1] if self._hits[c][1] else 0.0
            )

    # PoolEvents ---------------------------------------------------------------------------
    def on_result(self, result: ScoreResult, stages_ms: dict[str, float], cached: bool) -> None:
        """Count the status and observe per-stage latencies."""
        self.items.labels(result.status.value).inc()
        for stage, ms in stages_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1e3)
        self.stage_seconds.labels("total").observe(result.latency_ms / 1e3)

    def on_cache(self, cache: str, hit: bool) -> None:
        """Count a cache lookup."""
        self.cache_lookups.labels(cache, "hit" if hit else "miss").inc()
        counts = self._hits.setdefault(cache, [0, 0])
        counts[0] += hit
        counts[1] += 1

    def on_worker(self, event: str) -> None:
        """Count a worker event."""
        self.worker_events.labels(event).inc()
