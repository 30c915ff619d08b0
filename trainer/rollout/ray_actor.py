"""What runs inside one Ray rollout actor: a ``ProcessRolloutSource`` and its worker.

``RayRolloutSource`` (``trainer.rollout.ray_source``) wraps :class:`RolloutActor` with
``ray.remote`` when it builds the actors; this module never imports Ray at import time.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainer.engines.base import SamplingConfig
from trainer.rollout.config import RolloutWorkerConfig
from trainer.rollout.source import ProcessRolloutSource, RolloutWorkerError, WeightBusError
from trainer.types import Generation, RolloutBatch

if TYPE_CHECKING:
    from trainer.weight_bus import BusSpec


class WorkerLostError(RolloutWorkerError):
    """The actor was restarted by Ray (its previous incarnation died while idle) and has
    not been reopened: the learner side treats it as a death and reopens it."""


class RolloutActor:
    """What runs inside one Ray actor: a ``ProcessRolloutSource`` and its worker process.

    Built empty (Ray re-runs ``__init__`` when it restarts a dead actor, with the
    arguments of the first start, which would be stale); ``open`` starts the worker with
    the learner's current version and weights. The learner side calls one method at a
    time (the actor runs them in order).
    """

    def __init__(self) -> None:
        self.source: ProcessRolloutSource | None = None

    def open(
        self,
        cfg: RolloutWorkerConfig,
        version: int,
        weights: Mapping[str, torch.Tensor] | None,
        autostart: bool,
        weights_version: int | None = None,
    ) -> dict[str, Any]:
        """Start the worker process (not waiting for its engine); return ``info()``.
        ``weights_version``: see ``ProcessRolloutSource`` (a reopen on a weight bus)."""
        if self.source is not None:
            self.source.close()
        self.source = ProcessRolloutSource(
            cfg,
            initial_version=version,
            initial_weights=weights,
            autostart=autostart,
            weights_version=weights_version,
        )
        return self.info()

    def info(self) -> dict[str, Any]:
        """``{"pid", "worker_pid", "node_id", "restarts"}`` of this actor."""
        import ray

        src = self._src()
        return {
            "pid": os.getpid(),
            "worker_pid": src.worker_pid,
            "node_id": ray.get_runtime_context().get_node_id(),
            "restarts": src.restarts,
        }

    def wait_ready(self, timeout_s: float | None) -> tuple[str, str]:
        src = self._src()
        src.wait_ready(timeout_s)
        return src.engine_kind, src.engine_note

    def next_batch(self, timeout_s: float | None) -> tuple[RolloutBatch, int, int]:
        """The worker's next batch, how often its process was restarted meanwhile (the
        batch was made again), and how often since ``open``."""
        src = self._src()
        before = src.restarts
        batch = src.next_batch(timeout_s)
        return batch, src.restarts - before, src.restarts

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        self._src().publish(state_dict, version)

    def join_bus(self, spec: BusSpec, rank: int) -> str:
        """Join a weight bus; ``""``, or why not (a bus failure is the sender's side to
        repair by rebuilding the bus, not a reason to fail this actor's call)."""
        return self._bus_step(lambda: self._src().join_bus(spec, rank))

    def receive_broadcast(self, version: int) -> str:
        """Receive ``version`` from the weight bus; ``""``, or why not."""
        return self._bus_step(lambda: self._src().receive_broadcast(version))

    @staticmethod
    def _bus_step(step) -> str:
        try:
            step()
        except WeightBusError as exc:
            return str(exc)
        return ""

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        timeout_s: float | None,
        phase: str,
    ) -> tuple[list[list[Generation]], int]:
        return self._src().generate(prompt_token_ids, n, sampling, timeout_s, phase)

    def worker_state(self, timeout_s: float | None) -> dict[str, Any]:
        return self._src().worker_state(timeout_s)

    def worker_busy(self) -> bool:
        return self._src().worker_busy()

    def close(self) -> None:
        """Stop the worker, then drop the source: collecting its queues unlinks their
        named semaphores in ``/dev/shm``, which would outlive the actor, since Ray then
        kills it without running exit handlers."""
        if self.source is not None:
            self.source.close()
            self.source = None
            gc.collect()

    def _src(self) -> ProcessRolloutSource:
        if self.source is None:
            raise WorkerLostError("this rollout actor was restarted by Ray and not reopened")
        return self.source
