"""Throw-away PKI for the TLS tests: a CA, a server certificate for localhost, a client one."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(subject: str, key, issuer_name, issuer_key, *, ca=False, server=False):
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return b.sign(issuer_key or key, hashes.SHA256())


def make_pki(folder: Path) -> dict[str, Path]:
    """Write ca.pem, server.pem/server.key, client.pem/client.key into ``folder``."""
    ca_key = _key()
    ca = _cert("fipo test CA", ca_key, None, None, ca=True)
    srv_key, cli_key = _key(), _key()
    srv = _cert("localhost", srv_key, ca.subject, ca_key, server=True)
    cli = _cert("fipo test client", cli_key, ca.subject, ca_key)
    out = {}
    for name, data in {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": srv.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(srv_key),
        "client.pem": cli.public_bytes(serialization.Encoding.PEM),
        "client.key": _pem_key(cli_key),
    }.items():
        p = folder / name
        p.write_bytes(data)
        out[name] = p
    return out


def secure_config(pki: dict[str, Path], token: str):
    """A port-0 ``ServerConfig`` with mTLS (``pki`` from :func:`make_pki`) and a bearer token."""
    from server.config import PoolConfig, ServerConfig

    return ServerConfig(
        port=0,
        metrics_port=None,
        auth_token=token,
        tls_cert=pki["server.pem"],
        tls_key=pki["server.key"],
        tls_client_ca=pki["ca.pem"],
        pool=PoolConfig(workers=1),
    )
