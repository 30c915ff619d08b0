"""Supervision behaviour of WorkerPool: deadlines, kills, retries, recycling, backpressure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from server.config import Limits, PoolConfig
from server.pool import PoolClosed, QueueFull, WorkerPool
from server.supervisor import SlotHost
from server.types import Status

from .conftest import item

# Shapes the default guards refuse; some tests lift the limits to get genuinely slow items.
RELAXED = Limits(max_power_digits=10**12, max_exponent=10**12, max_tower_height=5)
SLOW_RESPONSE = "\\boxed{7^{7^{8}}}"  # sympy works on this for many seconds


def _wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_order_ids_and_results(pool):
    items = [item(f"\\boxed{{{i % 5}}}", "3", id=f"id-{i}") for i in range(40)]
    results = pool.score(items)
    assert [r.id for r in results] == [f"id-{i}" for i in range(40)]
    assert [r.correct for r in results] == [i % 5 == 3 for i in range(40)]


def test_result_cache_marks_hits(pool):
    it = item("cache me \\boxed{12}", "12")
    first, second = pool.score([it]), pool.score([it])
    assert "cached" not in first[0].flags
    assert "cached" in second[0].flags and second[0].status is Status.OK


def test_soft_deadline_times_out_only_that_item():
    cfg = PoolConfig(workers=2, limits=RELAXED, default_deadline_s=10.0)
    with WorkerPool(cfg) as pool:
        results = pool.score(
            [item(SLOW_RESPONSE, "1", id="slow", deadline_s=0.5)]
            + [item(f"\\boxed{{{i}}}", str(i), id=str(i)) for i in range(10)]
        )
    assert results[0].status is Status.TIMEOUT
    assert "0.500 s" in results[0].message
    assert all(r.status is Status.OK for r in results[1:])


def test_stuck_worker_is_killed_and_replaced():
    """A worker that does not answer (here: SIGSTOPped) is killed at the hard deadline."""
    with WorkerPool(PoolConfig(workers=1, default_deadline_s=0.5, max_extra_workers=0)) as pool:
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        stuck, after = pool.score(
            [item("\\boxed{1}", "1", id="a"), item("\\boxed{2}", "2", id="b")]
        )
        assert stuck.status is Status.TIMEOUT and "worker stopped" in stuck.message
        assert after.status is Status.OK
        assert pool.stats()["kill_timeout"] == 1
        assert pid not in pool.worker_pids() and pool.live_workers() == 1


def test_kill_9_mid_batch_loses_nothing():
    with WorkerPool(PoolConfig(workers=2, result_cache_size=0)) as pool:
        n = 120
        items = [item(f"\\boxed{{\\frac{{{i}}}{{7}}}}", f"{i % 3}/7", id=str(i)) for i in range(n)]
        futures = pool.submit_many(items)
        assert _wait_for(lambda: sum(f.done() for f in futures) >= 3)
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
        assert [r.id for r in results] == [str(i) for i in range(n)]
        assert [r.correct for r in results] == [i % 3 == i for i in range(n)]
        assert all(r.status in (Status.OK, Status.WRONG) for r in results)
        assert pool.stats().get("died", 0) >= 1
        assert _wait_for(lambda: pool.live_workers() == 2)


def test_item_that_kills_two_workers_is_internal():
    with WorkerPool(PoolConfig(workers=1, limits=RELAXED, max_extra_workers=0)) as pool:
        fut = pool.submit(item(SLOW_RESPONSE, "1", deadline_s=30.0))
        for _ in range(2):
            assert _wait_for(lambda: len(pool.worker_pids()) == 1)
            pids = pool.worker_pids()
            time.sleep(0.3)  # let the worker receive the item
            os.kill(pids[0], signal.SIGKILL)
            assert _wait_for(lambda p=pids: pool.worker_pids() != p)
        r = fut.result(timeout=60)
        assert r.status is Status.INTERNAL and "died twice" in r.message
        assert pool.stats()["retry"] == 1


def test_slow_items_do_not_block_normal_ones():
    cfg = PoolConfig(
        workers=1, limits=RELAXED, slow_after_s=0.2, max_extra_workers=1, default_deadline_s=20.0
    )
    with WorkerPool(cfg) as pool:
        slow = pool.submit(item(SLOW_RESPONSE, "1", id="slow", deadline_s=15.0))
        time.sleep(0.1)
        normal = pool.submit_many([item(f"\\boxed{{{i}}}", str(i), id=str(i)) for i in range(5)])
        for f in normal:
            r = f.result(timeout=60)
            assert r.status is Status.OK, r
        assert not slow.done(), "normal items waited for the slow one"
        assert pool.stats()["slow"] >= 1
        assert slow.result(timeout=60).status in (Status.TIMEOUT, Status.WRONG)


def test_recycling_keeps_scoring():
    with WorkerPool(PoolConfig(workers=1, recycle_after=3, result_cache_size=0)) as pool:
        results = pool.score([item(f"\\boxed{{{i}}}", str(i)) for i in range(8)])
        assert all(r.status is Status.OK for r in results)
        assert pool.stats()["recycle"] >= 2


def test_queue_full_then_recovery():
    with WorkerPool(PoolConfig(workers=1, max_queue_items=4, result_cache_size=0)) as pool:
        items = [item(f"\\boxed{{{i}}}", str(i)) for i in range(10)]
        with pytest.raises(QueueFull) as e:
            pool.submit_many(items, block=False)
        assert e.value.free == 4 and e.value.retry_after_s > 0
        assert pool.queue_depth() == 0  # all-or-nothing
        results = pool.score(items)  # blocking submission waits for room
        assert all(r.status is Status.OK for r in results)


def test_workers_run_under_the_memory_cap():
    with WorkerPool(PoolConfig(workers=1, memory_limit_mb=512)) as pool:
        (pid,) = pool.worker_pids()
        with open(f"/proc/{pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max address space"))
        assert line.split()[3] == str(512 * 1024 * 1024), line
        (ok,) = pool.score([item("\\boxed{5}", "5")])
        assert ok.status is Status.OK


def test_closed_pool_refuses():
    pool = WorkerPool(PoolConfig(workers=1))
    pool.close()
    with pytest.raises(PoolClosed):
        pool.submit(item("\\boxed{1}", "1"))
    pool.close()  # idempotent


def test_slot_sees_the_pool_only_through_slot_host():
    """``server.supervisor`` does not import ``server.pool``, and the pool has every method of
    the protocol the slots call (a rename on one side fails here, not in a worker thread)."""
    code = "import sys, server.supervisor; print('server.pool' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    wanted = {n for n in vars(SlotHost) if not n.startswith("_")}
    assert "next_task" in wanted and "finish" in wanted
    assert {n for n in wanted if not hasattr(WorkerPool, n) and n != "config"} == set()
