"""`python -m server` as a real subprocess: SIGTERM drains in-flight work and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from server.client import RewardClient
from server.types import Status

from .conftest import item

REPO = Path(__file__).resolve().parents[2]


def _start(*args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", "0", "--no-metrics", *args],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        rec = json.loads(line)
        if rec["msg"] == "reward server listening":
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return proc, int(rec["address"].rsplit(":", 1)[1])
    proc.kill()
    raise AssertionError(f"server did not start (exit code {proc.poll()})")


def test_sigterm_finishes_in_flight_work_and_exits_0():
    proc, port = _start("--workers", "1", "--grace", "60")
    try:
        with RewardClient(f"127.0.0.1:{port}", max_retries=0, timeout_s=120) as c:
            c.wait_ready()
            # Polynomial comparisons that take a while, so the call is in flight at SIGTERM.
            items = [
                item(f"\\boxed{{(x+1)^{{{60 + i}}}}}", f"(x+2)^{{{60 + i}}}", id=str(i))
                for i in range(12)
            ]
            results: list = []
            t = threading.Thread(target=lambda: results.extend(c.score(items)))
            t.start()
            time.sleep(0.3)
            assert t.is_alive(), "the call finished before SIGTERM; the test needs slower items"
            proc.send_signal(signal.SIGTERM)
            t.join(timeout=120)
            assert [r.id for r in results] == [str(i) for i in range(12)]
            assert all(r.status in (Status.WRONG, Status.TIMEOUT) for r in results)
        assert proc.wait(timeout=60) == 0
        with RewardClient(f"127.0.0.1:{port}", max_retries=0, timeout_s=3) as c2:
            try:
                c2.score([item("\\boxed{1}", "1")])
                raise AssertionError("server still answering after SIGTERM")
            except Exception as e:  # connection refused / unavailable
                assert (
                    "UNAVAILABLE" in str(e) or "DEADLINE" in str(e) or isinstance(e, grpc.RpcError)
                )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_orphan_workers_after_exit():
    proc, port = _start("--workers", "2")
    children = _children(proc.pid)
    assert len(children) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    # multiprocessing's fork server and resource tracker notice their parent's exit by
    # themselves, a moment later.
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in children if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"processes left behind: {alive}"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    kids = [int(x) for x in out.stdout.split()]
    return kids + [g for k in kids for g in _children(k)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
