"""``ProcessRolloutSource``: the learner's side of the rollout worker process.

It implements both halves of the rollout / learner boundary of ``trainer.types``:
``RolloutSource`` (``next_batch``) and ``WeightPublisher`` (``publish``). It starts the
worker (``trainer.rollout.worker.worker_main``) in a spawned process, supervises it
(restarts it when it crashes, at most ``max_restarts`` times, from the latest published
weights), and stops it and every process it started on ``close()``.

Typical use by a learner::

    source = ProcessRolloutSource(RolloutWorkerConfig(engine=EngineConfig(model_dir=...)))
    try:
        for step in range(steps):
            batch = source.next_batch(timeout_s=1800)   # made by policy >= step - S
            ... train on batch ...
            source.publish(model.state_dict(), version=step + 1)
    finally:
        source.close()

Weight bus. Instead of ``publish``, the weights can come by broadcast from a sender on a
weight bus (``trainer.weight_bus``): ``join_bus(spec, rank)`` once, then
``receive_broadcast(v)`` per version. Both block until the bus's other members take part,
so the sender must join / send *concurrently* (another thread, process or Ray actor:
``trainer.rollout.ray_source`` does it for Ray). A worker restarted after a crash is off
the bus: it serves the newest weights it has a file of (the start weights) at their own
version, and the next ``receive_broadcast`` (or a ``next_batch`` it could not make)
raises ``WeightBusError``: rebuild the bus, every member joins again, and broadcast.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing as mp
import os
import queue
import signal
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.engines.base import SamplingConfig
from trainer.engines.weights import WeightFiles
from trainer.rollout.config import RolloutWorkerConfig, WorkerStart
from trainer.rollout.procs import POLL_S, read_pickle, write_pickle
from trainer.rollout.worker import worker_main
from trainer.types import Generation, RolloutBatch

if TYPE_CHECKING:
    from trainer.weight_bus import BusSpec


class RolloutWorkerError(RuntimeError):
    """The rollout worker failed (with its traceback when it had one)."""


class WeightBusError(RolloutWorkerError):
    """A weight-bus step failed on the rollout side, or the worker left the bus (it was
    restarted); the sender's side rebuilds the bus and broadcasts again."""


class RolloutTimeoutError(RolloutWorkerError, TimeoutError):
    """The rollout worker did not answer in time; the message names the phase (start-up,
    eval, rollout batch, weight sync), how long it waited and the setting that extends it."""


#: Slowest generation rate a ``generate`` request's deadline allows for (tokens/s): far
#: below the ~15 tokens/s of vLLM on an AVX2 CPU in bf16, the slowest layout measured.
MIN_TOKENS_PER_S = 2.0


def request_timeout(cfg: RolloutWorkerConfig, prompts: int, n: int, max_tokens: int) -> float:
    """Longest wait for a ``generate`` request: ``cfg.rollout.request_timeout_s`` plus the tokens it
    may produce at ``MIN_TOKENS_PER_S`` (a 200-problem eval must not time out on a slow
    CPU the way a weight sync should)."""
    return cfg.rollout.request_timeout_s + prompts * n * max_tokens / MIN_TOKENS_PER_S


@dataclass(frozen=True)
class _Wait:
    """A bounded wait on the worker: what it is for, and the setting that bounds it."""

    phase: str  # "start-up", "eval", "rollout batch", ...
    seconds: float
    setting: str  # e.g. "rollout.start_timeout_s"
    deadline: float  # time.monotonic() value

    @classmethod
    def start(cls, phase: str, seconds: float, setting: str) -> _Wait:
        return cls(phase, seconds, setting, time.monotonic() + seconds)


class _Proc:
    """One incarnation of the worker process and the queues that talk to it."""

    def __init__(self, ctx, cfg: RolloutWorkerConfig, start: WorkerStart) -> None:
        self.ctrl = ctx.Queue()
        self.events = ctx.Queue()
        # Bounded: the worker runs at most max_staleness batches ahead (one when synchronous).
        self.batches = ctx.Queue(maxsize=max(1, cfg.rollout.max_staleness))
        # Set by the worker while it generates (the learner may use every core otherwise).
        self.busy = ctx.Value("b", 0, lock=False)
        # Not a daemon: daemonic processes may not have children, and vLLM starts some.
        self.process = ctx.Process(
            target=worker_main,
            args=(cfg, start, self.ctrl, self.events, self.batches, self.busy),
            name="fipo-rollout-worker",
        )
        self.process.start()
        self.ready = False
        self.kind = ""
        self.note = ""  # why the engine is not the one asked for (auto -> hf fallback)

    def kill(self, grace_s: float) -> None:
        """Stop the process and its whole process group; release the queues."""
        proc = self.process
        if proc.pid is not None:
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    self.ctrl.put(("stop",))
                proc.join(grace_s)
            # The worker leads its own process group, which holds vLLM's processes too.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                proc.join(2.0)
                if sig == signal.SIGTERM:
                    _wait_group_gone(proc.pid, 5.0)
            if proc.is_alive():  # killed before it could lead its own process group
                proc.kill()
                proc.join(5.0)
        for q in (self.ctrl, self.events, self.batches):
            q.cancel_join_thread()  # never block interpreter exit on an unread queue
            q.close()


