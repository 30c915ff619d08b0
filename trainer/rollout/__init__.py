"""The rollout side: a worker process that owns an engine and fills rollout batches.

- ``config``: ``RolloutWorkerConfig`` (the worker's settings), ``WorkerStart`` (where a
  (re)started worker begins) and ``rollout_worker_config``, which derives the worker's
  settings from the trainer's ``TrainConfig``.
- ``groups``: pure group assembly and DAPO filtering (``build_groups``,
  ``informative_mask``, ``keep_informative``), testable with no process.
- ``procs``: process helpers: atomic pickle files, the parent-death signal.
- ``worker``: the worker process itself (engine start, control messages, batch loop).
- ``source``: ``ProcessRolloutSource``, the learner's side of the worker process (its
  ``RolloutSource`` and ``WeightPublisher``).
- ``ray_source``: ``RayRolloutSource``, the same interface over N Ray actors, each owning
  one ``ProcessRolloutSource`` (Ray is imported only when one is built).

The engines it drives (vLLM, HF ``generate``) and the weight files live in
``trainer.engines``.
"""

from trainer.rollout.config import RolloutWorkerConfig, WorkerStart, rollout_worker_config
from trainer.rollout.groups import build_groups, informative_mask, keep_informative
from trainer.rollout.ray_source import RayRolloutSource
from trainer.rollout.source import (
    ProcessRolloutSource,
    RolloutTimeoutError,
    RolloutWorkerError,
    WeightBusError,
)

__all__ = [
    "ProcessRolloutSource",
    "RayRolloutSource",
    "RolloutTimeoutError",
    "RolloutWorkerConfig",
    "RolloutWorkerError",
    "WeightBusError",
    "WorkerStart",
    "build_groups",
    "informative_mask",
    "keep_informative",
    "rollout_worker_config",
]
