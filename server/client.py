"""Python clients of the reward service: ``RewardClient`` (sync) and ``AsyncRewardClient``.

Both implement ``server.types.Scorer`` (``score(items) -> list[ScoreResult]``), so code
written against an in-process ``WorkerPool`` works unchanged against a remote server.

* Batching: long item lists are split into requests of ``batch_size`` items, sent
  concurrently (at most ``max_in_flight`` at once).
* Retries: UNAVAILABLE and RESOURCE_EXHAUSTED are retried with exponential back-off and
  jitter, honouring the server's ``retry-after-ms`` hint, until ``max_retries`` or the
  deadline.
* Deadlines: ``timeout_s`` bounds the whole ``score`` call; every RPC gets the time that is
  left, and the server caps each item's verification by it.
* Replicas: ``address`` may list several servers (``"h1:p1,h2:p2"`` or a list); gRPC's own
  ``round_robin`` balancer spreads the requests over them (``server.addresses``), and a
  request that fails UNAVAILABLE (its replica died or is draining) is re-sent, which the
  balancer routes to a live replica. ``client.failovers`` / ``client.stats()`` count the
  re-sent requests, for the trainer's metrics.

Example:
    >>> with RewardClient("127.0.0.1:50051") as client:          # doctest: +SKIP
    ...     client.score([ScoreItem("q1", "... \\\\boxed{4}", ("4",))])[0].reward
    1.0
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import convert
from server.addresses import ROUND_ROBIN, grpc_target, is_ip, parse_addresses, split_host_port
from server.gen.fipo.v1 import reward_pb2 as pb
from server.gen.fipo.v1 import reward_pb2_grpc as pb_grpc
from server.trl_reward import make_trl_reward_func
from server.types import ScoreItem, ScoreResult

__all__ = [
    "AsyncRewardClient",
    "ClientStats",
    "RewardClient",
    "RewardError",
    "make_trl_reward_func",
]

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class RewardError(RuntimeError):
    """A scoring call failed for good (not retryable, retries used up, or deadline passed)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class ClientStats:
    """What a client has sent since it was created (all ``Score`` RPCs, not streams).

    Attributes:
        requests: ``Score`` RPCs sent, re-sends included.
        retries: RPCs re-sent after a retryable code (UNAVAILABLE or RESOURCE_EXHAUSTED).
        failovers: RPCs re-sent after UNAVAILABLE: the replica that had the request died
            or was draining; with several addresses the balancer sends it to a live one.
            A part of ``retries``.
    """

    requests: int = 0
    retries: int = 0
    failovers: int = 0

    def metrics(self, prefix: str = "reward/client_") -> dict[str, float]:
        """The counters as namespaced metrics (``reward/client_failovers``, ...)."""
        return {f"{prefix}{k}": float(v) for k, v in vars(self).items()}


