"""Optional HTTP listener next to gRPC: OpenRLHF's remote reward protocol (``POST /get_reward``).

OpenRLHF 0.11.2 (``--remote_rm_url http://host:port/get_reward[,http://...]``) POSTs
``{"query": [...], "prompts": [...], "labels": [...]}`` and reads ``rewards``, ``scores``
and ``extra_logs`` (``server.openrlhf``). Listing several server replicas as URLs shards
each batch across them. The listener shares the gRPC server's worker pool, guards, result
cache, auth token and TLS settings; aiohttp serves it from one event-loop thread, so a slow
item never blocks the gRPC threads (and vice versa, beyond sharing the pool).

Replies: 200 with the reward JSON; 400 for a malformed body (the message says what is
wrong); 401 without the bearer token when one is configured; 413 for a body above
``limits.max_message_bytes`` or a batch above ``limits.max_batch_items``; 503 with a
``Retry-After`` header when the queue is full or the server is draining (OpenRLHF retries).
An item's own problems never fail the request: they are its status (in ``extra_logs``).
The body may also set ``answer_format`` (``latex``, ``expr``, ``choice``) and
``reward_scheme`` (``binary``, ``signed``) for the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import ssl
import threading
import time
from typing import TYPE_CHECKING

from aiohttp import web

from server.openrlhf import ProtocolError, items_from_request, reply
from server.pool import PoolClosed, QueueFull
from server.types import AnswerFormat, RewardScheme

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.metrics import ServerMetrics
    from server.pool import WorkerPool

log = logging.getLogger(__name__)

PATHS = ("/get_reward", "/")
_METHOD = "HttpGetReward"  # the method label of this endpoint in the RPC metrics


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _enum(body: dict, key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    try:
        return kind(str(value).lower())
    except ValueError:
        raise ProtocolError(
            f"{key!r} must be one of {[m.value for m in kind]}, got {value!r}"
        ) from None


class HttpListener:
    """The HTTP endpoint on ``config.host:config.http_port``, over an existing pool.

    Args:
        config: Server settings (host, http_port, auth token, TLS, limits).
        pool: The worker pool the gRPC server uses.
        metrics: Prometheus metrics, or None.
        draining: Set when the server is shutting down: new requests get 503.
    """

    def __init__(
        self,
        config: ServerConfig,
        pool: WorkerPool,
        metrics: ServerMetrics | None,
        draining: threading.Event,
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.draining = draining
        self.port: int | None = None
        self._expected = f"Bearer {config.auth_token}".encode() if config.auth_token else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fipo-http", daemon=True
        )
        self._runner: web.AppRunner | None = None

    def start(self, timeout_s: float = 30.0) -> int:
        """Bind and start serving; returns the bound port (``http_port=0`` picks one)."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self.port = fut.result(timeout_s)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        return self.port

    async def _start(self) -> int:
        limits = self.config.pool.limits
        app = web.Application(client_max_size=limits.max_message_bytes)
        for path in PATHS:
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self.config.grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.host, self.config.http_port, ssl_context=self._ssl()
        )
        try:
            await site.start()
        except OSError as e:
            raise RuntimeError(
                f"could not bind HTTP listener on {self.config.host}:{self.config.http_port}: {e}"
            ) from None
        return int(self._runner.addresses[0][1])

    def _ssl(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        if cfg.tls_client_ca is not None:
            ctx.load_verify_locations(str(cfg.tls_client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish within ``grace`` s, stop the thread."""
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            self._runner._shutdown_timeout = grace  # read by cleanup(); set at construction too
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(grace + 5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def _observe(self, code: str, started: float) -> None:
        if self.metrics:
            self.metrics.rpcs.labels(_METHOD, code).inc()
            self.metrics.rpc_seconds.labels(_METHOD).observe(time.monotonic() - started)

    async def _handle(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        response = await self._score(request)
        self._observe(str(response.status), started)
        return response

    async def _score(self, request: web.Request) -> web.Response:
        if self.draining.is_set():
            return _error(503, "server is shutting down; retry elsewhere", **{"Retry-After": "1"})
        if self._expected is not None:
            sent = request.headers.get("Authorization")
            if sent is None:
                return _error(
                    401, "missing bearer token: send header 'Authorization: Bearer <token>'"
                )
            if not hmac.compare_digest(sent.encode(), self._expected):
                return _error(401, "invalid bearer token")
        try:
            body = await request.json(loads=json.loads)
        except web.HTTPRequestEntityTooLarge:
            limit = self.config.pool.limits.max_message_bytes
            return _error(413, f"request body is larger than max_message_bytes ({limit})")
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"body is not JSON: {e}")
        limit = self.config.pool.limits.max_batch_items
        try:
            if not isinstance(body, dict):
                raise ProtocolError(f"body must be a JSON object, got {type(body).__name__}")
            items = items_from_request(
                body.get("query"),
                body.get("prompts"),
                body.get("labels"),
                answer_format=_enum(body, "answer_format", AnswerFormat, AnswerFormat.LATEX),
                reward_scheme=_enum(body, "reward_scheme", RewardScheme, RewardScheme.BINARY),
            )
        except ProtocolError as e:
            return _error(400, str(e))
        if len(items) > limit:
            return _error(
                413, f"batch has {len(items)} queries; max_batch_items is {limit} (split it)"
            )
        try:
            futures = self.pool.submit_many(items, block=False)
        except QueueFull as e:
            if self.metrics:
                self.metrics.rejected_items.inc(len(items))
            retry = max(self.config.retry_after_ms / 1e3, e.retry_after_s)
            return _error(503, f"server busy: {e}", **{"Retry-After": str(math.ceil(retry))})
        except PoolClosed:
            return _error(503, "server is shutting down; retry elsewhere", **{"Retry-After": "1"})
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except asyncio.CancelledError:  # the client went away: free the workers
            for f in futures:
                f.cancel()
            raise
        return web.json_response(reply(results))
