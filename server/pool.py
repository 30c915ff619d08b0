"""``WorkerPool``: supervised math-verify worker processes, usable with or without gRPC.

One supervisor thread per worker ("slot", ``server.supervisor``) takes items from a bounded
queue, sends each to its worker over a pipe and waits for the verdict with a hard deadline:

* **Deadline.** The worker arms a soft timer for the item's budget; if it has not answered
  ``HARD_GRACE_S`` after the budget, the supervisor SIGKILLs it, the item becomes TIMEOUT and
  a fresh worker is forked. Other items are unaffected.
* **Slow items never hold every worker.** An item that has used ``slow_after_s`` of worker
  CPU time sets its slot aside and a stand-in worker starts (up to ``max_extra_workers``), so normal items
  keep flowing at full width; when the slow item ends, its slot retires if the pool is full.
* **No item is lost.** A worker that dies for any reason (OOM, kill -9, crash) has its item
  retried once on a fresh worker; a second death reports INTERNAL.
* **Bounded.** ``max_queue_items`` caps queued + running items; non-blocking submits beyond it
  raise ``QueueFull`` (the gRPC layer turns that into RESOURCE_EXHAUSTED).
* Workers are capped with RLIMIT_AS and recycled after ``recycle_after`` items.
* Guards (``server.guards``) and the result cache run here, before queueing: refused or
  cached items cost no IPC.

Workers are forked from multiprocessing's fork server (see ``server.worker``), which this
module starts when the first pool is created -- create pools before any gRPC server. Like any
spawn/forkserver code, a script that creates a pool needs the ``if __name__ == "__main__":``
guard; without it the pool raises ``MainModuleError`` saying so.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from server import guards
from server.config import PoolConfig
from server.rewards import make_result
from server.supervisor import IDLE, IDLE_CHECK_S, Idle, Slot, Task, Worker
from server.types import ScoreItem, ScoreResult, Status, Verdict
from server.worker import PRELOAD, MainModuleError, check_main_module, exit_if_reimporting_main

log = logging.getLogger(__name__)

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
        exit_if_reimporting_main()  # an unguarded script re-imported in a worker: see there
        check_main_module()
        self.config = config or PoolConfig()
        self._events: PoolEvents = events or NullEvents()
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._cond = threading.Condition()
        self._queue: collections.deque[Task] = collections.deque()
        self._pending = 0  # queued + running
        self._closing = False
        self._slots: list[Slot] = []
        self._normal = 0  # slots not set aside by a slow item
        self._ids = itertools.count()
        self._cache: collections.OrderedDict[tuple, Verdict] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._stats = collections.Counter()
        self._item_times: collections.deque[float] = collections.deque(maxlen=256)
        # Start every worker now, in parallel, and wait for all: they must exist before a gRPC
        # server does, and a pool that cannot start should fail here, loudly.
        workers: list[Worker | BaseException] = [None] * self.config.workers  # type: ignore[list-item]

        def start(i: int) -> None:
            try:
                workers[i] = self.new_worker()
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
                if isinstance(w, Worker):
                    w.kill()
            guard = next((e for e in errors if isinstance(e, MainModuleError)), None)
            if guard is not None:
                raise guard  # one message that says what to change, not a wrapped one
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
        tasks: list[Task] = []
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
                    Task(item, fut, now, expires_at, key, stages={"guard": guard_ms}), cached, True
                )
                continue
            tasks.append(Task(item, fut, now, expires_at, key, stages={"guard": guard_ms}))
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
            self.finish(task, Verdict(Status.INTERNAL, message="the worker pool was closed"))
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

    def _enqueue(self, tasks: list[Task], block: bool) -> None:
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

    def _add_slot(self, worker: Worker | None) -> Slot:
        slot = Slot(self, worker)
        self._slots.append(slot)
        self._normal += 1
        slot.thread.start()
        return slot

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

    def _resolve_verdict(self, task: Task, verdict: Verdict, cached: bool) -> None:
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

    # ------------------------------------------------------------------ for the slots
    # ``server.supervisor.SlotHost``: called by the supervisor threads, not by users.

    def new_worker(self) -> Worker:
        """Start one worker process (raises when it cannot start)."""
        return Worker(self._ctx, self.config)

    def next_task_id(self) -> int:
        """A fresh id to pair a task with its worker's answer."""
        return next(self._ids)

    def next_task(self, slot: Slot) -> Task | None | Idle:
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

    def retry(self, task: Task) -> None:
        """Count a retry and put ``task`` back at the front of the queue."""
        self._stats["retry"] += 1
        with self._cond:
            self._queue.appendleft(task)
            self._cond.notify()

    def record_item_time(self, seconds: float) -> None:
        """How long a worker took on one item (``retry_after_s`` averages the last ones)."""
        self._item_times.append(seconds)

    def mark_slow(self, slot: Slot) -> None:
        """``slot``'s item went slow: set it aside and start a stand-in if there is room."""
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

    def slow_done(self, slot: Slot) -> bool:
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

    def slot_exit(self, slot: Slot) -> None:
        """``slot``'s thread is ending: forget it, and replace it while the pool runs."""
        with self._cond:
            if slot in self._slots:
                self._slots.remove(slot)
                if not slot.slow:
                    self._normal -= 1
                # A slot that died (it could not fork a worker) is replaced, so the pool never
                # silently shrinks to nothing while items wait; the new slot retries with back-off.
                if not self._closing and self._normal < self.config.workers:
                    self.count("respawn_slot")
                    self._add_slot(None)
            self._cond.notify_all()

    def count(self, event: str) -> None:
        """Count a worker event and pass it to the event receiver."""
        self._stats[event] += 1
        self._events.on_worker(event)

    def finish(self, task: Task, verdict: Verdict) -> None:
        """Resolve a task that went through the queue, releasing its queue place."""
        if verdict.stages_ms:
            self._events.on_cache("gold", verdict.gold_cache_hit)
        self._cache_put(task.cache_key, verdict)
        self._resolve_verdict(task, verdict, False)
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()


def default_workers() -> int:
    """A sensible worker count: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
