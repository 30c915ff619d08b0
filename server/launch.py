"""Start a reward server as a child process and wait until it serves.

These helpers depend on the server's own contract: its command line
(``python -m server --port 0 ...``, see ``server.__main__``) and the JSON log line that
reports the bound address (``"address": "host:port"``, written by ``server.service``). They
live beside that contract so that a trainer, a benchmark or a test can start a server
without knowing how it prints.

Typical use::

    proc, address = start_reward_server(workers=2, log_path=Path("reward_server.log"))
    try:
        wait_reward_server(address)
        ...  # RewardClient(address)
    finally:
        stop_process(proc)
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# The service's start-up log line carries the bound address (a JSON field).
ADDRESS_PATTERN = re.compile(r'"address":\s*"([^"]+)"')


class RewardServerError(RuntimeError):
    """The reward server could not be started or reached."""


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """In a child process: receive ``sig`` when the parent dies, even by SIGKILL (Linux).

    A no-op where ``prctl`` is unavailable. Suitable as a ``preexec_fn``.
    """
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG


def start_reward_server(
    workers: int,
    log_path: Path,
    timeout_s: float = 180.0,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_args: Sequence[str] = ("--no-metrics",),
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m server`` (on a free port by default); return ``(process, address)``.

    The server's output goes to ``log_path`` (appended to: a resumed run keeps its log);
    the child gets SIGTERM when this process dies.

    Args:
        workers: math-verify worker processes.
        log_path: File that receives the server's JSON log lines.
        timeout_s: How long to wait for the server to report its address.
        host: Address to bind (``--host``); a Ray replica binds its node's IP.
        port: gRPC port (``--port``); 0 picks a free one.
        extra_args: More ``python -m server`` flags (the default turns metrics off;
            ``("--metrics-port", "0")`` serves them on a free port, logged as
            ``"metrics_port"``).

    Raises:
        RewardServerError: It exited or did not report its address within ``timeout_s``.
    """
    offset = log_path.stat().st_size if log_path.exists() else 0  # a resumed run appends
    log = open(log_path, "ab")  # noqa: SIM115 -- owned by the child for its lifetime
    cmd = [sys.executable, "-m", "server", "--host", host, "--port", str(port),
           "--workers", str(workers), *extra_args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=set_parent_death_signal)  # fmt: skip
    log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = ADDRESS_PATTERN.search(log_path.read_bytes()[offset:].decode(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RewardServerError(
                f"the reward server exited with code {proc.returncode} at start:\n{tail}"
            )
        time.sleep(0.2)
    stop_process(proc)
    raise RewardServerError(f"the reward server did not start within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_reward_server(address: str, timeout_s: float = 60.0) -> None:
    """Check that ``address`` serves (gRPC health SERVING), retrying with back-off.

    ``address`` may list several replicas (``"h1:p1,h2:p2"``): each must serve, within
    ``timeout_s`` in all.

    Raises:
        RewardServerError: One is still unreachable after ``timeout_s`` (the message names
            it and says how to fix it), or the address list is malformed.
    """
    from server.addresses import parse_addresses

    try:
        addresses = parse_addresses(address)
    except ValueError as e:
        raise RewardServerError(str(e)) from None
    deadline = time.monotonic() + timeout_s
    for one in addresses:
        _wait_one(one, deadline, timeout_s)


def _wait_one(address: str, deadline: float, timeout_s: float) -> None:
    from server.client import RewardClient

    delay, last, attempts = 0.5, "", 0
    while True:
        attempts += 1
        client = RewardClient(address)
        try:
            status = client.health(timeout_s=min(5.0, max(0.5, deadline - time.monotonic())))
            if status == "SERVING":
                return
            last = f"health status {status}"
        except Exception as exc:  # noqa: BLE001 -- any failure means "not reachable yet"
            last = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            client.close()
        if time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
    raise RewardServerError(
        f"reward server at {address} is unreachable after {attempts} attempts in "
        f"{timeout_s:.0f} s ({last}). Start one with `python -m server --port PORT`, or leave "
        "rollout.reward_address empty to let the trainer start its own."
    )
