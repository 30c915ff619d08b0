"""Bearer-token auth (a server interceptor) and TLS / mTLS credentials for the server."""

from __future__ import annotations

import hmac

import grpc

from server.config import ServerConfig

#: Health checks stay open so load balancers and orchestrators can probe without a token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _deny(message: str) -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def _deny_stream(message: str) -> grpc.RpcMethodHandler:
    def abort(request_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires metadata ``authorization: Bearer <token>`` on every RPC but health checks.

    Args:
        token: The shared secret; compared in constant time.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if sent is None:
            message = "missing bearer token: send metadata 'authorization: Bearer <token>'"
        elif not hmac.compare_digest(sent.encode(), self._expected):
            message = "invalid bearer token"
        else:
            return continuation(handler_call_details)
        # The handler kind must match the method's (streaming or not) for the abort to arrive.
        if method.endswith("/ScoreStream") or "ServerReflectionInfo" in method:
            return _deny_stream(message)
        return _deny(message)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for ``config`` (mTLS when a client CA is set), or None for plaintext."""
    if not config.tls:
        return None
    key = config.tls_key.read_bytes()  # type: ignore[union-attr]
    cert = config.tls_cert.read_bytes()  # type: ignore[union-attr]
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
