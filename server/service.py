"""The gRPC layer: ``RewardService`` servicer, ``create_server`` and ``serve``.

Thin on purpose: it converts wire messages (``server.convert``), applies request-level
limits, hands items to the ``WorkerPool`` and turns its answers back into messages. The pool
is created *before* the ``grpc.Server`` (gRPC Python cannot fork once a server exists).

``create_server(config)`` returns a started server and its port (port 0 binds a free one), so
tests run a real server; ``serve(config)`` adds signal handling: SIGTERM/SIGINT mark the
server NOT_SERVING, stop accepting RPCs, let in-flight ones finish within ``grace_s``, stop
the workers and return 0.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import convert
from server.config import ServerConfig
from server.gen.fipo.v1 import reward_pb2 as pb
from server.metrics import ServerMetrics
from server.pool import PoolClosed, QueueFull, WorkerPool
from server.security import BearerTokenInterceptor, server_credentials
from server.types import ScoreItem, ScoreResult

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
_HEALTH_POLL_S = 0.25


class BindError(RuntimeError):
    """A port could not be bound; the message names it and the setting that changes it."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RewardServicer:
    """Implements ``fipo.v1.RewardService`` on top of a ``WorkerPool``."""

    def __init__(
        self, config: ServerConfig, pool: WorkerPool, metrics: ServerMetrics | None
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.draining = threading.Event()

    # -- helpers ---------------------------------------------------------------------------
    def _observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self.metrics:
            self.metrics.rpcs.labels(method, code.name).inc()
            self.metrics.rpc_seconds.labels(method).observe(time.monotonic() - started)

    def _expires_at(self, context: grpc.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _refuse_if_draining(self, context: grpc.ServicerContext) -> None:
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry elsewhere")

    # -- RPCs ------------------------------------------------------------------------------
    def Score(
        self, decoded: list[convert.Decoded], context: grpc.ServicerContext
    ) -> pb.ScoreResponse:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            self._refuse_if_draining(context)
            limit = self.config.pool.limits.max_batch_items
            if len(decoded) > limit:
                code = grpc.StatusCode.INVALID_ARGUMENT
                context.abort(
                    code, f"batch has {len(decoded)} items; max_batch_items is {limit} (split it)"
                )
            items = [d for d in decoded if isinstance(d, ScoreItem)]
            try:
                futures = iter(
                    self.pool.submit_many(items, block=False, expires_at=self._expires_at(context))
                )
            except QueueFull as e:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                if self.metrics:
                    self.metrics.rejected_items.inc(len(items))
                retry_ms = max(self.config.retry_after_ms, int(e.retry_after_s * 1e3))
                context.set_trailing_metadata((("retry-after-ms", str(retry_ms)),))
                context.abort(code, f"server busy: {e}; retry after {retry_ms} ms")
            except PoolClosed:
                code = grpc.StatusCode.UNAVAILABLE
                context.abort(code, "server is shutting down; retry elsewhere")
            order = [next(futures) if isinstance(d, ScoreItem) else d for d in decoded]
            pending = [f for f in order if isinstance(f, concurrent.futures.Future)]
            context.add_callback(lambda: [f.cancel() for f in pending])
            try:
                results = [
                    f.result() if isinstance(f, concurrent.futures.Future) else f for f in order
                ]
            except concurrent.futures.CancelledError:  # the client cancelled or timed out
                code = grpc.StatusCode.CANCELLED
                return pb.ScoreResponse()
            return pb.ScoreResponse(results=[convert.result_to_pb(r) for r in results])
        except Exception:
            if code is grpc.StatusCode.OK:
                code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self._observe("Score", code, started)

    def ScoreStream(
        self, requests: Iterator[convert.Decoded], context: grpc.ServicerContext
    ) -> Iterator[pb.ScoreResult]:
        started = time.monotonic()
        self._refuse_if_draining(context)
        out: queue.Queue = queue.Queue()
        done_reading = object()
        expires_at = self._expires_at(context)

        def read() -> None:
            # Submitting blocks while the pool's queue is full: we stop reading, and HTTP/2
            # flow control pushes back on the client. Nothing is dropped.
            n = 0
            try:
                for decoded in requests:
                    n += 1
                    if isinstance(decoded, ScoreResult):
                        out.put(decoded)
                        continue
                    fut = self.pool.submit(decoded, block=True, expires_at=expires_at)
                    context.add_callback(fut.cancel)
                    fut.add_done_callback(lambda f: out.put(None if f.cancelled() else f.result()))
            except PoolClosed:
                out.put(PoolClosed())
            except Exception as e:  # the client went away or sent garbage
                out.put(e)
            out.put((done_reading, n))

        threading.Thread(target=read, name="fipo-stream-reader", daemon=True).start()
        total, sent, code = None, 0, grpc.StatusCode.OK
        try:
            while total is None or sent < total:
                msg = out.get()
                if isinstance(msg, tuple) and msg and msg[0] is done_reading:
                    total = msg[1]
                    continue
                if isinstance(msg, PoolClosed):
                    code = grpc.StatusCode.UNAVAILABLE
                    context.abort(code, "server is shutting down; retry elsewhere")
                if isinstance(msg, Exception):
                    code = (
                        grpc.StatusCode.CANCELLED
                        if not context.is_active()
                        else grpc.StatusCode.INTERNAL
                    )
                    if context.is_active():
                        log.warning("stream reader failed", extra={"error": repr(msg)})
                    return
                sent += 1
                if msg is not None:
                    yield convert.result_to_pb(msg)
        finally:
            self._observe("ScoreStream", code, started)

    def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.ServerInfo:
        started = time.monotonic()
        cfg, pcfg = self.config, self.config.pool
        lim, ver = pcfg.limits, pcfg.verifier
        info = pb.ServerInfo(
            server_version=_version("fipo"),
            math_verify_version=_version("math-verify"),
            sympy_version=_version("sympy"),
            grpc_version=grpc.__version__,
            workers=pcfg.workers,
            live_workers=self.pool.live_workers(),
            limits=pb.Limits(
                max_batch_items=lim.max_batch_items,
                max_response_chars=lim.max_response_chars,
                max_gold_chars=lim.max_gold_chars,
                max_golds=lim.max_golds,
                max_message_bytes=lim.max_message_bytes,
                max_queue_items=pcfg.max_queue_items,
            ),
            verifier=pb.VerifierSettings(
                float_rounding=ver.float_rounding,
                numeric_precision=ver.numeric_precision,
                strict=ver.strict,
                exact_numeric_recheck=ver.exact_numeric_recheck,
                recheck_rel_tol=ver.recheck_rel_tol,
                require_evaluated_answer=ver.require_evaluated_answer,
                default_deadline_s=pcfg.default_deadline_s,
                max_deadline_s=pcfg.max_deadline_s,
            ),
            auth_required=cfg.auth_token is not None,
            tls=cfg.tls,
            mtls=cfg.tls_client_ca is not None,
        )
        self._observe("GetServerInfo", grpc.StatusCode.OK, started)
        return info


def _handlers(servicer: RewardServicer) -> grpc.GenericRpcHandler:
    # Our own deserializers (not the generated ones) so that invalid UTF-8 in one item becomes
    # that item's INVALID status instead of failing the whole call (see server.convert).
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Score": grpc.unary_unary_rpc_method_handler(
                servicer.Score,
                request_deserializer=convert.decode_request,
                response_serializer=pb.ScoreResponse.SerializeToString,
            ),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(
                servicer.ScoreStream,
                request_deserializer=convert.decode_item,
                response_serializer=pb.ScoreResult.SerializeToString,
            ),
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                servicer.GetServerInfo,
                request_deserializer=pb.GetServerInfoRequest.FromString,
                response_serializer=pb.ServerInfo.SerializeToString,
            ),
        },
    )


