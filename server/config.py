"""Configuration records of the reward service: verifier, limits, worker pool, server.

Frozen dataclasses, one per component, every field documented where it is declared and
validated in ``__post_init__`` with a message that names the bad field. Nothing here imports
grpc or math-verify, so the pool can be configured (and pickled into workers) cheaply.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class VerifierConfig:
    """Settings that change verdicts; part of the result-cache key."""

    float_rounding: int = 6
    """math-verify ``float_rounding``: decimal places floats are rounded to before comparing."""
    numeric_precision: int = 15
    """math-verify ``numeric_precision``: significant digits used for numeric evaluation."""
    strict: bool = True
    """math-verify ``strict``: variables matter and sets are not compared with tuples."""
    exact_numeric_recheck: bool = True
    """Re-check every "equal" verdict between two numeric constants exactly (rationals) or with
    ``recheck_rel_tol`` (other numbers). math-verify 0.9.0 compares numbers with an absolute
    rounding, so tiny values such as ``1/2004!`` and ``1/2006!`` come out "equal"; the re-check
    overturns such verdicts (result flag ``exact_recheck_overturned``). See docs/server.md."""
    require_evaluated_answer: bool = True
    """When every gold is a plain number, an answer that is still an arithmetic expression of
    numbers (``79 + 89`` for ``168``, ``2^3`` for ``8``) is WRONG (flag
    ``unevaluated_expression``), although math-verify finds it equal: restating the question
    is not answering it. A policy trained on arithmetic learnt exactly that (an empty
    ``\\boxed{}`` after the restated sum; math-verify's fallback took the sum). A single
    fraction or decimal (``3/4``, ``\\frac{3}{4}``, ``-0.5``, ``1,000``) counts as evaluated."""
    recheck_rel_tol: float = 1e-5
    """Relative tolerance of the re-check for non-rational numbers; loose enough that
    ``0.333333`` still equals ``1/3`` as math-verify intends."""
    gold_cache_size: int = 4096
    """Per-worker LRU caches keyed by gold: parsed golds, and verdicts keyed by (gold, extracted
    answer). A trainer sends G responses per gold and they repeat a few answers. 0 turns both
    caches off."""

    def __post_init__(self) -> None:
        _check(0 <= self.float_rounding <= 30, "verifier.float_rounding must be in [0, 30]")
        _check(1 <= self.numeric_precision <= 100, "verifier.numeric_precision must be in [1, 100]")
        _check(0 < self.recheck_rel_tol < 1, "verifier.recheck_rel_tol must be in (0, 1)")
        _check(self.gold_cache_size >= 0, "verifier.gold_cache_size must be >= 0")

    def cache_key(self) -> tuple:
        """The settings that affect a verdict, as a hashable key."""
        return (
            self.float_rounding,
            self.numeric_precision,
            self.strict,
            self.exact_numeric_recheck,
            self.recheck_rel_tol,
            self.require_evaluated_answer,
        )


@dataclass(frozen=True)
class Limits:
    """Input limits. Checked before any parsing, so violations cost microseconds."""

    max_response_chars: int = 65_536
    """Longest response accepted, in characters (longer -> INPUT_TOO_LARGE)."""
    max_gold_chars: int = 4_096
    """Longest gold answer accepted, in characters (longer -> INPUT_TOO_LARGE)."""
    max_golds: int = 16
    """Most gold answers per item (more -> INVALID)."""
    max_batch_items: int = 4_096
    """Most items in one Score request (more -> INVALID_ARGUMENT for the RPC)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message accepted or sent, in bytes."""
    max_nesting: int = 64
    """Deepest bracket nesting ({, (, [) accepted in a response or gold."""
    max_digits: int = 400
    """Longest run of digits accepted (a longer number is refused before parsing)."""
    max_factorial: int = 5_000
    """Largest literal factorial argument (``n!``) accepted."""
    max_power_digits: int = 20_000
    """Largest estimated size, in decimal digits, of a literal power such as ``9^{99999}``."""
    max_exponent: int = 100_000
    """Largest literal integer exponent accepted on any base (``x^{10^6}`` is refused)."""
    max_tower_height: int = 2
    """Highest exponent tower accepted: 2 allows ``e^{x^2}`` (numeric sizes are checked
    separately); ``a^{b^{c^{d}}}`` (height 4) is refused."""

    def __post_init__(self) -> None:
        for name in (
            "max_response_chars",
            "max_gold_chars",
            "max_golds",
            "max_batch_items",
            "max_message_bytes",
            "max_nesting",
            "max_digits",
            "max_factorial",
            "max_power_digits",
            "max_exponent",
            "max_tower_height",
        ):
            _check(getattr(self, name) >= 1, f"limits.{name} must be >= 1")
        _check(self.max_message_bytes >= 1024, "limits.max_message_bytes must be >= 1024 bytes")


@dataclass(frozen=True)
class PoolConfig:
    """The supervised pool of math-verify worker processes."""

    workers: int = 2
    """Worker processes kept busy (normally the number of cores given to verification)."""
    default_deadline_s: float = 5.0
    """Per-item deadline when an item sets none. The supervisor kills a worker that overruns."""
    max_deadline_s: float = 60.0
    """Largest per-item deadline an item may ask for (larger requests are capped)."""
    slow_after_s: float = 0.5
    """An item that has used this much worker CPU time is "slow": its worker is set aside and a
    fresh worker takes its place, so slow items never hold every worker. CPU time, not wall
    time, so a loaded machine does not make every item look slow."""
    max_extra_workers: int = 2
    """Most workers started to stand in for slow ones at any moment."""
    max_queue_items: int = 8_192
    """Most items queued or running at once; beyond it non-blocking submits are refused."""
    recycle_after: int = 5_000
    """A worker is replaced after scoring this many items (bounds leaks and cache growth)."""
    memory_limit_mb: int = 2_048
    """Address-space cap (RLIMIT_AS) of each worker, in MiB; 0 disables it."""
    result_cache_size: int = 65_536
    """Results kept in the supervisor's LRU cache keyed by (golds, response, format, verifier
    settings); 0 turns it off."""
    start_timeout_s: float = 120.0
    """How long to wait for a worker to import math-verify and report ready."""
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    """Verifier settings."""
    limits: Limits = field(default_factory=Limits)
    """Input limits."""

    def __post_init__(self) -> None:
        _check(1 <= self.workers <= 256, "pool.workers must be in [1, 256]")
        for name in ("default_deadline_s", "max_deadline_s", "slow_after_s", "start_timeout_s"):
            v = getattr(self, name)
            _check(math.isfinite(v) and v > 0, f"pool.{name} must be a positive number")
        _check(
            self.default_deadline_s <= self.max_deadline_s,
            "pool.default_deadline_s must be <= pool.max_deadline_s",
        )
        _check(self.max_extra_workers >= 0, "pool.max_extra_workers must be >= 0")
        _check(self.max_queue_items >= 1, "pool.max_queue_items must be >= 1")
        _check(self.recycle_after >= 1, "pool.recycle_after must be >= 1")
        _check(
            self.memory_limit_mb == 0 or self.memory_limit_mb >= 256,
            "pool.memory_limit_mb must be 0 (off) or >= 256",
        )
        _check(self.result_cache_size >= 0, "pool.result_cache_size must be >= 0")


MIN_TOKEN_CHARS = 8
"""Shortest accepted bearer token (``ServerConfig.auth_token``)."""

DEFAULT_METRICS_PORT = 9464
"""The Prometheus port of ``python -m server`` (its ``--metrics-port`` default)."""


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC server around the pool."""

    host: str = "127.0.0.1"
    """Address to bind; the default keeps the service local. Use 0.0.0.0 (with auth/TLS) to
    expose it."""
    port: int = 50051
    """gRPC port; 0 picks a free one (``create_server`` returns it)."""
    metrics_port: int | None = 0
    """Prometheus HTTP port on ``host``; 0 (the default in code) picks a free one, so two
    servers in one machine never collide (``RewardServer.metrics_port`` says which); None
    disables metrics. ``python -m server`` defaults to ``DEFAULT_METRICS_PORT`` instead."""
    http_port: int | None = None
    """Port of the optional HTTP listener on ``host`` serving OpenRLHF's remote reward protocol
    (``POST /get_reward``, see ``server.http``); 0 picks a free one; None (default) disables it.
    It shares the pool, guards, auth token and TLS settings of the gRPC server."""
    grpc_threads: int = 16
    """Threads serving RPCs (each in-flight RPC holds one while it waits for its results)."""
    grace_s: float = 30.0
    """On SIGTERM: how long in-flight RPCs may take to finish before the server stops."""
    retry_after_ms: int = 200
    """Back-off hint sent with RESOURCE_EXHAUSTED (trailing metadata ``retry-after-ms``)."""
    auth_token: str | None = None
    """If set, every RPC but health checks needs metadata ``authorization: Bearer <token>``;
    at least ``MIN_TOKEN_CHARS`` (8) characters."""
    tls_cert: Path | None = None
    """PEM server certificate chain; with ``tls_key`` turns TLS on."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; if set, clients must present a certificate it signed (mTLS)."""
    log_level: str = "INFO"
    """Logging level of the JSON logs on stderr."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Worker pool, verifier and limits."""

    def __post_init__(self) -> None:
        _check(bool(self.host), "server.host must not be empty")
        _check(0 <= self.port <= 65535, "server.port must be in [0, 65535]")
        _check(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            "server.metrics_port must be in [0, 65535] or None",
        )
        _check(
            self.http_port is None or 0 <= self.http_port <= 65535,
            "server.http_port must be in [0, 65535] or None",
        )
        _check(self.grpc_threads >= 2, "server.grpc_threads must be >= 2")
        _check(self.grace_s >= 0, "server.grace_s must be >= 0")
        _check(self.retry_after_ms >= 0, "server.retry_after_ms must be >= 0")
        _check(
            self.auth_token is None or len(self.auth_token) >= MIN_TOKEN_CHARS,
            f"server.auth_token must be at least {MIN_TOKEN_CHARS} characters",
        )
        _check(
            (self.tls_cert is None) == (self.tls_key is None),
            "server.tls_cert and server.tls_key must be given together",
        )
        _check(
            self.tls_client_ca is None or self.tls_cert is not None,
            "server.tls_client_ca (mTLS) needs tls_cert and tls_key",
        )
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            p = getattr(self, name)
            _check(p is None or os.path.isfile(p), f"server.{name}: no such file: {p}")
        _check(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "server.log_level must be DEBUG, INFO, WARNING or ERROR",
        )

        _check(
            self.pool.limits.max_batch_items <= self.pool.max_queue_items,
            "limits.max_batch_items must be <= pool.max_queue_items (a full batch must fit)",
        )

    @property
    def tls(self) -> bool:
        """Whether TLS is on."""
        return self.tls_cert is not None
