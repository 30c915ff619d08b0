"""Settings of the rollout worker process, and where a (re)started worker begins."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import parse_cpus
from trainer.engines.base import EngineConfig, SamplingConfig

if TYPE_CHECKING:
    from trainer.config import TrainConfig


@dataclass(frozen=True)
class RolloutWorkerConfig:
    """Settings of the rollout worker process and the batches it makes.

    Attributes:
        engine: Which engine to run and how (model directory, vLLM or HF, dtype, seed).
        task: ``fipo_env`` task spec of the training problems (``"arithmetic"``,
            ``"arithmetic:0,1"``, ``"file:/data/train.jsonl"``, ...); its train split.
        verifier: ``"local"`` (the reward server's worker pool inside the worker process)
            or the ``host:port`` of a running reward server (gRPC ``RewardClient``).
        group_size: G, samples per prompt.
        groups_per_batch: Prompt groups per batch (after dynamic sampling).
        prompts_per_round: Prompts sampled per engine call; ``0`` means
            ``groups_per_batch``. Raise it when dynamic sampling drops many groups.
        max_prompt_tokens: Longest chat-templated prompt (longer problems are redrawn).
        max_response_tokens: Response-length limit (L_max): the engine's ``max_tokens``
            and the env's truncation length.
        temperature: Sampling temperature (> 0 for RL).
        top_p: Nucleus-sampling mass.
        top_k: Top-k truncation (``0`` = off).
        reward_scheme: ``"binary"`` (1/0) or ``"signed"`` (+1/-1) verifier reward.
        overlong_buffer: L_buf of DAPO's soft overlong penalty (applied by the
            verifier); ``None`` or ``0`` = off.
        dynamic_sampling: Drop groups whose rewards are all equal (DAPO).
        max_sampling_rounds: Most generation rounds spent filling one batch. If they
            keep fewer than ``groups_per_batch`` groups the batch is returned smaller;
            if they keep none it holds the last round's groups (zero advantage).
        max_staleness: How many policy versions a batch may lag the learner when it is
            trained on; ``0`` = synchronous on-policy.
        seed: Seed of the problem stream (the engine's sampling seed is ``engine.seed``).
        cpus: CPU ids the worker (and vLLM's threads) are pinned to; ``()`` = no pinning.
        max_restarts: How many times a crashed worker is restarted before the learner
            gets an error.
        start_timeout_s: Longest wait for the engine to start (vLLM compiles the model
            on first use: minutes on a loaded CPU).
        request_timeout_s: Longest wait for a weight sync, and the base of a ``generate``
            request's wait (which grows with the tokens it asks for).
        log_file: File that receives the worker's stdout and stderr (vLLM's and other
            libraries' warnings and progress output); empty leaves them on the console.
            Failures still reach the learner as ``RolloutWorkerError`` with the traceback.
    """

    engine: EngineConfig
    task: str = "arithmetic"
    verifier: str = "local"
    group_size: int = 8
    groups_per_batch: int = 8
    prompts_per_round: int = 0
    max_prompt_tokens: int = 256
    max_response_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_scheme: str = "binary"
    overlong_buffer: int | None = None
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 3
    max_staleness: int = 1
    seed: int = 0
    cpus: tuple[int, ...] = field(default_factory=tuple)
    max_restarts: int = 3
    start_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    log_file: str = ""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"RolloutWorkerConfig.{name} {rule} (got {getattr(self, name)!r})")

        need(isinstance(self.engine, EngineConfig), "engine", "must be an EngineConfig")
        need(bool(self.task.strip()), "task", "must be a fipo_env task spec")
        need(bool(self.verifier.strip()), "verifier", "must be 'local' or host:port")
        need(self.group_size >= 1, "group_size", "must be >= 1")
        need(self.groups_per_batch >= 1, "groups_per_batch", "must be >= 1")
        need(self.prompts_per_round >= 0, "prompts_per_round", "must be >= 0 (0 = auto)")
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        need(self.max_response_tokens >= 1, "max_response_tokens", "must be >= 1")
        need(
            self.max_prompt_tokens + self.max_response_tokens <= self.engine.max_model_len,
            "max_response_tokens",
            f"plus max_prompt_tokens must fit engine.max_model_len={self.engine.max_model_len}",
        )
        need(self.reward_scheme in ("binary", "signed"), "reward_scheme", "must be binary|signed")
        need(
            self.overlong_buffer is None or 0 <= self.overlong_buffer <= self.max_response_tokens,
            "overlong_buffer",
            "must be in [0, max_response_tokens]",
        )
        need(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        need(self.max_staleness >= 0, "max_staleness", "must be >= 0")
        need(all(c >= 0 for c in self.cpus), "cpus", "must be non-negative CPU ids")
        need(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        need(self.start_timeout_s > 0, "start_timeout_s", "must be > 0")
        need(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        # Validates temperature / top_p / top_k with SamplingConfig's own messages.
        self.sampling(stop_token_ids=())

    @property
    def round_prompts(self) -> int:
        """Prompts per generation round (``prompts_per_round`` or ``groups_per_batch``)."""
        return self.prompts_per_round or self.groups_per_batch

    def sampling(self, stop_token_ids: Sequence[int]) -> SamplingConfig:
        """The engine's sampling settings for rollouts."""
        return SamplingConfig(
            max_tokens=self.max_response_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_token_ids=tuple(stop_token_ids),
        )


@dataclass(frozen=True)
class WorkerStart:
    """Where a (re)started worker begins.

    Attributes:
        base_version: Learner version when the source was created (batch 0's version).
        version: Policy version of ``weights_path`` (or of the model directory).
        weights_path: Weights to load before anything else; ``None`` keeps the model
            directory's weights.
        next_batch: Index of the next batch to produce (batches the learner already
            received are not produced again).
        started: Whether to produce batches right away.
        restarts: How many times the worker was restarted (varies the problem stream).
        io_dir: Folder for batch / request / reply files.
    """

    base_version: int
    version: int
    weights_path: str | None
    next_batch: int
    started: bool
    restarts: int
    io_dir: str


def engine_threads(cfg: TrainConfig) -> int | None:
    """Threads of the rollout engine: ``rollout.engine_threads``, or the cores the learner
    leaves (its own pinning, when the worker is pinned, decides instead)."""
    if cfg.rollout.engine_threads:
        return cfg.rollout.engine_threads
    if cfg.rollout.worker_cpus:
        return None  # the worker sets its threads from its CPU affinity
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - max(cfg.model.num_threads, 0) if cfg.model.num_threads else cores // 2)


def rollout_worker_config(
    cfg: TrainConfig, model_dir: str | Path, verifier: str, log_file: str | Path = ""
) -> RolloutWorkerConfig:
    """The rollout worker's settings, derived from the trainer's config.

    Args:
        cfg: The trainer's config (``auto`` dtypes already resolved, see
            ``trainer.precision``).
        model_dir: Local model directory the engine loads.
        verifier: ``host:port`` of the reward server (or ``"local"``).
        log_file: Where the worker's output goes (empty: the console).
    """
    r = cfg.rollout
    max_prompt = 256
    engine = EngineConfig(
        model_dir=str(model_dir),
        kind=r.engine,
        dtype=r.dtype,
        seed=cfg.run.seed,
        gpu_memory_utilization=r.gpu_memory_utilization,
        kv_cache_gib=r.kv_cache_gib,
        max_num_seqs=r.prompts_per_step * r.group_size,
        cpu_threads=engine_threads(cfg),
        max_model_len=max_prompt + max(r.max_response_tokens, cfg.eval_max_tokens),
    )
    return RolloutWorkerConfig(
        engine=engine,
        task=cfg.task.spec,
        verifier=verifier,
        group_size=r.group_size,
        groups_per_batch=r.prompts_per_step,
        max_prompt_tokens=max_prompt,
        max_response_tokens=r.max_response_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        reward_scheme=cfg.algorithm.reward_scheme,
        overlong_buffer=r.overlong_buffer or None,
        dynamic_sampling=r.dynamic_sampling,
        max_sampling_rounds=r.max_sampling_rounds,
        max_staleness=r.max_staleness,
        seed=cfg.task.seed,
        cpus=parse_cpus(r.worker_cpus),
        start_timeout_s=r.start_timeout_s,
        request_timeout_s=r.request_timeout_s,
        log_file=str(log_file),
    )