class _Counters:
    """Thread-safe ``ClientStats`` counters (one client serves many threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = ClientStats()

    def add(self, *, requests: int = 0, retries: int = 0, failovers: int = 0) -> None:
        with self._lock:
            s = self._stats
            self._stats = ClientStats(
                s.requests + requests, s.retries + retries, s.failovers + failovers
            )

    def get(self) -> ClientStats:
        with self._lock:
            return self._stats


def _read(x: bytes | str | Path | None) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    return Path(x).read_bytes()


class _Settings:
    """Connection and retry settings shared by both clients."""

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        batch_size: int = 512,
        max_in_flight: int = 4,
        timeout_s: float = 300.0,
        max_retries: int = 8,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        keepalive_s: float = 10.0,
    ) -> None:
        if batch_size < 1 or max_in_flight < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("batch_size, max_in_flight >= 1, max_retries >= 0, timeout_s > 0")
        if keepalive_s < 0:
            raise ValueError(f"keepalive_s must be >= 0 (0 = off), got {keepalive_s}")
        self.addresses = parse_addresses(address)
        self.address = ",".join(self.addresses)
        self.target = grpc_target(self.addresses)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.tls = tls or root_certificates is not None or client_cert is not None
        self.creds = (
            grpc.ssl_channel_credentials(
                _read(root_certificates), _read(client_key), _read(client_cert)
            )
            if self.tls
            else None
        )
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if keepalive_s > 0:
            # While calls are in flight, ping every keepalive_s; a replica that does not
            # answer within as long (hung, stopped, its machine gone) has its connection
            # closed: its calls fail UNAVAILABLE and are re-sent (failover), instead of
            # waiting for the deadline. The server accepts pings this often (service.py).
            ms = max(1000, int(keepalive_s * 1000))
            self.options += [
                ("grpc.keepalive_time_ms", ms),
                ("grpc.keepalive_timeout_ms", ms),
                ("grpc.keepalive_permit_without_calls", 0),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if len(self.addresses) > 1:
            self.options.append(("grpc.service_config", ROUND_ROBIN))
            host = split_host_port(self.addresses[0])[0]
            if self.tls and not is_ip(host):
                # The target holds IPs; check the certificate against the first host name
                # (replicas share one certificate).
                self.options.append(("grpc.ssl_target_name_override", host))
        self.counters = _Counters()

    def unavailable(self, details: str) -> str:
        """An UNAVAILABLE message that names the addresses tried."""
        many = len(self.addresses) > 1
        where = f"any of {', '.join(self.addresses)}" if many else self.address
        return f"no reward server reachable at {where}: {details}"

    def give_up(self, code: grpc.StatusCode, details: str) -> RewardError:
        """The error for a request that failed for good."""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = self.unavailable(details)
        return RewardError(code, details)

    def delay(self, attempt: int, err: grpc.RpcError | grpc.aio.AioRpcError) -> float:
        """Back-off before retry ``attempt`` (1-based), at least the server's hint."""
        hint = 0.0
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == "retry-after-ms":
                with contextlib.suppress(ValueError):
                    hint = float(value) / 1e3
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return max(hint, base * random.uniform(0.5, 1.0))

    def retry_pause(
        self, attempt: int, err: grpc.RpcError | grpc.aio.AioRpcError, deadline: float
    ) -> float:
        """Back-off before re-sending after ``err``; raises when the request is lost for good.

        Raises:
            RewardError: ``err`` is not retryable, retries are used up, or the back-off
                would pass ``deadline``; UNAVAILABLE names the addresses.
        """
        code, details = err.code(), err.details() or ""
        if code not in RETRYABLE or attempt > self.max_retries:
            raise self.give_up(code, details) from None
        pause = self.delay(attempt, err)
        if time.monotonic() + pause >= deadline:
            if code == grpc.StatusCode.UNAVAILABLE:
                details = self.unavailable(details)
            raise RewardError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"gave up retrying {code.name}: {details}"
            ) from None
        return pause

    def counted_retry(self, code: grpc.StatusCode) -> None:
        """Count a re-send after ``code`` (a failover when UNAVAILABLE)."""
        self.counters.add(retries=1, failovers=int(code == grpc.StatusCode.UNAVAILABLE))

    def chunks(self, items: Sequence[ScoreItem]) -> list[Sequence[ScoreItem]]:
        return [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]


def _request(chunk: Sequence[ScoreItem]) -> pb.ScoreRequest:
    return pb.ScoreRequest(items=[convert.item_to_pb(it) for it in chunk])


def _results(resp: pb.ScoreResponse, n: int) -> list[ScoreResult]:
    if len(resp.results) != n:
        raise RewardError(
            grpc.StatusCode.INTERNAL, f"server returned {len(resp.results)} results for {n} items"
        )
    return [convert.result_from_pb(r) for r in resp.results]


class _CountedClient:
    """What the sync and the async client report about their addresses and retries."""

    _s: _Settings

    @property
    def addresses(self) -> tuple[str, ...]:
        """The server addresses this client spreads its requests over."""
        return self._s.addresses

    @property
    def failovers(self) -> int:
        """``Score`` requests re-sent after UNAVAILABLE (see ``ClientStats``)."""
        return self._s.counters.get().failovers

    def stats(self) -> ClientStats:
        """Requests, retries and failovers so far (``stats().metrics()`` for logging)."""
        return self._s.counters.get()


