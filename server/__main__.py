"""``python -m server`` / ``fipo-reward-server``: run the reward server until SIGTERM.

Examples:
    python -m server                                  # 127.0.0.1:50051, metrics on :9464
    python -m server --port 0 --workers 4             # free port (printed in the JSON log)
    FIPO_REWARD_TOKEN=s3cret python -m server --host 0.0.0.0 --tls-cert c.pem --tls-key k.pem
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server.config import DEFAULT_METRICS_PORT, Limits, PoolConfig, ServerConfig, VerifierConfig
from server.logs import setup_logging
from server.pool import default_workers

TOKEN_ENV = "FIPO_REWARD_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag maps to a config field)."""
    d, dp, dl = ServerConfig(), PoolConfig(), Limits()
    p = argparse.ArgumentParser(prog="fipo-reward-server", description="fipo gRPC reward server")
    a = p.add_argument
    a("--host", default=d.host, help=f"address to bind (default {d.host}: local only)")
    a("--port", type=int, default=d.port, help=f"gRPC port, 0 = any free (default {d.port})")
    a(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus port, 0 = any free (default {DEFAULT_METRICS_PORT})",
    )
    a("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    a("--http-port", type=int, default=None,
      help="also serve OpenRLHF's HTTP reward protocol (POST /get_reward) on this port, 0 = any free")  # fmt: skip
    a("--workers", type=int, default=None, help="verify worker processes (default: usable CPUs)")
    a("--deadline", type=float, default=dp.default_deadline_s, help="default per-item deadline, s")
    a("--max-deadline", type=float, default=dp.max_deadline_s, help="largest per-item deadline, s")
    a(
        "--slow-after",
        type=float,
        default=dp.slow_after_s,
        help="an item running longer is 'slow', s",
    )
    a("--max-queue", type=int, default=dp.max_queue_items, help="items queued or running, at most")
    a("--recycle-after", type=int, default=dp.recycle_after, help="replace a worker after N items")
    a("--memory-limit-mb", type=int, default=dp.memory_limit_mb, help="worker RLIMIT_AS, 0 = none")
    a(
        "--result-cache",
        type=int,
        default=dp.result_cache_size,
        help="result cache entries, 0 = off",
    )
    a(
        "--gold-cache",
        type=int,
        default=VerifierConfig().gold_cache_size,
        help="gold cache per worker",
    )
    a("--no-recheck", action="store_true", help="keep math-verify's rounding verdicts on numbers")
    a("--allow-unevaluated", action="store_true",
      help="accept an unevaluated expression (79 + 89) for a number gold (168)")  # fmt: skip
    a("--max-batch", type=int, default=dl.max_batch_items, help="items per Score request")
    a("--max-response-chars", type=int, default=dl.max_response_chars)
    a("--max-gold-chars", type=int, default=dl.max_gold_chars)
    a("--max-message-bytes", type=int, default=dl.max_message_bytes)
    a("--grpc-threads", type=int, default=d.grpc_threads, help="threads serving RPCs")
    a("--grace", type=float, default=d.grace_s, help="SIGTERM: seconds to finish in-flight RPCs")
    a("--auth-token-file", type=Path, help=f"file holding the bearer token (or set ${TOKEN_ENV})")
    a("--tls-cert", type=Path, help="PEM certificate chain (turns TLS on, with --tls-key)")
    a("--tls-key", type=Path, help="PEM private key")
    a("--tls-client-ca", type=Path, help="PEM CA for client certificates (turns mTLS on)")
    a("--log-level", default=d.log_level, help="DEBUG, INFO, WARNING or ERROR")
    return p


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    """Parse ``argv`` into a validated ``ServerConfig`` (exits with a message when invalid)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV) or None
    if args.auth_token_file is not None:
        try:
            token = args.auth_token_file.read_text().strip()
        except OSError as e:
            parser.error(f"--auth-token-file: {e}")
    try:
        limits = Limits(
            max_batch_items=args.max_batch,
            max_response_chars=args.max_response_chars,
            max_gold_chars=args.max_gold_chars,
            max_message_bytes=args.max_message_bytes,
        )
        pool = PoolConfig(
            workers=args.workers if args.workers is not None else default_workers(),
            default_deadline_s=args.deadline,
            max_deadline_s=args.max_deadline,
            slow_after_s=args.slow_after,
            max_queue_items=args.max_queue,
            recycle_after=args.recycle_after,
            memory_limit_mb=args.memory_limit_mb,
            result_cache_size=args.result_cache,
            verifier=VerifierConfig(
                gold_cache_size=args.gold_cache,
                exact_numeric_recheck=not args.no_recheck,
                require_evaluated_answer=not args.allow_unevaluated,
            ),
            limits=limits,
        )
        return ServerConfig(
            host=args.host,
            port=args.port,
            metrics_port=None if args.no_metrics else args.metrics_port,
            http_port=args.http_port,
            grpc_threads=args.grpc_threads,
            grace_s=args.grace,
            auth_token=token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            log_level=args.log_level,
            pool=pool,
        )
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fipo-reward-server``; returns the process exit code."""
    config = config_from_args(argv)
    setup_logging(config.log_level)
    from server.service import BindError, serve  # grpc only once the arguments are valid

    try:
        return serve(config)
    except BindError as e:  # a taken port is a usage problem: one line, no traceback
        print(f"fipo-reward-server: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
