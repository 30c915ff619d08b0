"""``WorkerPool``: supervised math-verify worker processes, usable with or without gRPC.

One supervisor thread per worker ("slot") takes items from a bounded queue, sends each to
its worker over a pipe and waits for the verdict with a hard deadline:

* **Deadline.** The worker arms a soft timer for the item's budget; if it has not answered
  ``HARD_GRACE_S`` after the budget, the supervisor SIGKILLs it, the item becomes TIMEOUT and
  a fresh worker is forked. Other items are unaffected.
* **Slow items never hold every worker.** An item still running after ``slow_after_s`` sets
  its slot aside and a stand-in worker starts (up to ``max_extra_workers``), so normal items
  keep flowing at full width; when the slow item ends, its slot retires if the pool is full.
* **No item is lost.** A worker that dies for any reason (OOM, kill -9, crash) has its item
  retried once on a fresh worker; a second death reports INTERNAL.
* **Bounded.** ``max_queue_items`` caps queued + running items; non-blocking submits beyond it
  raise ``QueueFull`` (the gRPC layer turns that into RESOURCE_EXHAUSTED).
* Workers are capped with RLIMIT_AS and recycled after ``recycle_after`` items.
* Guards (``server.guards``) and the result cache run here, before queueing: refused or
  cached items cost no IPC.

Workers are forked from multiprocessing's fork server (see ``server.worker``), which this
module starts when the first pool is created -- create pools before any gRPC server.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from server import guards
from server.config import PoolConfig
from server.rewards import make_result
from server.types import ScoreItem, ScoreResult, Status
from server.verify import Verdict
from server.worker import PRELOAD, worker_main

log = logging.getLogger(__name__)

HARD_GRACE_S = 0.1
"""How long past an item's budget the supervisor waits for the worker's own soft timeout."""

IDLE_CHECK_S = 0.5
"""How often an idle supervisor thread checks that its worker is still alive."""


class _Idle:
    pass


IDLE = _Idle()

_CACHEABLE = frozenset({Status.OK, Status.WRONG, Status.NO_ANSWER, Status.GOLD_UNPARSABLE})


class QueueFull(Exception):
    """The pool's queue cannot take the items now; retry after ``retry_after_s``."""

    def __init__(self, wanted: int, free: int, retry_after_s: float) -> None:
        super().__init__(
            f"queue full: {wanted} item(s) submitted, room for {free}; retry in {retry_after_s:.2f} s"
        )
        self.wanted = wanted
        self.free = free
        self.retry_after_s = retry_after_s


class PoolClosed(Exception):
    """The pool is closed (or closing) and takes no new items."""


class PoolEvents(Protocol):
    """Receives the pool's events (the server turns them into Prometheus metrics)."""

    def on_result(self, result: ScoreResult, stages_ms: dict[str, float], cached: bool) -> None:
        """A result is ready; ``stages_ms`` holds queue/guard/gold_parse/pred_parse/compare."""
        ...

    def on_cache(self, cache: str, hit: bool) -> None:
        """A cache lookup: ``cache`` is ``"result"`` or ``"gold"``."""
        ...

    def on_worker(self, event: str) -> None:
        """A worker event: ``start``, ``respawn``, ``kill_timeout``, ``died``, ``recycle``,
        ``slow``, ``retire``."""
        ...


class NullEvents:
    """Discards events."""

    def on_result(self, result: ScoreResult, stages_ms: dict[str, float], cached: bool) -> None:
        pass

    def on_cache(self, cache: str, hit: bool) -> None:
        pass

    def on_worker(self, event: str) -> None:
        pass


@dataclass
class _Task:
    item: ScoreItem
    future: Future
    submitted: float  # time.monotonic()
    expires_at: float | None  # absolute monotonic deadline of the caller (RPC), if any
    cache_key: tuple | None
    attempts: int = 0
    stages: dict[str, float] = field(default_factory=dict)


