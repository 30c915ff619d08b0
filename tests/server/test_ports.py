"""Starting and stopping a server: no fixed metrics port by default in the library, a taken
port is named with its flag, and stop() logs no stray health change."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest

from server import service
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


def test_stopping_is_not_reported_as_a_health_change(monkeypatch):
    """The watcher used to log a stray "health changed" when it polled mid-stop()."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("server.service")
    logger.addHandler(handler)
    monkeypatch.setattr(service, "_HEALTH_POLL_S", 0.01)
    srv, _ = create_server(ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=1)))
    time.sleep(0.2)  # let the watcher take its first look (it reports changes after that)
    set_health = srv._set_health

    def slow_set_health(serving: bool) -> None:
        if not serving:
            time.sleep(0.2)  # widen stop()'s window: the watcher polls 20 times meanwhile
        set_health(serving)

    srv._set_health = slow_set_health
    try:
        srv.stop(grace=0)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.getMessage() == "health changed"] == []