class RewardClient(_CountedClient):
    """Blocking client; implements ``Scorer``.

    Args:
        address: ``host:port`` of the server, or several replicas (``"h1:p1,h2:p2"`` or
            a list; see ``server.addresses``): requests are spread over them by gRPC's
            ``round_robin`` balancer and a request whose replica dies is re-sent to a live
            one (counted in ``failovers``). Host names of a list are resolved once, here.
        token: Bearer token, if the server requires one.
        tls: Use TLS with the system's root certificates.
        root_certificates: PEM CA (bytes or path) to verify the server (turns TLS on).
        client_cert: PEM client certificate for mTLS (bytes or path).
        client_key: PEM key of ``client_cert``.
        batch_size: Items per request.
        max_in_flight: Requests sent concurrently by one ``score`` call.
        timeout_s: Default deadline of a whole ``score`` call.
        max_retries: Retries per request on UNAVAILABLE / RESOURCE_EXHAUSTED.
        backoff_s: First back-off; doubles per retry, with jitter.
        max_backoff_s: Back-off cap.
        max_message_bytes: Largest message sent or received.
        keepalive_s: While calls are in flight, ping the server this often and give up
            on a connection whose ping is not answered within as long: a hung replica's
            requests then fail over instead of waiting for the deadline (0 = off; our
            server accepts pings every second or more).

    Raises:
        ValueError: The address list is empty, an address is malformed or a host name
            does not resolve (the message names it).
    """

    def __init__(self, address: str | Sequence[str], **kwargs) -> None:
        self._s = _Settings(address, **kwargs)
        s = self._s
        if s.creds is not None:
            self._channel = grpc.secure_channel(s.target, s.creds, options=s.options)
        else:
            self._channel = grpc.insecure_channel(s.target, options=s.options)
        self._stub = pb_grpc.RewardServiceStub(self._channel)

    def score(
        self, items: Sequence[ScoreItem], *, timeout_s: float | None = None
    ) -> list[ScoreResult]:
        """Score ``items``; one result per item, in order.

        Raises:
            RewardError: A request failed for good.
        """
        items = list(items)
        deadline = time.monotonic() + (timeout_s or self._s.timeout_s)
        chunks = self._s.chunks(items)
        out: list[list[ScoreResult] | None] = [None] * len(chunks)
        for start in range(0, len(chunks), self._s.max_in_flight):
            window = range(start, min(len(chunks), start + self._s.max_in_flight))
            calls = {i: self._send(chunks[i], deadline) for i in window}
            for i, call in calls.items():
                out[i] = self._collect(chunks[i], call, deadline)
        return [r for part in out for r in part]  # type: ignore[union-attr]

    def _send(self, chunk: Sequence[ScoreItem], deadline: float):
        self._s.counters.add(requests=1)
        return self._stub.Score.future(
            _request(chunk),
            timeout=max(0.001, deadline - time.monotonic()),
            metadata=self._s.metadata,
        )

    def _collect(self, chunk: Sequence[ScoreItem], call, deadline: float) -> list[ScoreResult]:
        attempt = 0
        while True:
            try:
                return _results(call.result(), len(chunk))
            except grpc.RpcError as e:
                attempt += 1
                pause = self._s.retry_pause(attempt, e, deadline)
                time.sleep(pause)
                self._s.counted_retry(e.code())
                call = self._send(chunk, deadline)

    def score_stream(
        self, items: Iterable[ScoreItem], *, timeout_s: float | None = None
    ) -> Iterator[ScoreResult]:
        """Stream items; yields results as they finish (out of order: match by ``id``).

        ``items`` may be a generator producing rollouts as they are generated. Not retried:
        on failure a ``RewardError`` is raised and the caller resends what is missing.
        """
        requests = (convert.item_to_pb(it) for it in items)
        call = self._stub.ScoreStream(
            requests, timeout=timeout_s or self._s.timeout_s, metadata=self._s.metadata
        )
        try:
            for msg in call:
                yield convert.result_from_pb(msg)
        except grpc.RpcError as e:
            raise self._s.give_up(e.code(), e.details() or "") from None

    def server_info(self, *, timeout_s: float = 10.0) -> pb.ServerInfo:
        """The server's versions, settings and limits."""
        return self._stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=timeout_s, metadata=self._s.metadata
        )

    def health(self, service: str = "", *, timeout_s: float = 5.0) -> str:
        """The gRPC health status name (``SERVING``, ``NOT_SERVING``, ...)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the channel connects (raises ``grpc.FutureTimeoutError`` otherwise)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient(_CountedClient):
    """asyncio client: ``await client.ascore(items)``; also a blocking ``Scorer``.

    The channel lives on a private event loop in a background thread, so ``ascore`` can be
    awaited from any event loop (many calls multiplex over one channel) and the blocking
    ``score`` works from plain threads. Arguments are those of ``RewardClient``.
    """

    def __init__(self, address: str | Sequence[str], **kwargs) -> None:
        self._s = _Settings(address, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fipo-reward-aio", daemon=True
        )
        self._thread.start()
        self._run(self._open()).result()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _open(self) -> None:
        s = self._s
        if s.creds is not None:
            self._channel = grpc.aio.secure_channel(s.target, s.creds, options=s.options)
        else:
            self._channel = grpc.aio.insecure_channel(s.target, options=s.options)
        self._stub = pb_grpc.RewardServiceStub(self._channel)

    async def ascore(
        self, items: Sequence[ScoreItem], *, timeout_s: float | None = None
    ) -> list[ScoreResult]:
        """Score ``items`` without blocking the caller's event loop; results in order."""
        return await asyncio.wrap_future(self._run(self._score(list(items), timeout_s)))

    def score(
        self, items: Sequence[ScoreItem], *, timeout_s: float | None = None
    ) -> list[ScoreResult]:
        """Blocking form of ``ascore`` (the ``Scorer`` protocol)."""
        return self._run(self._score(list(items), timeout_s)).result()

    async def _score(self, items: list[ScoreItem], timeout_s: float | None) -> list[ScoreResult]:
        deadline = time.monotonic() + (timeout_s or self._s.timeout_s)
        gate = asyncio.Semaphore(self._s.max_in_flight)

        async def one(chunk: Sequence[ScoreItem]) -> list[ScoreResult]:
            async with gate:
                return await self._score_chunk(chunk, deadline)

        parts = await asyncio.gather(*(one(c) for c in self._s.chunks(items)))
        return [r for part in parts for r in part]

    async def _score_chunk(self, chunk: Sequence[ScoreItem], deadline: float) -> list[ScoreResult]:
        attempt = 0
        while True:
            try:
                self._s.counters.add(requests=1)
                resp = await self._stub.Score(
                    _request(chunk),
                    timeout=max(0.001, deadline - time.monotonic()),
                    metadata=self._s.metadata,
                )
                return _results(resp, len(chunk))
            except grpc.aio.AioRpcError as e:
                attempt += 1
                pause = self._s.retry_pause(attempt, e, deadline)
                await asyncio.sleep(pause)
                self._s.counted_retry(e.code())

    async def astream(
        self, items: Iterable[ScoreItem], *, timeout_s: float | None = None
    ) -> AsyncIterator[ScoreResult]:
        """Stream items; yields results as they finish (out of order: match by ``id``)."""
        caller = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump() -> None:
            try:
                call = self._stub.ScoreStream(
                    (convert.item_to_pb(it) for it in items),
                    timeout=timeout_s or self._s.timeout_s,
                    metadata=self._s.metadata,
                )
                async for msg in call:
                    caller.call_soon_threadsafe(out.put_nowait, convert.result_from_pb(msg))
            except grpc.aio.AioRpcError as e:
                caller.call_soon_threadsafe(
                    out.put_nowait, self._s.give_up(e.code(), e.details() or "")
                )
            finally:
                caller.call_soon_threadsafe(out.put_nowait, end)

        self._run(pump())
        while (msg := await out.get()) is not end:
            if isinstance(msg, RewardError):
                raise msg
            yield msg

    async def aserver_info(self, *, timeout_s: float = 10.0) -> pb.ServerInfo:
        """The server's versions, settings and limits."""

        async def call():
            return await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=timeout_s, metadata=self._s.metadata
            )

        return await asyncio.wrap_future(self._run(call()))

    def close(self) -> None:
        """Close the channel and stop the private loop."""
        if self._loop.is_closed():
            return
        self._run(self._channel.close()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> AsyncRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)