class _Worker:
    """One worker process and the supervisor's end of its pipe."""

    def __init__(self, ctx, config: PoolConfig) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, config.verifier, config.memory_limit_mb),
            daemon=True,
            name="fipo-verify-worker",
        )
        self.proc.start()
        child.close()
        self.items = 0
        if not self.conn.poll(config.start_timeout_s):
            self.kill()
            raise RuntimeError(f"worker did not start within {config.start_timeout_s} s")
        tag, _pid = self.conn.recv()
        if tag != "ready":
            self.kill()
            raise RuntimeError(f"worker sent {tag!r} instead of 'ready'")

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        finally:
            self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.conn.send(None)
        self.proc.join(2)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class WorkerPool:
    """A supervised pool of math-verify worker processes; implements ``server.types.Scorer``.

    Args:
        config: Pool settings (workers, deadlines, limits, verifier).
        events: Receiver of results and worker events (metrics); none by default.

    Example:
        >>> with WorkerPool(PoolConfig(workers=2)) as pool:
        ...     pool.score([ScoreItem("a", "so \\\\boxed{4}", ("4",))])[0].correct
        True
    """

    def __init__(self, config: PoolConfig | None = None, events: PoolEvents | None = None) -> None:
        self.config = config or PoolConfig()
        self._events: PoolEvents = events or NullEvents()
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Task] = collections.deque()
        self._pending = 0  # queued + running
        self._closing = False
        self._slots: list[_Slot] = []
        self._normal = 0  # slots not set aside by a slow item
        self._ids = itertools.count()
        self._cache: collections.OrderedDict[tuple, Verdict] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._stats = collections.Counter()
        self._item_times: collections.deque[float] = collections.deque(maxlen=256)
        # Start every worker now, in parallel, and wait for all: they must exist before a gRPC
        # server does, and a pool that cannot start should fail here, loudly.
        workers: list[_Worker | BaseException] = [None] * self.config.workers  # type: ignore[list-item]

        def start(i: int) -> None:
            try:
                workers[i] = _Worker(self._ctx, self.config)
            except BaseException as e:  # noqa: BLE001 -- re-raised below
                workers[i] = e

        threads = [threading.Thread(target=start, args=(i,)) for i in range(self.config.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [w for w in workers if isinstance(w, BaseException)]
        if errors:
            for w in workers:
                if isinstance(w, _Worker):
                    w.kill()
            raise RuntimeError(f"could not start verify workers: {errors[0]}") from errors[0]
        with self._cond:
            for w in workers:
                self._add_slot(w)  # type: ignore[arg-type]
        for _ in workers:
            self._events.on_worker("start")

    # ------------------------------------------------------------------ public API

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Score ``items`` (blocking while the queue is full); results in the same order."""
        futures = self.submit_many(items, block=True)
        return [f.result() for f in futures]

    def submit(
        self, item: ScoreItem, *, block: bool = True, expires_at: float | None = None
    ) -> Future:
        """Queue one item; the future resolves to its ``ScoreResult`` (never to an exception).

        Args:
            item: The item.
            block: Wait for room in the queue instead of raising ``QueueFull``.
            expires_at: Absolute ``time.monotonic()`` deadline of the caller; an item still
                queued then returns TIMEOUT without running, and a running one gets at most
                the time left.

        Raises:
            QueueFull: ``block`` is False and the queue is full.
            PoolClosed: The pool is closing.
        """
        return self.submit_many([item], block=block, expires_at=expires_at)[0]

    def submit_many(
        self, items: Sequence[ScoreItem], *, block: bool = True, expires_at: float | None = None
    ) -> list[Future]:
        """Queue a batch atomically: either all items are accepted or (non-blocking) none.

        Same arguments and errors as ``submit``; returns one future per item, in order.
        """
        if self._closing:
            raise PoolClosed("the worker pool is closed")
        now = time.monotonic()
        futures: list[Future] = []
        tasks: list[_Task] = []
        for item in items:
            fut: Future = Future()
            futures.append(fut)
            t0 = time.perf_counter()
            rejection = guards.check_item(item, self.config.limits)
            guard_ms = (time.perf_counter() - t0) * 1e3
            if rejection:
                status, message = rejection
                self._resolve(
                    fut, make_result(item, status, message=message), {"guard": guard_ms}, False
                )
                continue
            key = self._cache_key(item)
            cached = self._cache_get(key)
            if cached is not None:
                self._resolve_verdict(
                    _Task(item, fut, now, expires_at, key, stages={"guard": guard_ms}), cached, True
                )
                continue
            tasks.append(_Task(item, fut, now, expires_at, key, stages={"guard": guard_ms}))
        if tasks:
            self._enqueue(tasks, block)
        return futures

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the pool: optionally finish queued items, then stop every worker.

        Args:
            drain: Score what is queued first; otherwise queued items return INTERNAL.
            timeout: Most seconds to wait for the queue to drain.
        """
        with self._cond:
            if self._closing and not self._slots:
                return
            self._closing = True
            if drain:
                end = None if timeout is None else time.monotonic() + timeout
                while self._pending and self._slots:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left if left is not None else 1.0)
            leftovers = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            slots = list(self._slots)
        for task in leftovers:
            self._finish(task, Verdict(Status.INTERNAL, message="the worker pool was closed"))
        for slot in slots:
            slot.thread.join(timeout=30)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def live_workers(self) -> int:
        """Number of worker processes alive now."""
        with self._cond:
            return sum(1 for s in self._slots if s.worker is not None and s.worker.alive())

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for tests and diagnostics)."""
        with self._cond:
            return [s.worker.pid for s in self._slots if s.worker is not None and s.worker.alive()]

    def queue_depth(self) -> int:
        """Items queued or running."""
        return self._pending

    def stats(self) -> dict[str, int]:
        """Counters: kills, deaths, respawns, recycles, slow, retries, cache hits/misses."""
        return dict(self._stats)

    def retry_after_s(self) -> float:
        """A back-off hint: about how long the current queue takes to drain by a tenth."""
        per_item = (sum(self._item_times) / len(self._item_times)) if self._item_times else 0.005
        return min(5.0, max(0.05, per_item * self._pending / 10 / max(1, self.config.workers)))

    # ------------------------------------------------------------------ internals

    def _cache_key(self, item: ScoreItem) -> tuple | None:
        if not self.config.result_cache_size:
            return None
        return (item.golds, item.response, item.answer_format, self.config.verifier.cache_key())

    def _cache_get(self, key: tuple | None) -> Verdict | None:
        if key is None:
            return None
        with self._cache_lock:
            v = self._cache.get(key)
            if v is not None:
                self._cache.move_to_end(key)
        self._stats["result_cache_hit" if v is not None else "result_cache_miss"] += 1
        self._events.on_cache("result", v is not None)
        return v

    def _cache_put(self, key: tuple | None, verdict: Verdict) -> None:
        if key is None or verdict.status not in _CACHEABLE:
            return
        with self._cache_lock:
            self._cache[key] = verdict
            if len(self._cache) > self.config.result_cache_size:
                self._cache.popitem(last=False)

    def _enqueue(self, tasks: list[_Task], block: bool) -> None:
        n = len(tasks)
        cap = self.config.max_queue_items
        with self._cond:
            if not block and self._pending + n > cap:
                raise QueueFull(n, max(0, cap - self._pending), self.retry_after_s())
            i = 0
            while i < n:
                while self._pending >= cap and not self._closing:
                    self._cond.wait(1.0)
                if self._closing:
                    break
                take = min(n - i, cap - self._pending)
                self._queue.extend(tasks[i : i + take])
                self._pending += take
                i += take
                self._cond.notify_all()
        for task in tasks[i:]:
            self._resolve(
                task.future,
                make_result(task.item, Status.INTERNAL, message="the worker pool was closed"),
                {},
                False,
            )

    def _add_slot(self, worker: _Worker | None) -> _Slot:
        slot = _Slot(self, worker)
        self._slots.append(slot)
        self._normal += 1
        slot.thread.start()
        return slot

    def _next_task(self, slot: _Slot) -> _Task | None | _Idle:
        """The next live task; ``None`` when closing; ``IDLE`` now and then to let an idle
        slot notice that its worker died (e.g. killed from outside) and replace it."""
        with self._cond:
            while True:
                while self._queue:
                    task = self._queue.popleft()
                    if task.future.cancelled():  # the caller gave up (e.g. RPC cancelled)
                        self._pending -= 1
                        self._cond.notify_all()
                        continue
                    return task
                if self._closing:
                    return None
                if not self._cond.wait(IDLE_CHECK_S):
                    return IDLE

    def _requeue_front(self, task: _Task) -> None:
        with self._cond:
            self._queue.appendleft(task)
            self._cond.notify()

    def _mark_slow(self, slot: _Slot) -> None:
        with self._cond:
            slot.slow = True
            self._normal -= 1
            self._stats["slow"] += 1
            if (
                not self._closing
                and len(self._slots) < self.config.workers + self.config.max_extra_workers
            ):
                self._add_slot(None)  # the stand-in forks its worker in its own thread
        self._events.on_worker("slow")

    def _slow_done(self, slot: _Slot) -> bool:
        """A slow item ended: returns True when the slot should retire (pool at full width)."""
        with self._cond:
            slot.slow = False
            if self._normal < self.config.workers and not self._closing:
                self._normal += 1
                return False
            self._slots.remove(slot)
            self._cond.notify_all()
        self._events.on_worker("retire")
        return True

    def _slot_exit(self, slot: _Slot) -> None:
        with self._cond:
            if slot in self._slots:
                self._slots.remove(slot)
                if not slot.slow:
                    self._normal -= 1
            self._cond.notify_all()

    def _count(self, event: str) -> None:
        self._stats[event] += 1
        self._events.on_worker(event)

    def _resolve(
        self, fut: Future, result: ScoreResult, stages: dict[str, float], cached: bool
    ) -> None:
        if not fut.set_running_or_notify_cancel():
            return  # the caller cancelled it
        fut.set_result(result)
        try:
            self._events.on_result(result, stages, cached)
        except Exception:  # metrics must never break scoring
            log.exception("pool event handler failed")

    def _resolve_verdict(self, task: _Task, verdict: Verdict, cached: bool) -> None:
        latency_ms = (time.monotonic() - task.submitted) * 1e3
        flags = verdict.flags + (("cached",) if cached else ())
        result = make_result(
            task.item,
            verdict.status,
            prediction=verdict.prediction,
            gold=verdict.gold,
            message=verdict.message,
            flags=flags,
            latency_ms=latency_ms,
        )
        self._resolve(task.future, result, {**task.stages, **verdict.stages_ms}, cached)

    def _finish(self, task: _Task, verdict: Verdict) -> None:
        """Resolve a task that went through the queue, releasing its queue place."""
        if verdict.stages_ms:
            self._events.on_cache("gold", verdict.gold_cache_hit)
        self._cache_put(task.cache_key, verdict)
        self._resolve_verdict(task, verdict, False)
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()


class _Slot:
    """A supervisor thread and the worker it drives."""

    def __init__(self, pool: WorkerPool, worker: _Worker | None) -> None:
        self.pool = pool
        self.worker = worker
        self.slow = False
        self.thread = threading.Thread(target=self._run, name="fipo-verify-slot", daemon=True)

    def _ensure_worker(self) -> None:
        if self.worker is not None and self.worker.alive():
            return
        if self.worker is not None:
            self.worker.kill()
        self.worker = None
        # Retry a failed fork a few times (e.g. a transient EAGAIN under memory pressure).
        for attempt in range(3):
            try:
                self.worker = _Worker(self.pool._ctx, self.pool.config)
                self.pool._count("respawn")
                return
            except Exception as e:
                log.error("worker start failed (attempt %d): %s", attempt + 1, e)
                time.sleep(0.5 * (attempt + 1))
        raise RuntimeError("could not start a verify worker")

    def _run(self) -> None:
        pool = self.pool
        try:
            if self.worker is None:
                self._ensure_worker()
            while True:
                task = pool._next_task(self)
                if task is None:
                    break
                if task is IDLE:
                    self._ensure_worker()
                    continue
                try:
                    self._ensure_worker()
                except RuntimeError as e:
                    pool._finish(task, Verdict(Status.INTERNAL, message=str(e)))
                    continue
                if self._score(task):
                    break
                # Replace a worker lost on that item now, not when the next item arrives, so
                # health reports SERVING again as soon as possible.
                self._ensure_worker()
        except Exception:
            log.exception("supervisor thread failed")
        finally:
            if self.worker is not None:
                self.worker.stop()
            pool._slot_exit(self)

    def _score(self, task: _Task) -> bool:
        """Run one task on this slot's worker; returns True when the slot should retire."""
        pool, cfg = self.pool, self.pool.config
        now = time.monotonic()
        task.stages["queue"] = (now - task.submitted) * 1e3
        budget = min(task.item.deadline_s or cfg.default_deadline_s, cfg.max_deadline_s)
        if task.expires_at is not None:
            budget = min(budget, task.expires_at - now)
            if budget <= 0:
                pool._finish(
                    task,
                    Verdict(
                        Status.TIMEOUT,
                        message="the caller's deadline passed before verification started",
                    ),
                )
                return False
        worker = self.worker
        assert worker is not None
        task_id = next(pool._ids)
        started = time.monotonic()
        hard_deadline = started + budget + HARD_GRACE_S
        # "Slow" is judged on the worker's CPU time, not wall time: on a loaded machine an item
        # can take long without being expensive, and setting its worker aside would only add
        # worker churn.
        cpu0 = _cpu_seconds(worker.pid)
        slow_at = started + cfg.slow_after_s
        went_slow = False
        try:
            worker.conn.send((task_id, task.item, budget))
            while True:
                now = time.monotonic()
                wake = hard_deadline if went_slow else min(slow_at, hard_deadline)
                if worker.conn.poll(max(0.0, wake - now)):
                    got_id, verdict = worker.conn.recv()
                    if got_id != task_id:
                        raise EOFError(f"worker answered task {got_id}, expected {task_id}")
                    break
                if time.monotonic() >= hard_deadline:
                    worker.kill()
                    pool._count("kill_timeout")
                    verdict = Verdict(
                        Status.TIMEOUT,
                        message=f"verification did not finish within {budget:.3f} s; worker stopped",
                    )
                    break
                if not went_slow:
                    used = (_cpu_seconds(worker.pid) - cpu0) if cpu0 is not None else None
                    if used is not None and used < cfg.slow_after_s:
                        slow_at = time.monotonic() + max(0.01, cfg.slow_after_s - used)
                        continue
                    went_slow = True
                    pool._mark_slow(self)
        except (EOFError, OSError, BrokenPipeError) as e:
            worker.proc.join(1)  # reap it, so its real exit code is known
            code = worker.proc.exitcode
            worker.kill()
            pool._count("died")
            if task.attempts == 0:
                task.attempts += 1
                pool._stats["retry"] += 1
                log.warning("worker %s died (exit %s, %s); retrying its item", worker.pid, code, e)
                pool._requeue_front(task)
                return self._after_slow(went_slow)
            verdict = Verdict(
                Status.INTERNAL,
                message=f"the verify worker died twice on this item (last exit code {code})",
            )
        pool._item_times.append(time.monotonic() - started)
        worker.items += 1
        if worker.alive() and worker.items >= cfg.recycle_after:
            worker.stop()
            pool._count("recycle")
        pool._finish(task, verdict)
        return self._after_slow(went_slow)

    def _after_slow(self, went_slow: bool) -> bool:
        return went_slow and self.pool._slow_done(self)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of process ``pid`` from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def default_workers() -> int:
    """A sensible worker count: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
