"""Hugging Face ``generate`` adapter: the rollout engine where vLLM is not installed.

Slower than vLLM (no paged KV cache, no continuous batching) but needs nothing beyond
transformers, so the trainer runs on any machine (the GPU check machine has no vLLM).

Sampling runs through one logits processor of ours (``_WarpAndRecord``): it applies
temperature / top-k / top-p with transformers' own warpers and records the log-softmax of
the warped scores at each sampled token, i.e. the log-prob under the distribution actually
sampled from (the convention of ``trainer.engines.base``, the same as vLLM's
``processed_logprobs``). ``generate`` is called with its built-in warpers switched off, so
nothing else touches the logits, and only one ``[N, V]`` log-prob buffer is kept (storing
every step's logits would take N x T x V floats).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fipo_env.models import offline_hub, resolve_model_dir
from trainer.engines.base import EngineConfig, SamplingConfig, validate_prompts
from trainer.engines.weights import iter_weights
from trainer.types import Generation

if TYPE_CHECKING:
    from trainer.weight_bus import BusSpec, WeightBus

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _WarpAndRecord:
    """Logits processor: warp the scores, and record log-probs of the sampled tokens.

    At decoding step t it sees the ids generated so far, whose last column is the token
    sampled at step t-1, so it gathers that token's log-prob from the buffer it kept.
    """

    def __init__(self, prompt_len: int, warpers: list) -> None:
        self.prompt_len = prompt_len
        self.warpers = warpers
        self.prev: torch.Tensor | None = None  # [N, V] sampling log-probs of the last step
        self.logprobs: list[torch.Tensor] = []  # T x [N]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_len:
            self._record(input_ids[:, -1])
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """Record the final step and return the log-probs, ``[N, T]``."""
        self._record(last_tokens)
        return torch.stack(self.logprobs, dim=1)

    def _record(self, tokens: torch.Tensor) -> None:
        assert self.prev is not None
        self.logprobs.append(self.prev.gather(1, tokens.view(-1, 1)).squeeze(1))
        self.prev = None


class HFEngine:
    """An ``Engine`` over ``transformers``' ``generate``.

    Args:
        cfg: Engine settings (``device``, ``dtype``, ``seed``, ``max_batch_size`` are used).
    """

    def __init__(self, cfg: EngineConfig) -> None:
        # A clear error for a missing or non-model directory; nothing is ever downloaded.
        model_dir = resolve_model_dir(cfg.model_dir)
        offline_hub()
        from transformers import AutoModelForCausalLM

        if cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=_DTYPES[cfg.resolved_dtype()], local_files_only=True
        ).to(self.device)
        self.model.eval()
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else []
        self._default_eos = tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
        pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else None
        self._pad_id = int(pad) if pad is not None else (self._default_eos or (0,))[0]
        self._vocab_size = int(self.model.config.vocab_size)
        self._generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self._bus: WeightBus | None = None
        self._closed = False

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Generation]]:
        """Sample ``n`` responses per prompt (see ``Engine.generate``)."""
        self._check_open()
        validate_prompts(prompt_token_ids, n, self._vocab_size)
        stop = tuple(sampling.stop_token_ids) or self._default_eos
        if not stop:
            raise ValueError("no stop token: pass SamplingConfig.stop_token_ids (model has no EOS)")
        flat = [[int(t) for t in p] for p in prompt_token_ids for _ in range(n)]
        gens: list[Generation] = []
        step = self.cfg.max_batch_size
        for start in range(0, len(flat), step):
            gens.extend(self._generate_chunk(flat[start : start + step], sampling, stop))
        return [gens[i * n : (i + 1) * n] for i in range(len(prompt_token_ids))]

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: list[list[int]], sampling: SamplingConfig, stop: tuple[int, ...]
    ) -> list[Generation]:
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        width = max(len(p) for p in prompts)
        # Left padding, so every prompt ends at the same column and decoding appends there.
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        greedy = sampling.temperature == 0
        warpers = []
        if not greedy:
            if sampling.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        recorder = _WarpAndRecord(width, warpers)
        # HF samples with the global torch RNG: swap in our engine's stream so runs are
        # reproducible per seed and do not disturb (or get disturbed by) the caller's RNG.
        rng_state = torch.random.get_rng_state()
        torch.random.set_rng_state(self._generator.get_state())
        try:
            # Built-in warpers off (temperature 1, no top-k / top-p): ours do the work.
            neutral = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
            seqs = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=not greedy,
                **neutral,
                max_new_tokens=sampling.max_tokens,
                eos_token_id=list(stop),
                pad_token_id=self._pad_id,
                logits_processor=LogitsProcessorList([recorder]),
            )
            self._generator.set_state(torch.random.get_rng_state())
        finally:
            torch.random.set_rng_state(rng_state)
        new = seqs[:, width:].cpu()  # [N, T]
        logprobs = recorder.finish(seqs[:, -1]).cpu()  # [N, T]
        stop_set = set(stop)
        out = []
        for row, lp in zip(new.tolist(), logprobs.tolist(), strict=True):
            end = next((t + 1 for t, tok in enumerate(row) if tok in stop_set), None)
            if end is None:
                out.append(Generation(tuple(row), tuple(lp), "length"))
            else:
                out.append(Generation(tuple(row[:end]), tuple(lp[:end]), "stop"))
        return out

    @torch.no_grad()
    def load_weights(self, path: str | Path) -> None:
        """Copy a safetensors file's tensors (HF names) into the model, in place."""
        self._check_open()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        # state_dict() lists tied parameters under every name (lm_head + embeddings),
        # as the learner's state dict does; its tensors share the parameters' storage.
        params = self.model.state_dict()
        loaded = 0
        for name, tensor in iter_weights(path):
            target = params.get(name)
            if target is None:
                raise KeyError(f"weights file {path} has {name!r}, which the model does not have")
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} in {path}, model has {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded += 1
        if loaded == 0:
            raise RuntimeError(f"weights file {path} holds no tensors")

    def join_bus(self, spec: BusSpec, rank: int) -> None:
        """Join a weight bus as receiver ``rank`` (leaving any earlier one); the manifest
        must name only tensors of this model, shaped alike (else ``ValueError``)."""
        from trainer.weight_bus import WeightBus

        self._check_open()
        self._leave_bus()
        expect = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        device = self.device if spec.backend == "nccl" else None
        self._bus = WeightBus.join(spec, rank, expect=expect, device=device)

    @torch.no_grad()
    def receive_weights(self, version: int) -> None:
        """Copy the tensors the bus's sender broadcasts as ``version`` into the model, in
        place (as ``load_weights`` does with a file's)."""
        self._check_open()
        if self._bus is None:
            raise RuntimeError("HFEngine.receive_weights: no weight bus joined (join_bus)")
        params = self.model.state_dict()  # the manifest was checked against it at join
        for name, tensor in self._bus.receive(version):
            params[name].copy_(tensor)

    def close(self) -> None:
        """Drop the model (and leave the weight bus)."""
        if not self._closed:
            self._closed = True
            self._leave_bus()
            del self.model

    def _leave_bus(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HFEngine is closed")