class _Resources:
    """What must be released even if the learner never calls ``close()``.

    Held by a ``weakref.finalize`` (garbage collection) and an ``atexit`` hook registered
    after ``multiprocessing``'s own, so it runs first: multiprocessing joins non-daemon
    children at exit, which would wait forever on a live worker.
    """

    def __init__(self, proc: _Proc, files: WeightFiles) -> None:
        self.proc = proc
        self.files = files
        self.done = False

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        self.proc.kill(grace_s=60.0)
        self.files.cleanup()


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


class ProcessRolloutSource:
    """Rollout worker process + bounded batch queue + weight publisher.

    Args:
        cfg: Worker settings (engine, task, verifier, group size, staleness...).
        initial_version: The learner's policy version now (``0`` for a new run, the
            checkpoint's version on resume). Batch ``b`` is made by a version
            ``>= initial_version + b - cfg.rollout.max_staleness``.
        initial_weights: State dict (HF names) to serve instead of the model directory's
            weights, e.g. a resumed checkpoint's; ``None`` serves the directory's.
        autostart: Start producing batches at once (``True``) or on the first
            ``next_batch`` (``False``, e.g. to use ``generate`` only).
        weights_version: The policy version of ``initial_weights`` when it is older than
            ``initial_version`` (a worker reopened on a weight bus): the worker serves it,
            making only batches its staleness bound allows, until a broadcast brings a
            newer one. ``None``: ``initial_version``.
        mp_context: Multiprocessing start method; ``spawn`` (vLLM and CUDA need it).

    Raises:
        ValueError: Invalid settings.
    """

    def __init__(
        self,
        cfg: RolloutWorkerConfig,
        *,
        initial_version: int = 0,
        initial_weights: Mapping[str, torch.Tensor] | None = None,
        autostart: bool = True,
        mp_context: str = "spawn",
        weights_version: int | None = None,
    ) -> None:
        if weights_version is not None and weights_version > initial_version:
            raise ValueError(
                f"weights_version {weights_version} > initial_version {initial_version}"
            )
        self.cfg = cfg
        self._ctx = mp.get_context(mp_context)
        self._files = WeightFiles()
        self._io_dir = self._files.dir / "io"
        self._io_dir.mkdir()
        self._base_version = int(initial_version)
        self._version = int(initial_version)  # newest version published (or initial)
        self._received = 0  # batches handed to the learner
        self._started = autostart
        self._restarts = 0
        self._closed = False
        self._req_ids = itertools.count()
        self._replies: dict[int, tuple[list[list[Generation]], int]] = {}  # req_id -> reply
        self._pongs: dict[int, dict] = {}
        # Version of the newest weights file (what a restarted worker starts from).
        self._file_version = int(initial_version if weights_version is None else weights_version)
        self._loaded_version = self._file_version  # what the worker serves
        self._bus_used = False  # a weight bus was joined (restarts then leave it)
        self._on_bus = False
        self._bus_replies: dict[int, tuple[int, str]] = {}  # req_id -> (version, error)
        self._bus_req: int | None = None  # the bus step in flight
        self._last_error = ""
        if initial_weights is not None:
            path = self._files.write(initial_weights, self._version, dtype=self._wire_dtype())
            self._files.set_current(path)
        self._pending: dict[int, tuple] = {}  # requests in flight: id -> control message
        self._proc = self._spawn()
        # Whatever the learner does (exception, sys.exit), the worker must not outlive it.
        self._res = _Resources(self._proc, self._files)
        self._finalizer = weakref.finalize(self, _Resources.release, self._res)
        self._finalizer.atexit = False
        atexit.register(self._res.release)

    # ------------------------------------------------------------------ public API

    @property
    def version(self) -> int:
        """The newest policy version the rollout side serves."""
        return self._version

    @property
    def restarts(self) -> int:
        """How many times the worker was restarted after a crash."""
        return self._restarts

    def worker_busy(self) -> bool:
        """Whether the worker is generating right now (a batch or a ``generate`` request);
        False while it waits for weights, for room in the queue, or for the start."""
        return bool(self._proc.busy.value)

    @property
    def worker_pid(self) -> int | None:
        """PID of the current worker process."""
        return self._proc.process.pid

    @property
    def engine_kind(self) -> str:
        """``"vllm"`` or ``"hf"`` once the worker is ready (``""`` before)."""
        return self._proc.kind

    @property
    def engine_note(self) -> str:
        """Empty, or one line on why ``kind="auto"`` fell back to HF ``generate``."""
        return self._proc.note

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the worker's engine has started.

        Raises:
            RolloutWorkerError: The worker could not start (e.g. bad model directory).
            RolloutTimeoutError: It did not start in ``timeout_s`` (default
                ``cfg.rollout.start_timeout_s``).
        """
        self._check_open()
        wait = _Wait.start(
            "start-up", timeout_s or self.cfg.rollout.start_timeout_s, "rollout.start_timeout_s"
        )
        while not self._proc.ready:
            self._pump(wait)

    def next_batch(self, timeout_s: float | None = None) -> RolloutBatch:
        """The next rollout batch, in order; blocks until the worker has made it.

        Raises:
            RolloutTimeoutError: No batch within ``timeout_s`` (``None``: wait indefinitely).
            RolloutWorkerError: The worker failed for good (traceback in the message).
            RuntimeError: Called again without ``publish`` in between when the staleness
                bound makes that batch impossible (it would wait forever).
        """
        self._check_open()
        allowed = self._version - self._base_version + self.cfg.rollout.max_staleness
        if self._received > allowed:
            raise RuntimeError(
                f"next_batch() for batch {self._received} needs policy version "
                f">= {self._base_version + self._received - self.cfg.rollout.max_staleness}, but the "
                f"newest published is {self._version} (max_staleness="
                f"{self.cfg.rollout.max_staleness}): call publish() after each training step"
            )
        if not self._started:
            self._started = True
            self._proc.ctrl.put(("start",))
        wait = None
        if timeout_s is not None:
            wait = _Wait.start(
                f"rollout batch {self._received}", timeout_s, "rollout.batch_timeout_s"
            )
        while True:
            try:
                index, path = self._proc.batches.get(timeout=POLL_S)
            except queue.Empty:
                self._pump(wait, block=False)
                self._check_bus_lost()
                continue
            if index != self._received:  # a pre-restart straggler; cannot happen in order
                Path(path).unlink(missing_ok=True)
                continue
            batch: RolloutBatch = read_pickle(path)
            self._received += 1
            return batch

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Make ``state_dict`` (HF names) the policy ``version`` of the rollout engine.

        Writes the weights to a RAM-backed safetensors file, has the worker load them
        into its engine, and returns once it serves them.

        Raises:
            ValueError: ``version`` is not newer than the current one.
            RolloutTimeoutError: The worker did not load them within
                ``cfg.rollout.request_timeout_s``.
            RolloutWorkerError: The worker failed for good.
        """
        self._check_open()
        if int(version) <= self._version:
            raise ValueError(
                f"publish(version={version}): versions must increase (current {self._version})"
            )
        path = self._files.write(state_dict, int(version), dtype=self._wire_dtype())
        self._files.set_current(path)  # also what a restarted worker loads
        self._version = self._file_version = int(version)
        self._proc.ctrl.put(("weights", str(path), self._version))
        wait = _Wait.start(
            f"weight sync (version {version})", self.cfg.rollout.request_timeout_s,
            "rollout.request_timeout_s",
        )  # fmt: skip
        while self._loaded_version < self._version:
            self._pump(wait)
        self._files.prune()  # the worker serves `path` now; older files are unused

    def join_bus(self, spec: BusSpec, rank: int, timeout_s: float | None = None) -> None:
        """Have the worker's engine join a weight bus as receiver ``rank`` (a vLLM engine
        over several GPUs takes ``rank``, ``rank + 1``, ...). Returns once it has, which
        needs every other member (the sender too) to join concurrently.

        Raises:
            WeightBusError: The engine could not join (the reason, e.g. a join timeout
                naming the bus's host:port and the missing ranks).
            RolloutTimeoutError: No answer within ``timeout_s`` (default: the bus's
                timeout plus ``rollout.request_timeout_s``).
        """
        self._check_open()
        timeout_s = timeout_s or spec.timeout_s + self.cfg.rollout.request_timeout_s
        self._bus_step(("join_bus", spec, int(rank)), "weight-bus join", timeout_s)
        self._bus_used = self._on_bus = True

    def receive_broadcast(self, version: int, timeout_s: float | None = None) -> None:
        """Have the engine receive the weights the bus's sender broadcasts as ``version``;
        returns once the worker serves them (acknowledged as ``publish`` is, so every batch
        made afterwards is stamped ``version``). The sender must be sending concurrently.
        ``version`` may equal the current one: a re-send after the bus was rebuilt.

        Raises:
            ValueError: ``version`` is older than the current one.
            WeightBusError: No bus joined, the worker was restarted (it left the bus), or
                the receive failed (the worker then serves no version until the next one).
            RolloutTimeoutError: No answer within ``timeout_s``.
        """
        self._check_open()
        if int(version) < self._version:
            raise ValueError(
                f"receive_broadcast(version={version}): older than the current {self._version}"
            )
        if not self._on_bus:
            raise WeightBusError(
                "the rollout worker is on no weight bus (never joined, or restarted since): "
                "rebuild the bus and join again"
            )
        self._version = int(version)
        timeout_s = timeout_s or self.cfg.rollout.request_timeout_s
        self._bus_step(
            ("receive", int(version)), f"weight-bus receive (version {version})", timeout_s
        )

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        timeout_s: float | None = None,
        phase: str = "generate request",
    ) -> tuple[list[list[Generation]], int]:
        """Sample with the worker's engine directly (eval, probes), between rollout rounds.

        Args:
            prompt_token_ids: Token-id prompts.
            n: Samples per prompt.
            sampling: Sampling settings.
            timeout_s: Longest wait; default ``cfg.rollout.request_timeout_s`` plus the tokens
                asked for (prompts x n x max_tokens) at ``MIN_TOKENS_PER_S``, so a big
                eval is not cut short on a slow machine.
            phase: What the request is for, named in a timeout's message (``"eval"``).

        Raises:
            RolloutTimeoutError: No answer in time.

        Returns:
            ``(generations, version)``: ``generations[i][j]`` as in ``Engine.generate``,
            and the policy version that produced them.
        """
        self._check_open()
        req_id = next(self._req_ids)
        path = write_pickle(
            ([list(map(int, p)) for p in prompt_token_ids], int(n), sampling),
            self._io_dir / f"request-{req_id}.pkl",
        )
        self._send_request(req_id, ("generate", req_id, str(path)))
        if timeout_s is None:
            timeout_s = request_timeout(self.cfg, len(prompt_token_ids), n, sampling.max_tokens)
            phase += f" ({len(prompt_token_ids)} prompts x {n} x {sampling.max_tokens} tokens)"
        wait = _Wait.start(phase, timeout_s, "rollout.request_timeout_s")
        while req_id not in self._replies:
            self._pump(wait)
        path.unlink(missing_ok=True)
        return self._replies.pop(req_id)

    def worker_state(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Ask the worker what it is doing; it answers when it next reads its messages.

        Returns:
            ``{"version", "next_batch", "waiting_for_version", "started"}``.
        """
        self._check_open()
        req_id = next(self._req_ids)
        self._send_request(req_id, ("ping", req_id))
        wait = _Wait.start(
            "state query",
            timeout_s or self.cfg.rollout.request_timeout_s,
            "rollout.request_timeout_s",
        )
        while req_id not in self._pongs:
            self._pump(wait)
        return self._pongs.pop(req_id)

    def close(self) -> None:
        """Stop the worker and every process it started; delete the weight files."""
        if self._closed:
            return
        self._closed = True
        self._res.release()
        atexit.unregister(self._res.release)

    def __enter__(self) -> ProcessRolloutSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _wire_dtype(self) -> str | None:
        # Ship floats in the engine's dtype: half the bytes for a bf16 engine, same result.
        return self.cfg.engine.resolved_dtype()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ProcessRolloutSource is closed")

    def _start_state(self) -> WorkerStart:
        current = self._files.current
        return WorkerStart(
            base_version=self._base_version,
            version=self._file_version,
            weights_path=str(current) if current is not None else None,
            next_batch=self._received,
            started=self._started,
            restarts=self._restarts,
            io_dir=str(self._io_dir),
        )

    def _bus_step(self, msg: tuple, phase: str, timeout_s: float) -> None:
        """Send a weight-bus step and wait for its answer. Not re-sent to a restarted
        worker (which is off the bus): ``_on_death`` answers it with an error."""
        req_id = next(self._req_ids)
        self._bus_req = req_id
        self._proc.ctrl.put((msg[0], req_id, *msg[1:]))
        wait = _Wait.start(phase, timeout_s, "rollout.request_timeout_s")
        try:
            while req_id not in self._bus_replies:
                self._pump(wait)
        finally:
            self._bus_req = None
        version, error = self._bus_replies.pop(req_id)
        self._loaded_version = version
        if error:
            self._on_bus = self._on_bus and msg[0] != "join_bus"
            raise WeightBusError(f"the rollout worker's {phase} failed:\n{error}")

    def _check_bus_lost(self) -> None:
        """A worker restarted off the bus cannot reach the version the next batch needs
        by itself: say so instead of waiting for a broadcast that cannot come."""
        needed = self._base_version + self._received - self.cfg.rollout.max_staleness
        if self._bus_used and not self._on_bus and self._loaded_version < needed:
            raise WeightBusError(
                f"the rollout worker was restarted and left the weight bus: it serves "
                f"version {self._loaded_version}, batch {self._received} needs >= {needed}; "
                "rebuild the bus and broadcast"
            )

    def _send_request(self, req_id: int, msg: tuple) -> None:
        self._pending[req_id] = msg  # re-sent to a restarted worker
        self._proc.ctrl.put(msg)

    def _spawn(self) -> _Proc:
        return _Proc(self._ctx, self.cfg, self._start_state())

    def _pump(self, wait: _Wait | None, block: bool = True) -> None:
        """Handle worker events for up to ``POLL_S``; restart a dead worker.

        Raises:
            RolloutTimeoutError: ``wait``'s deadline passed.
        """
        if wait is not None and time.monotonic() > wait.deadline:
            starting = "" if self._proc.ready else " (its engine was still starting)"
            raise RolloutTimeoutError(
                f"the rollout worker (pid {self.worker_pid}) did not finish its {wait.phase} "
                f"within {wait.seconds:.0f} s{starting}. On a slow or busy machine raise "
                f"{wait.setting}; the worker's own log may say more."
            )
        try:
            event = self._proc.events.get(timeout=POLL_S if block else 0.0)
        except queue.Empty:
            if not self._proc.process.is_alive():
                self._on_death()
            return
        kind = event[0]
        if kind == "ready":
            self._proc.ready, self._proc.kind, self._proc.note = True, event[2], event[3]
            self._loaded_version = max(self._loaded_version, int(event[1]))
        elif kind == "loaded":
            self._loaded_version = max(self._loaded_version, int(event[1]))
        elif kind == "bus":
            self._bus_replies[event[1]] = (int(event[2]), event[3])
        elif kind == "generated":
            self._pending.pop(event[1], None)
            self._replies[event[1]] = read_pickle(event[2])
        elif kind == "pong":
            self._pending.pop(event[1], None)
            self._pongs[event[1]] = event[2]
        elif kind == "fatal":
            self.close()
            raise RolloutWorkerError(f"the rollout worker could not start:\n{event[1]}")
        elif kind == "error":
            self._last_error = event[1]

    def _on_death(self) -> None:
        """Restart a crashed worker from the newest weights, or give up."""
        code = self._proc.process.exitcode
        reason = f"exit code {code}" + (f"\n{self._last_error}" if self._last_error else "")
        self._proc.kill(grace_s=0.0)
        if self._restarts >= self.cfg.max_restarts:
            self.close()
            raise RolloutWorkerError(
                f"the rollout worker died {self._restarts + 1} times (max_restarts="
                f"{self.cfg.max_restarts}); last: {reason}"
            )
        self._restarts += 1
        self._last_error = ""
        # Batch files the dead worker left behind are made again by the new one.
        for stale in self._io_dir.glob("batch-*"):
            stale.unlink(missing_ok=True)
        self._proc = self._spawn()
        self._res.proc = self._proc
        # The new worker serves the newest weights file from its start, so a publish() in
        # flight is complete; requests in flight died with the old one: send them again.
        # It is off the weight bus: a bus step in flight fails (the sender rebuilds it).
        self._loaded_version = self._file_version
        self._on_bus = False
        if self._bus_req is not None:
            self._bus_replies[self._bus_req] = (self._file_version, f"the worker died ({reason})")
        for msg in self._pending.values():
            self._proc.ctrl.put(msg)
