"""Ports: the library never takes a fixed metrics port by default; a taken port is named."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest

from server.config import DEFAULT_METRICS_PORT, PoolConfig, ServerConfig
from server.service import BindError, create_server

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def _taken_port(port: int = 0) -> Iterator[int]:
    """Hold a listening socket on 127.0.0.1:``port`` (0: a free one); yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s.getsockname()[1]


def test_library_default_metrics_port_is_free_not_fixed():
    assert ServerConfig().metrics_port == 0
    with ExitStack() as stack:
        # If something else already holds 9464, that is the collision case as well.
        with suppress(OSError):
            stack.enter_context(_taken_port(DEFAULT_METRICS_PORT))
        srv, _ = create_server(ServerConfig(port=0, pool=PoolConfig(workers=1)))
        try:
            assert srv.metrics_port not in (None, DEFAULT_METRICS_PORT)
        finally:
            srv.stop(grace=0)


def test_taken_metrics_port_names_port_and_flag():
    with _taken_port() as port, pytest.raises(BindError) as e:
        create_server(ServerConfig(port=0, metrics_port=port, pool=PoolConfig(workers=1)))
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "--metrics-port" in msg and "--no-metrics" in msg


def test_taken_grpc_port_names_port_and_flag():
    with _taken_port() as port, pytest.raises(BindError) as e:
        create_server(ServerConfig(port=port, metrics_port=None, pool=PoolConfig(workers=1)))
    assert f"127.0.0.1:{port}" in str(e.value) and "--port" in str(e.value)


def test_cli_on_a_taken_port_prints_one_line_not_a_traceback():
    with _taken_port() as port:
        proc = subprocess.run(
            [sys.executable, "-m", "server", "--port", str(port), "--no-metrics", "--workers", "1"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors[-1].startswith("fipo-reward-server: error: could not bind the gRPC port")
    assert f"127.0.0.1:{port}" in errors[-1] and "--port" in errors[-1]
