"""Rollout engines, weight sync and the rollout worker process.

- ``base``: the ``Engine`` protocol, ``SamplingConfig``, ``EngineConfig``, ``make_engine``.
- ``vllm_engine``: vLLM adapter + the worker extension that reloads weights in place.
- ``hf_engine``: Hugging Face ``generate`` fallback (machines without vLLM).
- ``weights``: state dict <-> safetensors file in ``/dev/shm``.
- ``rollout``: the worker process (env-driven groups, dynamic sampling, staleness bound).
- ``source``: ``ProcessRolloutSource``, the learner's ``RolloutSource`` + ``WeightPublisher``.

Only light modules are imported here; vLLM and transformers load when an engine is built.
"""

from trainer.engines.base import (
    Engine,
    EngineConfig,
    SamplingConfig,
    make_engine,
    vllm_available,
)
from trainer.engines.rollout import RolloutWorkerConfig
from trainer.engines.source import ProcessRolloutSource, RolloutWorkerError

__all__ = [
    "Engine",
    "EngineConfig",
    "ProcessRolloutSource",
    "RolloutWorkerConfig",
    "RolloutWorkerError",
    "SamplingConfig",
    "make_engine",
    "vllm_available",
]