class RewardServer:
    """A running reward server: the gRPC server, its pool, health and metrics endpoints.

    Attributes:
        port: The bound gRPC port.
        metrics_port: The bound Prometheus port, or None.
        http_port: The bound port of the HTTP listener (``server.http``), or None.
        pool: The worker pool.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._stopped = threading.Event()
        # Held while the health status is decided, so the watcher never reports the drain
        # (stop() does) nor sets SERVING again after stop() set NOT_SERVING.
        self._health_lock = threading.Lock()
        self._metrics_httpd = None
        self._http = None
        metrics = None
        if config.metrics_port is not None:
            pool_ref: list[WorkerPool] = []
            metrics = ServerMetrics(
                queue_depth=lambda: pool_ref[0].queue_depth() if pool_ref else 0,
                live_workers=lambda: pool_ref[0].live_workers() if pool_ref else 0,
            )
        # 1. Workers first: no gRPC server may exist when they fork.
        self.pool = WorkerPool(config.pool, events=metrics)
        if metrics is not None:
            pool_ref.append(self.pool)
        try:
            self._start_grpc(config, metrics)
            if config.http_port is not None:
                from server.http import HttpListener  # aiohttp only when asked for

                self._http = HttpListener(config, self.pool, metrics, self.servicer.draining)
                self.http_port = self._http.start()
        except BaseException:
            if getattr(self, "grpc_server", None) is not None:
                self.grpc_server.stop(0)
            self.pool.close(drain=False)
            raise
        if metrics is not None:
            from prometheus_client import start_http_server

            try:
                self._metrics_httpd, _ = start_http_server(
                    config.metrics_port, addr=config.host, registry=metrics.registry
                )
            except OSError as e:
                self.grpc_server.stop(0)
                if self._http is not None:
                    self._http.stop()
                self.pool.close(drain=False)
                raise BindError(
                    f"could not bind the Prometheus metrics port {config.host}:"
                    f"{config.metrics_port} ({e.strerror or e}); choose another with "
                    "--metrics-port (ServerConfig.metrics_port; 0 picks a free one) or turn "
                    "metrics off with --no-metrics (metrics_port=None)"
                ) from e
            self.metrics_port = self._metrics_httpd.server_port
        self._health_thread = threading.Thread(
            target=self._watch_health, name="fipo-health", daemon=True
        )
        self._health_thread.start()
        log.info(
            "reward server listening",
            extra={
                "address": f"{config.host}:{self.port}",
                "metrics_port": self.metrics_port,
                "http_port": self.http_port,
                "workers": config.pool.workers,
                "tls": config.tls,
                "mtls": config.tls_client_ca is not None,
                "auth": config.auth_token is not None,
            },
        )

    def _start_grpc(self, config: ServerConfig, metrics: ServerMetrics | None) -> None:
        interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
        size = config.pool.limits.max_message_bytes
        self.grpc_server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(
                config.grpc_threads, thread_name_prefix="fipo-rpc"
            ),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0),
                # Clients ping while their calls run (``RewardClient(keepalive_s=...)``);
                # a verification can send nothing for seconds, so accept pings without
                # data down to 1 s apart instead of answering them with GOAWAY.
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
            maximum_concurrent_rpcs=config.grpc_threads * 4,
        )
        self.servicer = RewardServicer(config, self.pool, metrics)
        self.grpc_server.add_generic_rpc_handlers((_handlers(self.servicer),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        address = f"{config.host}:{config.port}"
        creds = server_credentials(config)
        try:  # grpcio raises RuntimeError on a failed bind; older versions returned 0
            if creds is None:
                port = self.grpc_server.add_insecure_port(address)
            else:
                port = self.grpc_server.add_secure_port(address, creds)
        except RuntimeError:
            port = 0
        if port == 0:
            raise BindError(
                f"could not bind the gRPC port {address} (already in use, or not a local "
                "address); choose another with --port / --host (ServerConfig.port; 0 picks a "
                "free one)"
            )
        self.port = port
        self._set_health(True)
        self.grpc_server.start()

    def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _watch_health(self) -> None:
        last = None
        while not self._stopped.wait(_HEALTH_POLL_S):
            with self._health_lock:
                if self.servicer.draining.is_set():
                    return  # stop() set NOT_SERVING and logged "draining"
                serving = self.pool.live_workers() > 0
                if serving != last:
                    self._set_health(serving)
                    if last is not None:
                        log.warning("health changed", extra={"serving": serving})
                    last = serving

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new RPCs, finish in-flight ones, stop workers.

        Args:
            grace: Seconds in-flight RPCs may take; default ``config.grace_s``.
        """
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace})
        with self._health_lock:
            self.servicer.draining.set()
            self._set_health(False)
        self._stopped.set()
        if self._http is not None:
            self._http.stop(grace)
        self.grpc_server.stop(grace).wait()
        self.pool.close(drain=True, timeout=grace)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        log.info("stopped")

    def wait(self) -> None:
        """Block until the server stops."""
        self.grpc_server.wait_for_termination()

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def create_server(config: ServerConfig | None = None) -> tuple[RewardServer, int]:
    """Start the worker pool, then a gRPC server on ``config.host:config.port``.

    Args:
        config: Server settings; ``port=0`` binds a free port.

    Returns:
        ``(server, port)``: the running server (call ``server.stop()``) and its gRPC port.

    Raises:
        BindError: The gRPC or the metrics port could not be bound (the message names it).
    """
    server = RewardServer(config or ServerConfig())
    return server, server.port


def serve(config: ServerConfig | None = None) -> int:
    """Run a server until SIGTERM / SIGINT, then drain and return 0 (the process exit code)."""
    server, _ = create_server(config)
    stop = threading.Event()

    def on_signal(signum: int, frame) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0
