"""Rollout engine adapters and the weight files they load.

- ``base``: the ``Engine`` protocol, ``SamplingConfig``, ``EngineConfig``, ``make_engine``.
- ``vllm_engine``: vLLM adapter + the worker extension that reloads weights in place.
- ``hf_engine``: Hugging Face ``generate`` fallback (machines without vLLM).
- ``weights``: state dict <-> safetensors file in ``/dev/shm``.

The rollout worker process that drives an engine is ``trainer.rollout``.

Only light modules are imported here; vLLM and transformers load when an engine is built.
"""

from trainer.engines.base import (
    Engine,
    EngineConfig,
    SamplingConfig,
    make_engine,
    vllm_available,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "SamplingConfig",
    "make_engine",
    "vllm_available",
]
