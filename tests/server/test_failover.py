"""Several reward-server replicas behind one client: round-robin spread and failover.

Two real ``python -m server`` subprocesses; one is SIGKILLed while a long ``score`` call is
running. Every item must still come back with the right reward, and the client's failover
count must equal the requests it actually re-sent.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request

import psutil
import pytest

from server.client import AsyncRewardClient, RewardClient
from server.launch import start_reward_server, stop_process, wait_reward_server
from server.types import ScoreItem, Status


def _items(n: int, start: int = 0) -> list[ScoreItem]:
    """Distinct items (no cache hits); every third one answered wrongly."""
    return [
        ScoreItem(f"q{i}", f"so \\boxed{{{2 * i + (i % 3 == 0)}}}", (str(2 * i),))
        for i in range(start, start + n)
    ]


def _check(items: list[ScoreItem], results) -> None:
    assert [r.id for r in results] == [it.id for it in items]
    for it, r in zip(items, results, strict=True):
        wrong = int(it.id[1:]) % 3 == 0
        assert r.status == (Status.WRONG if wrong else Status.OK), (it, r)
        assert r.reward == (0.0 if wrong else 1.0)


def _score_rpcs(metrics_port: int) -> float:
    """Score RPCs a server answered OK, from its Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    pattern = r'fipo_reward_rpcs_total\{code="OK",method="Score"\} ([0-9.e+]+)'
    match = re.search(pattern, text.decode())
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def two_servers(tmp_path):
    """Two reward servers (1 worker each): ``[(process, address, metrics_port), ...]``."""
    servers = []
    try:
        for i in range(2):
            log = tmp_path / f"server{i}.log"
            proc, address = start_reward_server(
                1, log, extra_args=("--metrics-port", "0", "--grace", "2")
            )
            port = int(re.search(r'"metrics_port":\s*(\d+)', log.read_text()).group(1))
            servers.append((proc, address, port))
        wait_reward_server(",".join(a for _, a, _ in servers))
        yield servers
    finally:
        for proc, _, _ in servers:
            stop_process(proc)


def _kill_mid_call(client, items, proc, started) -> None:
    """Score ``items`` in a thread, SIGKILL ``proc`` once ``started()``, and check that every
    item still got its correct reward."""
    results: list = []
    t = threading.Thread(target=lambda: results.extend(client.score(items, timeout_s=120)))
    t.start()
    while not started() and t.is_alive():
        time.sleep(0.01)
    assert t.is_alive(), "the call ended before the kill; the test needs more items"
    os.kill(proc.pid, signal.SIGKILL)
    t.join(timeout=120)
    assert not t.is_alive()
    _check(items, results)


def test_requests_spread_over_replicas_and_survive_one_dying(two_servers):
    (proc_a, addr_a, metrics_a), (proc_b, addr_b, metrics_b) = two_servers
    kids_b = psutil.Process(proc_b.pid).children(recursive=True)
    with RewardClient(f"{addr_a},{addr_b}", batch_size=2, max_in_flight=2, backoff_s=0.05) as c:
        assert c.addresses == (addr_a, addr_b)
        items = _items(24)
        _check(items, c.score(items, timeout_s=60))
        served = _score_rpcs(metrics_a), _score_rpcs(metrics_b)
        assert sum(served) == 12 and min(served) >= 3, served  # round robin: both served
        assert c.stats().failovers == 0

        # Count every request actually sent, independently of the client's counters.
        sent = []
        send = c._send
        c._send = lambda chunk, deadline: sent.append(len(chunk)) or send(chunk, deadline)
        _kill_mid_call(c, _items(400, start=100), proc_b, started=lambda: len(sent) >= 30)

        stats = c.stats()
        assert stats.failovers > 0
        assert len(sent) == 200 + stats.failovers  # 200 requests of 2, plus each re-send
        assert stats.retries == stats.failovers  # no back-pressure retries here
        assert _score_rpcs(metrics_a) > served[0]  # the survivor took over
    proc_b.wait(10)
    assert not [k for k in kids_b if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


def test_single_address_behaves_as_before(two_servers):
    (_, addr_a, metrics_a), _ = two_servers
    with RewardClient(addr_a) as c:
        assert c.addresses == (addr_a,)
        items = _items(6)
        _check(items, c.score(items))
        assert c.stats() == type(c.stats())(requests=1, retries=0, failovers=0)
        assert c.stats().metrics()["reward/client_failovers"] == 0.0
    assert _score_rpcs(metrics_a) == 1


def test_async_client_fails_over_too(two_servers):
    (_, addr_a, _), (proc_b, addr_b, metrics_b) = two_servers
    with AsyncRewardClient([addr_a, addr_b], batch_size=2, max_in_flight=2, backoff_s=0.05) as c:
        _kill_mid_call(c, _items(400), proc_b, started=lambda: _score_rpcs(metrics_b) >= 10)
        stats = c.stats()
        assert stats.failovers > 0 and stats.requests == 200 + stats.failovers


def test_a_hung_replica_is_failed_over_by_keepalive(two_servers):
    """A replica that stops answering (SIGSTOP: connected, silent) must not hold its
    requests until the deadline: the client's keepalive ping goes unanswered, the
    connection is closed, and its requests are re-sent to the live replica."""
    (_, addr_a, _), (proc_b, addr_b, metrics_b) = two_servers
    c = RewardClient(f"{addr_a},{addr_b}", batch_size=2, max_in_flight=2, backoff_s=0.05,
                     keepalive_s=1.0)  # fmt: skip
    stopped = []
    try:
        items = _items(400, start=1000)
        results: list = []
        t0 = time.monotonic()
        t = threading.Thread(target=lambda: results.extend(c.score(items, timeout_s=120)))
        t.start()
        while _score_rpcs(metrics_b) < 10 and t.is_alive():
            time.sleep(0.01)
        assert t.is_alive(), "the call ended before the replica hung; it needs more items"
        os.kill(proc_b.pid, signal.SIGSTOP)
        stopped.append(proc_b)
        t.join(timeout=120)
        assert not t.is_alive()
        # Well before the 120 s deadline: a few keepalive periods plus the work.
        assert time.monotonic() - t0 < 90
        _check(items, results)
        assert c.stats().failovers > 0
    finally:
        c.close()
        for proc in stopped:
            os.kill(proc.pid, signal.SIGCONT)
