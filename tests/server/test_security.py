"""Bearer-token auth and mutual TLS on a real server."""

from __future__ import annotations

import grpc
import pytest

from server.client import RewardClient, RewardError
from server.config import ServerConfig
from server.service import create_server
from server.types import Status

from .certs import make_pki, secure_config
from .conftest import item

TOKEN = "correct-horse-battery"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_server(pki):
    srv, port = create_server(secure_config(pki, TOKEN))
    yield f"localhost:{port}"
    srv.stop(grace=1)


def _client(address, pki, **kw):
    base = dict(
        root_certificates=pki["ca.pem"],
        client_cert=pki["client.pem"],
        client_key=pki["client.key"],
        max_retries=0,
        timeout_s=20,
    )
    return RewardClient(address, **{**base, **kw})


def test_mtls_and_token_succeed(secure_server, pki):
    with _client(secure_server, pki, token=TOKEN) as c:
        (r,) = c.score([item("\\boxed{2}", "2")])
        assert r.status is Status.OK
        info = c.server_info()
        assert info.tls and info.mtls and info.auth_required


@pytest.mark.parametrize("token", [None, "wrong-token-123"])
def test_missing_or_wrong_token_is_unauthenticated(secure_server, pki, token):
    with _client(secure_server, pki, token=token) as c:
        with pytest.raises(RewardError) as e:
            c.score([item("\\boxed{2}", "2")])
        assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(RewardError) as e2:
            list(c.score_stream([item("\\boxed{2}", "2")]))
        assert e2.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(secure_server, pki):
    with _client(secure_server, pki) as c:
        assert c.health() == "SERVING"


def test_client_without_certificate_is_refused(secure_server, pki):
    with RewardClient(
        secure_server, root_certificates=pki["ca.pem"], token=TOKEN, max_retries=0, timeout_s=5
    ) as c:
        with pytest.raises(RewardError) as e:
            c.score([item("\\boxed{2}", "2")])
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_plaintext_client_is_refused(secure_server):
    with RewardClient(secure_server, token=TOKEN, max_retries=0, timeout_s=5) as c:
        with pytest.raises(RewardError) as e:
            c.score([item("\\boxed{2}", "2")])
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_config_validation_names_the_field(pki):
    with pytest.raises(ValueError, match="tls_key"):
        ServerConfig(tls_cert=pki["server.pem"])
    with pytest.raises(ValueError, match="auth_token"):
        ServerConfig(auth_token="short")
    with pytest.raises(ValueError, match="no such file"):
        ServerConfig(tls_cert=pki["server.pem"], tls_key=pki["server.pem"].with_name("nope"))


def test_mtls_over_two_replicas_by_host_name(secure_server, pki):
    # The list's target holds resolved IPs; the certificate is checked against "localhost".
    srv, port = create_server(secure_config(pki, TOKEN))
    try:
        with _client(f"{secure_server},localhost:{port}", pki, token=TOKEN, batch_size=1) as c:
            results = c.score([item("\\boxed{2}", "2", id=str(i)) for i in range(4)])
            assert [r.status for r in results] == [Status.OK] * 4
            assert c.addresses == (secure_server, f"localhost:{port}")
    finally:
        srv.stop(grace=1)
