"""The supervisor side of one worker: the process handle and the thread that drives it.

Split from ``server.pool`` (which owns the queue, caches and slot bookkeeping). A ``Slot`` is
one supervisor thread plus its ``Worker`` process; it takes tasks from the pool, enforces the
hard deadline, detects slow items and worker deaths, and reports back through the pool.

A slot sees its pool only through ``SlotHost``, a small protocol the pool implements, so this
module never imports ``server.pool`` and the pool's own state stays private to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from server.config import PoolConfig
from server.types import ScoreItem, Status, Verdict
from server.worker import MAIN_REIMPORT_EXIT, main_reimport_error, worker_main

log = logging.getLogger("server.pool")

HARD_GRACE_S = 0.1
"""How long past an item's budget the supervisor waits for the worker's own soft timeout."""

IDLE_CHECK_S = 0.5
"""How often an idle supervisor thread checks that its worker is still alive."""


class Idle:
    """Marker returned by the pool to an idle slot (see ``SlotHost.next_task``)."""


IDLE = Idle()


@dataclass
class Task:
    item: ScoreItem
    future: Future
    submitted: float  # time.monotonic()
    expires_at: float | None  # absolute monotonic deadline of the caller (RPC), if any
    cache_key: tuple | None
    attempts: int = 0
    stages: dict[str, float] = field(default_factory=dict)


class SlotHost(Protocol):
    """What a ``Slot`` needs from the pool that owns it (``server.pool.WorkerPool``).

    Every method but ``config`` may be called from any slot's thread; the pool locks.
    """

    @property
    def config(self) -> PoolConfig:
        """The pool's settings (deadlines, slow threshold, recycling)."""
        ...

    def new_worker(self) -> Worker:
        """Start one worker process; raises when it cannot start."""
        ...

    def next_task(self, slot: Slot) -> Task | None | Idle:
        """The next task for ``slot``; ``None`` when the pool closes, ``IDLE`` now and then."""
        ...

    def next_task_id(self) -> int:
        """A fresh id to pair a task with its worker's answer."""
        ...

    def finish(self, task: Task, verdict: Verdict) -> None:
        """Resolve ``task`` with ``verdict`` and release its queue place."""
        ...

    def retry(self, task: Task) -> None:
        """Put ``task`` back at the front of the queue (its worker died on it)."""
        ...

    def record_item_time(self, seconds: float) -> None:
        """How long a worker took on one item (feeds the back-off hint)."""
        ...

    def count(self, event: str) -> None:
        """Count a worker event (``respawn``, ``kill_timeout``, ``died``, ``recycle``)."""
        ...

    def mark_slow(self, slot: Slot) -> None:
        """``slot``'s item went slow: set the slot aside and maybe start a stand-in."""
        ...

    def slow_done(self, slot: Slot) -> bool:
        """``slot``'s slow item ended; True when the slot should retire."""
        ...

    def slot_exit(self, slot: Slot) -> None:
        """``slot``'s thread is ending; the pool forgets it (and replaces it if needed)."""
        ...


class Worker:
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
        try:
            tag, _pid = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self.kill()
            if code == MAIN_REIMPORT_EXIT:
                raise main_reimport_error() from None
            raise RuntimeError(
                f"worker exited with status {code} before it was ready (see its stderr)"
            ) from None
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


class Slot:
    """A supervisor thread and the worker it drives."""

    def __init__(self, pool: SlotHost, worker: Worker | None) -> None:
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
                self.worker = self.pool.new_worker()
                self.pool.count("respawn")
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
                task = pool.next_task(self)
                if task is None:
                    break
                if task is IDLE:
                    self._ensure_worker()
                    continue
                try:
                    self._ensure_worker()
                except RuntimeError as e:
                    pool.finish(task, Verdict(Status.INTERNAL, message=str(e)))
                    continue
                try:
                    if self._score(task):
                        break
                except Exception as e:  # a supervisor bug must not lose the item
                    log.exception("supervisor error while scoring an item")
                    if self.worker is not None:
                        self.worker.kill()
                        self.worker = None
                    if not task.future.done():
                        pool.finish(
                            task, Verdict(Status.INTERNAL, message=f"supervisor error: {e!r}")
                        )
                # Replace a worker lost on that item now, not when the next item arrives, so
                # health reports SERVING again as soon as possible.
                self._ensure_worker()
        except Exception:
            log.exception("supervisor thread failed")
        finally:
            if self.worker is not None:
                self.worker.stop()
            pool.slot_exit(self)

    def _score(self, task: Task) -> bool:
        """Run one task on this slot's worker; returns True when the slot should retire."""
        pool, cfg = self.pool, self.pool.config
        now = time.monotonic()
        task.stages["queue"] = (now - task.submitted) * 1e3
        budget = min(task.item.deadline_s or cfg.default_deadline_s, cfg.max_deadline_s)
        if task.expires_at is not None:
            budget = min(budget, task.expires_at - now)
            if budget <= 0:
                pool.finish(
                    task,
                    Verdict(
                        Status.TIMEOUT,
                        message="the caller's deadline passed before verification started",
                    ),
                )
                return False
        worker = self.worker
        assert worker is not None
        task_id = pool.next_task_id()
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
                    pool.count("kill_timeout")
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
                    pool.mark_slow(self)
        except (EOFError, OSError, BrokenPipeError) as e:
            worker.proc.join(1)  # reap it, so its real exit code is known
            code = worker.proc.exitcode
            worker.kill()
            pool.count("died")
            if task.attempts == 0:
                task.attempts += 1
                log.warning("worker %s died (exit %s, %s); retrying its item", worker.pid, code, e)
                pool.retry(task)
                return self._after_slow(went_slow)
            verdict = Verdict(
                Status.INTERNAL,
                message=f"the verify worker died twice on this item (last exit code {code})",
            )
        pool.record_item_time(time.monotonic() - started)
        worker.items += 1
        if worker.alive() and worker.items >= cfg.recycle_after:
            worker.stop()
            pool.count("recycle")
        pool.finish(task, verdict)
        return self._after_slow(went_slow)

    def _after_slow(self, went_slow: bool) -> bool:
        return went_slow and self.pool.slow_done(self)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of process ``pid`` from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None
