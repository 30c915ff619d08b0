"""``RayRolloutSource``: N rollout workers as Ray actors, one learner-side interface.

The same ``RolloutSource`` / ``WeightPublisher`` as ``ProcessRolloutSource`` (and the same
extras: ``wait_ready``, ``generate``, ``worker_state``, ``worker_busy``, ``version``,
``restarts``, ``engine_kind``, ``engine_note``, ``close``), so the driver uses either.
Ray only decides who starts the workers and where; each actor owns one unchanged
``ProcessRolloutSource``, so the engine / env / verifier worker code is today's::

    learner (driver)                 Ray actor i (placement-group bundle i)
    ----------------                 --------------------------------------
    next_batch()   -- remote call -> ProcessRolloutSource.next_batch()   (share_i groups)
    publish(sd, v) -- ray.put once -> ProcessRolloutSource.publish(sd, v) (/dev/shm of its node)

- **Batches.** ``rollout.prompts_per_step`` is split as evenly as possible over the
  workers (:func:`split_evenly`); worker ``i`` draws its own problem stream
  (:func:`worker_seed`: worker 0 keeps ``cfg.seed``, so one worker draws what
  ``ProcessRolloutSource`` draws). ``next_batch`` asks every worker for its share and
  returns the union, in worker order, each group keeping the policy version that made
  it (``last_batch_workers`` says which worker made which group).
- **Staleness.** Every worker runs with the same ``max_staleness`` and counts batches
  exactly as the learner does, so the bound holds per worker. A reopened worker counts
  from the newest published version: exact when the learner publishes once per batch
  before it asks for the next (the trainer's loop).
- **Weights.** ``publish`` puts the state dict into Ray's object store once (CPU, in the
  engine's dtype); every actor reads it (shared memory on its own node, a transfer
  across nodes) and hands it to its source's ``publish``, which writes its node's
  ``/dev/shm`` file and has the engine load it. ``publish`` returns once every engine
  serves the new version.
- **Weights by broadcast** (``sender`` given: ``cluster.weight_sync=broadcast``).
  ``broadcast(v)`` publishes the sender's (the learner's rank 0) current weights over a
  weight bus (``trainer.weight_bus``: gloo on CPU, NCCL on GPU) instead: rank 0 sends and
  every worker receives, launched together and awaited together; nothing goes through
  the driver or the object store. The bus is built at the first broadcast (worker ``i``
  is rank ``1 + i``) and rebuilt (new port, every member joins again) after any failure
  on it. A worker reopened after its actor died starts from the last object-store copy
  (the start weights, at their own version: it makes only batches the staleness bound
  allows with them), and the bus is rebuilt and the current version broadcast again at
  once, so it serves the newest version before it is asked for anything else.
- **Faults.** Actors are created with ``max_restarts``: when one dies (its process killed,
  its node lost) Ray restarts it in the same bundle and the source reopens it with the
  newest weights and version, then asks it again for the share it was making. Every
  share asked again is counted (``reissued_prompts``, ``metrics()``); a worker process
  that its actor's own ``ProcessRolloutSource`` restarted counts the same way. After
  ``max_worker_failures`` failures in all, ``RolloutWorkerError``.

Ray is imported only when a ``RayRolloutSource`` is built: ``import trainer`` and
``make run`` never start or need it.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from trainer.engines.base import SamplingConfig
from trainer.rollout.config import RolloutWorkerConfig
from trainer.rollout.ray_actor import RolloutActor, WorkerLostError
from trainer.rollout.shards import merge_batches, split_evenly, worker_configs, worker_seed
from trainer.rollout.source import (
    RolloutTimeoutError,
    RolloutWorkerError,
    WeightBusError,
    request_timeout,
)
from trainer.types import Generation, RolloutBatch

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

    from trainer.weight_bus import BusSpec

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

#: How long ``close`` lets an actor stop its worker before Ray kills it.
CLOSE_GRACE_S = 60.0
#: How often a restarting actor is asked again whether it is back.
RESTART_POLL_S = 0.2


class BusSender(Protocol):
    """The sending side of a weight bus, as ``RayRolloutSource.broadcast`` drives it
    (``trainer.learner_group.RayLearnerGroup``: its rank 0). ``*_async`` return Ray
    object refs; ``bus_result`` awaits one: ``""``, or what failed on the bus (a dead
    sender raises the sender's own error, e.g. ``LearnerRankError``)."""

    def open_bus(self, receivers: int, dtype: str | None, timeout_s: float) -> BusSpec: ...

    def join_bus_async(self) -> ObjectRef: ...

    def send_async(self, version: int) -> ObjectRef: ...

    def bus_result(self, ref: ObjectRef) -> str: ...


class RayRolloutSource:
    """N rollout workers as Ray actors behind the ``ProcessRolloutSource`` interface.

    Args:
        cfg: The workers' settings as for one ``ProcessRolloutSource``; each worker gets
            ``worker_configs(cfg, num_workers)[i]`` (its share of ``prompts_per_step``,
            its own problem stream; with ``log_file`` set, worker ``i`` writes
            ``<stem>.<i><suffix>`` on the node it runs on).
        num_workers: Rollout actors (``1 <= num_workers <= rollout.prompts_per_step``).
        cpus_per_worker: Ray CPUs each actor (and its worker process) reserves.
        gpus_per_worker: Ray GPUs each actor reserves (Ray sets ``CUDA_VISIBLE_DEVICES``,
            which the worker process inherits).
        strategy: Placement-group strategy of the N bundles: ``PACK`` (as few nodes as
            possible), ``SPREAD`` (across nodes), or their ``STRICT_`` forms.
        max_worker_failures: Actor deaths (all workers together) survived before
            ``RolloutWorkerError``; also each actor's Ray ``max_restarts``. Default
            ``cfg.max_restarts``.
        initial_version: The learner's policy version now (as for ``ProcessRolloutSource``).
        initial_weights: State dict to serve instead of the model directory's (tensors,
            or a reference to them in Ray's object store, as ``publish`` takes).
        autostart: Produce batches at once, or from the first ``next_batch``.
        address: Only when Ray is not initialised yet: ``None`` starts a local Ray
            instance, ``"auto"`` or ``"host:port"`` joins a running cluster; that Ray
            session is shut down by ``close()``. An already initialised Ray is used as is
            and left running.
        sender: Publish by broadcast from this sender (``broadcast``) instead of through
            the object store (``publish``); ``None``: the object store only.
        bus_timeout_s: Longest wait for the bus's members at join and per collective.

    Attributes:
        shares: Groups each worker makes per step (``rollout.prompts_per_step`` split).
        last_batch_workers: The worker that made each group of the last batch.

    Raises:
        ValueError: Invalid settings.
        RolloutWorkerError: The cluster cannot place the workers in
            ``cfg.rollout.start_timeout_s`` (the message lists what it has).
    """

    def __init__(
        self,
        cfg: RolloutWorkerConfig,
        *,
        num_workers: int = 2,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        strategy: PlacementStrategy = "PACK",
        max_worker_failures: int | None = None,
        initial_version: int = 0,
        initial_weights: Mapping[str, torch.Tensor] | ObjectRef | None = None,
        autostart: bool = True,
        address: str | None = None,
        sender: BusSender | None = None,
        bus_timeout_s: float = 600.0,
    ) -> None:
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                "RayRolloutSource strategy must be PACK|SPREAD|STRICT_PACK|STRICT_SPREAD "
                f"(got {strategy!r})"
            )
        if cpus_per_worker < 0 or gpus_per_worker < 0:
            raise ValueError("RayRolloutSource cpus_per_worker and gpus_per_worker must be >= 0")
        self.cfg = cfg
        self._cfgs = worker_configs(cfg, num_workers)  # raises on a bad num_workers
        self.shares = tuple(c.rollout.prompts_per_step for c in self._cfgs)
        self.max_worker_failures = (
            cfg.max_restarts if max_worker_failures is None else max_worker_failures
        )
        if self.max_worker_failures < 0:
            raise ValueError("RayRolloutSource max_worker_failures must be >= 0")
        self._base_version = int(initial_version)
        self._version = int(initial_version)
        self._ref_version = int(initial_version)  # version of _weights_ref's weights
        self._sender = sender
        self._bus_timeout_s = float(bus_timeout_s)
        self._bus: BusSpec | None = None  # None: (re)build before the next broadcast
        self._syncing = False
        self._received = 0
        self._started = autostart
        self._closed = False
        self._failures = 0  # actor deaths
        self._worker_restarts = 0  # worker processes restarted inside live actors
        self._seen_restarts = [0] * num_workers  # of each actor's current source
        self._reissued = 0
        self._incarnations = [0] * num_workers
        self._kinds = [""] * num_workers
        self._notes = [""] * num_workers
        self.last_batch_workers: tuple[int, ...] = ()  # worker index of each group
        self._actors: list[ActorHandle] = []
        self._in_flight: dict[ObjectRef, int] = {}  # calls in flight -> worker index
        self._pg: PlacementGroup | None = None

        ray = _ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False)
        atexit.register(self.close)
        try:
            self._weights_ref = None if initial_weights is None else self._ref(initial_weights)
            self._place(num_workers, cpus_per_worker, gpus_per_worker, strategy)
            ray.get([self._open(i) for i in range(num_workers)])
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public API

    @property
    def version(self) -> int:
        """The newest policy version the rollout side serves."""
        return self._version

    @property
    def num_workers(self) -> int:
        """How many rollout actors there are."""
        return len(self._actors)

    @property
    def actors(self) -> tuple[ActorHandle, ...]:
        """The Ray actor handles (worker ``i`` is ``actors[i]``), e.g. for ``ray.kill``."""
        return tuple(self._actors)

    @property
    def restarts(self) -> int:
        """Worker restarts after a failure: actor deaths plus worker processes that an
        actor's ``ProcessRolloutSource`` restarted."""
        return self._failures + self._worker_restarts

    @property
    def reissued_prompts(self) -> int:
        """Prompts asked again because their worker died before delivering them."""
        return self._reissued

    def metrics(self) -> dict[str, float]:
        """Run totals for the learner's log: ``rollout/reissued_prompts`` (nothing is lost
        silently: every prompt asked again is counted) and ``rollout/worker_restarts``."""
        return {
            "rollout/reissued_prompts": float(self._reissued),
            "rollout/worker_restarts": float(self.restarts),
        }

    @property
    def wire_dtype(self) -> str | None:
        """The dtype weights travel in to the workers: the engine's when it is explicit;
        ``None`` (as trained) for ``auto``, which each worker resolves on its own node."""
        dtype = self.cfg.engine.dtype
        return dtype if dtype != "auto" else None

    @property
    def engine_kind(self) -> str:
        """``"vllm"`` or ``"hf"`` once ready; ``"vllm,hf"`` when workers differ."""
        return ",".join(dict.fromkeys(k for k in self._kinds if k))

    @property
    def engine_note(self) -> str:
        """Empty, or why worker(s) fell back to HF ``generate``."""
        return " ".join(f"worker {i}: {n}" for i, n in enumerate(self._notes) if n)

    def worker_info(self) -> list[dict[str, Any]]:
        """Each actor's ``{"pid", "worker_pid", "node_id", "restarts"}``."""
        return self._gather("info", None)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker's engine has started.

        Raises:
            RolloutWorkerError: A worker could not start.
            RolloutTimeoutError: Not all started in ``timeout_s`` (default
                ``cfg.rollout.start_timeout_s``).
        """
        timeout_s = timeout_s or self.cfg.rollout.start_timeout_s
        for i, (kind, note) in enumerate(
            self._gather(
                "wait_ready",
                timeout_s,
                lambda i: (timeout_s,),
                what="start-up",
                setting="rollout.start_timeout_s",
            )
        ):
            self._kinds[i], self._notes[i] = kind, note

    def next_batch(self, timeout_s: float | None = None) -> RolloutBatch:
        """The next batch: every worker's share, their union (versions kept).

        A worker that dies meanwhile is reopened and asked again for its share (counted in
        ``reissued_prompts``); the step still gets all ``prompts_per_step`` groups.

        Raises:
            RolloutTimeoutError: Not every share arrived within ``timeout_s``.
            RolloutWorkerError: A worker failed for good, or ``max_worker_failures``.
            RuntimeError: Called again without ``publish`` when the staleness bound makes
                the batch impossible.
        """
        self._check_open()
        allowed = self._version - self._base_version + self.cfg.rollout.max_staleness
        if self._received > allowed:
            raise RuntimeError(
                f"next_batch() for batch {self._received} needs policy version >= "
                f"{self._base_version + self._received - self.cfg.rollout.max_staleness}, but the "
                f"newest published is {self._version} (max_staleness="
                f"{self.cfg.rollout.max_staleness}): call publish() after each training step"
            )
        self._started = True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def lost(i: int) -> None:  # reopened with the newest weights, then asked again
            self._reissued += self.shares[i]

        replies = self._gather(
            "next_batch",
            timeout_s,
            lambda i: (_left(deadline),),
            what=f"rollout batch {self._received}",
            setting="rollout.batch_timeout_s",
            on_lost=lost,
        )
        for i, (_, during, total) in enumerate(replies):
            # Worker processes restarted by the actor's own ProcessRolloutSource; one that
            # died during this call made this batch again.
            self._worker_restarts += total - self._seen_restarts[i]
            self._seen_restarts[i] = total
            if during:
                self._reissued += self.shares[i]
        self._received += 1
        batches = [batch for batch, _, _ in replies]
        self.last_batch_workers = tuple(i for i, b in enumerate(batches) for _ in b.groups)
        return merge_batches(batches)

    def publish(self, state_dict: Mapping[str, torch.Tensor] | ObjectRef, version: int) -> None:
        """Make ``state_dict`` (HF names) policy ``version`` of every worker's engine.

        ``state_dict`` is either the tensors (put into Ray's object store once: CPU, in
        the engine's dtype when it is explicit) or a reference to them already there
        (``RayLearnerGroup.weights_ref``: rank 0 put them, and they never pass through
        this process). Returns once every engine serves it. A worker that dies meanwhile
        is reopened with it.

        Raises:
            ValueError: ``version`` is not newer than the current one.
            RolloutTimeoutError: Not every worker loaded it in ``rollout.request_timeout_s``.
            RolloutWorkerError: A worker failed for good, or ``max_worker_failures``.
        """
        self._check_open()
        if int(version) <= self._version:
            raise ValueError(
                f"publish(version={version}): versions must increase (current {self._version})"
            )
        ref = self._ref(state_dict)
        # Set before the calls: a worker reopened meanwhile starts from these weights.
        self._weights_ref, self._version = ref, int(version)
        self._ref_version = self._version
        # A worker reopened meanwhile already serves it: it is not asked again.
        self._gather(
            "publish",
            self.cfg.rollout.request_timeout_s,
            lambda i: (ref, self._version),
            what=f"weight sync (version {version})",
            again=False,
        )

    def broadcast(self, version: int) -> None:
        """Make the sender's current weights policy ``version`` of every worker's engine,
        over the weight bus (built, or rebuilt after a failure, first). Returns once every
        engine serves it.

        Raises:
            ValueError: ``version`` is not newer than the current one.
            RuntimeError: No sender (the source publishes through the object store).
            RolloutWorkerError: The bus failed more often than ``max_worker_failures``
                allows, or a worker failed for good.
            RolloutTimeoutError: A worker did not answer in time.
            LearnerRankError: The sender (learner rank 0) died.
        """
        self._check_open()
        if self._sender is None:
            raise RuntimeError("RayRolloutSource.broadcast needs a sender (see __init__)")
        if int(version) <= self._version:
            raise ValueError(
                f"broadcast(version={version}): versions must increase (current {self._version})"
            )
        self._version = int(version)
        self._sync()

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        timeout_s: float | None = None,
        phase: str = "generate request",
    ) -> tuple[list[list[Generation]], int]:
        """Sample with the workers' engines (eval, probes); the prompts are split over the
        workers as evenly as possible and the answers returned in prompt order.

        Returns:
            ``(generations, version)`` as ``ProcessRolloutSource.generate``; every worker
            serves the same version (``publish`` is synchronous).
        """
        self._check_open()
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        if not prompts:
            return [], self._version
        parts = split_evenly(len(prompts), min(self.num_workers, len(prompts)))
        starts = np.cumsum([0, *parts]).tolist()
        if timeout_s is None:
            timeout_s = request_timeout(self.cfg, max(parts), n, sampling.max_tokens)
        replies = self._gather(
            "generate",
            timeout_s,
            lambda i: (prompts[starts[i] : starts[i + 1]], n, sampling, timeout_s, phase),
            workers=range(len(parts)),
            what=phase,
        )
        out = [g for gens, _ in replies for g in gens]
        return out, min(v for _, v in replies)

    def worker_state(self, timeout_s: float | None = None) -> dict[str, Any]:
        """What the workers are doing, as ``ProcessRolloutSource.worker_state`` for all of
        them (``version`` and ``next_batch``: the lowest; ``waiting_for_version``: the
        highest; ``started``: all), plus ``workers``: each worker's own answer."""
        timeout_s = timeout_s or self.cfg.rollout.request_timeout_s
        states = self._gather("worker_state", timeout_s, lambda i: (timeout_s,))
        return {
            "version": min(s["version"] for s in states),
            "next_batch": min(s["next_batch"] for s in states),
            "waiting_for_version": max(s["waiting_for_version"] for s in states),
            "started": all(s["started"] for s in states),
            "workers": states,
        }

    def worker_busy(self) -> bool:
        """Whether any worker is generating; ``True`` when one does not answer within 5 s
        (the learner then leaves the rollout side its cores)."""
        ray = _ray()
        try:
            return any(ray.get([a.worker_busy.remote() for a in self._actors], timeout=5.0))
        except Exception:
            return True

    def close(self) -> None:
        """Stop every worker (and the processes it started), kill the actors, remove the
        placement group, and shut Ray down if this source started it."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        ray = _ray()
        if not ray.is_initialized():
            return
        refs = [a.close.remote() for a in self._actors]
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_GRACE_S)
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> RayRolloutSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RayRolloutSource is closed")

    def _ref(self, weights: Mapping[str, torch.Tensor] | ObjectRef) -> ObjectRef:
        """One object-store copy of the weights, on CPU, in the engine's dtype if explicit
        (a reference is taken as it is)."""
        ray = _ray()
        if isinstance(weights, ray.ObjectRef):
            return weights
        target = getattr(torch, self.wire_dtype) if self.wire_dtype else None
        cpu = {}
        for name, t in weights.items():
            t = t.detach()
            if target is not None and t.is_floating_point():
                t = t.to(dtype=target)
            cpu[name] = t.to("cpu")
        return ray.put(cpu)

    def _place(self, n: int, cpus: float, gpus: float, strategy: str) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self._pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
        timeout = self.cfg.rollout.start_timeout_s
        ready, _ = ray.wait([self._pg.ready()], timeout=timeout)
        if not ready:
            raise RolloutWorkerError(
                f"Ray could not place {n} rollout worker(s) of {bundle} ({strategy}) within "
                f"{timeout:.0f} s; the cluster has {ray.cluster_resources()} in all and "
                f"{ray.available_resources()} free. Lower the workers or their CPUs/GPUs."
            )
        actor_cls = ray.remote(RolloutActor)
        for i in range(n):
            self._actors.append(
                actor_cls.options(
                    num_cpus=cpus,
                    num_gpus=gpus,
                    max_restarts=self.max_worker_failures,
                    max_task_retries=0,  # a dead actor's calls fail; _recover re-asks
                    name=None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=i
                    ),
                ).remote()
            )

    def _open(self, i: int):
        cfg = self._cfgs[i]
        if self._incarnations[i]:
            cfg = replace(cfg, seed=worker_seed(self.cfg.seed, i, self._incarnations[i]))
        return self._actors[i].open.remote(
            cfg, self._version, self._weights_ref, self._started, self._ref_version
        )

    # ------------------------------------------------------------------ weight bus

    def _sync(self) -> None:
        """Broadcast ``self._version`` to every worker, (re)building the bus first when
        needed; after a failure (a worker lost or restarted, a bus error), rebuild and
        broadcast again. Inside a sync, a lost worker only marks the bus for a rebuild
        (the loop here does the rest)."""
        if self._syncing:
            self._bus = None
            return
        self._syncing = True
        last = ""
        try:
            for _ in range(self.max_worker_failures + 2):
                if self._bus is None:
                    last = self._bus_round("join")
                if self._bus is not None and not (last := self._bus_round("receive")):
                    return
                self._bus = None
            raise RolloutWorkerError(
                f"the weight bus could not deliver version {self._version} in "
                f"{self.max_worker_failures + 2} tries (max_worker_failures="
                f"{self.max_worker_failures}); last failure: {last}"
            )
        finally:
            self._syncing = False

    def _bus_round(self, step: str) -> str:
        """One bus step on every member at once: the sender's and every worker's, awaited
        together. Returns ``""`` or what failed (and forgets the bus then)."""
        sender, version = self._sender, self._version
        if step == "join":
            spec = sender.open_bus(self.num_workers, self.wire_dtype, self._bus_timeout_s)
            ref, method = sender.join_bus_async(), "join_bus"
        else:
            spec = self._bus
            ref, method = sender.send_async(version), "receive_broadcast"

        def args(i: int) -> tuple:  # worker i is rank 1 + i
            return (spec, 1 + i) if step == "join" else (version,)

        def lost(i: int) -> None:  # the others must not wait for it until the timeout
            if step == "join":
                with contextlib.suppress(Exception):
                    from trainer.weight_bus import WeightBus

                    WeightBus.cancel(spec, 1 + i, f"rollout worker {i} died")

        replies = self._gather(
            method,
            self._bus_timeout_s + self.cfg.rollout.request_timeout_s,
            args,
            what=f"weight-bus {step} (version {version})",
            again=False,
            on_lost=lost,
        )
        failures = [f"worker {i}: {r}" for i, r in enumerate(replies) if r]
        failures += [f"worker {i}: lost" for i, r in enumerate(replies) if r is None]
        sent = sender.bus_result(ref)
        if sent:
            failures.append(f"sender: {sent}")
        self._bus = None if failures else spec
        return "; ".join(failures)

    def _recover(self, i: int, exc: BaseException) -> None:
        """Reopen worker ``i`` after its actor died. Ray restarts the actor in its bundle;
        until it is back, calls fail as "unavailable" and are retried. The new worker
        serves the newest version from its start.

        Raises:
            RolloutWorkerError: More than ``max_worker_failures`` failures (or Ray gave
                the actor up).
            RolloutTimeoutError: The actor was not back within ``rollout.start_timeout_s``.
        """
        ray = _ray()
        timeout = self.cfg.rollout.start_timeout_s
        while True:
            self._failures += 1
            if self._failures > self.max_worker_failures:
                self.close()
                raise RolloutWorkerError(
                    f"rollout worker {i} died; {self._failures} worker failures in all "
                    f"(max_worker_failures={self.max_worker_failures}). Last: {exc}"
                )
            self._incarnations[i] += 1
            self._seen_restarts[i] = 0  # a new ProcessRolloutSource
            deadline = time.monotonic() + timeout
            while True:
                try:
                    ray.get(self._open(i), timeout=_left(deadline))
                    if self._sender is not None:  # off the bus, on older weights
                        self._bus = None
                        self._sync()
                    return
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() < deadline:
                        time.sleep(RESTART_POLL_S)  # still restarting
                        continue
                except ray.exceptions.RayActorError as again:
                    exc = again  # dead (again, or for good): one more failure
                    break
                except ray.exceptions.GetTimeoutError:
                    pass
                self.close()
                raise RolloutTimeoutError(
                    f"rollout worker {i} died and Ray did not bring its actor back within "
                    f"{timeout:.0f} s (rollout.start_timeout_s)"
                ) from exc

    def _gather(
        self,
        method: str,
        timeout_s: float | None,
        args_for: Callable[[int], tuple] = lambda i: (),
        *,
        workers: Sequence[int] | None = None,
        what: str = "",
        setting: str = "rollout.request_timeout_s",
        again: bool = True,
        on_lost: Callable[[int], None] | None = None,
    ) -> list[Any]:
        """Call ``method(*args_for(i))`` on every worker (or ``workers``) at once; return
        the results in worker order.

        A worker whose actor died is reopened (``_recover``), ``on_lost(i)`` is called, and
        it is asked again (``again``; otherwise its result is ``None``: a ``publish`` is
        served by the reopening itself).

        Raises:
            RolloutTimeoutError: Not every result within ``timeout_s`` (the message names
                ``what`` and ``setting``).
        """
        ray = _ray()
        self._check_open()
        workers = list(range(self.num_workers)) if workers is None else list(workers)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def call(i: int) -> ObjectRef:
            return getattr(self._actors[i], method).remote(*args_for(i))

        results: dict[int, Any] = {}
        # A gather may nest (a lost worker's bus rebuild, inside another gather): each
        # keeps its own calls; self._in_flight shows the innermost's.
        outer = self._in_flight
        self._in_flight = in_flight = {call(i): i for i in workers}
        try:
            while in_flight:
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=_left(deadline))
                if not done:
                    raise RolloutTimeoutError(
                        f"rollout worker(s) {sorted(in_flight.values())} did not finish "
                        f"{what or method} within {timeout_s:.0f} s. On a slow or busy machine "
                        f"raise {setting}; the workers' logs may say more."
                    )
                i = in_flight.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                except (ray.exceptions.RayActorError, WorkerLostError, WeightBusError) as exc:
                    if isinstance(exc, WeightBusError):  # its worker restarted off the bus
                        self._bus = None
                        self._sync()
                    else:
                        self._recover(i, exc)
                    if on_lost is not None:
                        on_lost(i)
                    if again:
                        in_flight[call(i)] = i
                    else:
                        results[i] = None
        finally:
            self._in_flight = outer
        return [results[i] for i in workers]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _ray():
    """Ray, imported on first use (``import trainer`` never needs it)."""
    import ray

    return ray
