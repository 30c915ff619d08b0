"""Settings of the rollout worker process, derived from the trainer's config.

Every rollout setting is declared once, in ``trainer.config.RolloutConfig``;
:func:`rollout_worker_config` is the one function that derives the worker's (and, through
:meth:`RolloutWorkerConfig.env_kwargs`, the env's) settings from a ``TrainConfig``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import RewardSchemeName, RolloutConfig, parse_cpus
from trainer.engines.base import EngineConfig, SamplingConfig

if TYPE_CHECKING:
    from trainer.config import TrainConfig


@dataclass(frozen=True)
class RolloutWorkerConfig:
    """Settings of the rollout worker process and the batches it makes.

    The sampling, batch, staleness, length and timeout settings are the trainer's
    ``rollout`` section (:class:`trainer.config.RolloutConfig`), declared, documented and
    validated there once; this record adds what only the worker needs.
    :func:`rollout_worker_config` derives it from a whole ``TrainConfig``.

    Attributes:
        engine: Which engine to run and how (model directory, vLLM or HF, dtype, seed).
        rollout: Group size (``group_size``), groups per batch (``prompts_per_step``),
            prompt and response limits, temperature / top-p, the overlong buffer, dynamic
            sampling and its round bound, ``max_staleness``, the start / request
            timeouts and the worker's CPU pinning (``worker_cpus``). Its engine fields
            (``engine``, ``dtype``, ...) are not read here: ``engine`` holds them.
        task: ``fipo_env`` task spec of the training problems (``"arithmetic"``,
            ``"arithmetic:0,1"``, ``"file:/data/train.jsonl"``, ...); its train split.
        system_prompt: System message of every prompt; empty keeps the chat template's.
        verifier: ``"local"`` (the reward server's worker pool inside the worker process)
            or the ``host:port`` of a running reward server (gRPC ``RewardClient``).
        reward_scheme: ``"binary"`` (1/0) or ``"signed"`` (+1/-1) verifier reward.
        seed: Seed of the problem stream (the engine's sampling seed is ``engine.seed``).
        prompts_per_round: Prompts sampled per engine call; ``0`` means
            ``rollout.prompts_per_step``. Raise it when dynamic sampling drops many groups.
        top_k: Top-k truncation (``0`` = off).
        max_restarts: How many times a crashed worker is restarted before the learner
            gets an error.
        log_file: File that receives the worker's stdout and stderr (vLLM's and other
            libraries' warnings and progress output); empty leaves them on the console.
            Failures still reach the learner as ``RolloutWorkerError`` with the traceback.
    """

    engine: EngineConfig
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: str = "arithmetic"
    system_prompt: str = ""
    verifier: str = "local"
    reward_scheme: RewardSchemeName = "binary"
    seed: int = 0
    prompts_per_round: int = 0
    top_k: int = 0
    max_restarts: int = 3
    log_file: str = ""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"RolloutWorkerConfig.{name} {rule} (got {getattr(self, name)!r})")

        need(isinstance(self.engine, EngineConfig), "engine", "must be an EngineConfig")
        need(isinstance(self.rollout, RolloutConfig), "rollout", "must be a RolloutConfig")
        need(bool(self.task.strip()), "task", "must be a fipo_env task spec")
        need(bool(self.verifier.strip()), "verifier", "must be 'local' or host:port")
        need(self.reward_scheme in ("binary", "signed"), "reward_scheme", "must be binary|signed")
        need(self.prompts_per_round >= 0, "prompts_per_round", "must be >= 0 (0 = auto)")
        need(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        r = self.rollout
        if r.max_prompt_tokens + r.max_response_tokens > self.engine.max_model_len:
            raise ValueError(
                f"rollout.max_response_tokens ({r.max_response_tokens}) plus "
                f"rollout.max_prompt_tokens ({r.max_prompt_tokens}) must fit "
                f"engine.max_model_len={self.engine.max_model_len}"
            )
        # Validates top_k with SamplingConfig's own message.
        self.sampling(stop_token_ids=())

    @property
    def round_prompts(self) -> int:
        """Prompts per generation round (``prompts_per_round`` or ``prompts_per_step``)."""
        return self.prompts_per_round or self.rollout.prompts_per_step

    @property
    def cpus(self) -> tuple[int, ...]:
        """CPU ids the worker (and vLLM's threads) are pinned to; ``()`` = no pinning."""
        return parse_cpus(self.rollout.worker_cpus)

    def sampling(self, stop_token_ids: Sequence[int]) -> SamplingConfig:
        """The engine's sampling settings for rollouts."""
        return SamplingConfig(
            max_tokens=self.rollout.max_response_tokens,
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            top_k=self.top_k,
            stop_token_ids=tuple(stop_token_ids),
        )

    def env_kwargs(self, max_response_tokens: int | None = None) -> dict[str, Any]:
        """Settings of the ``fipo_env`` math env that poses and scores this worker's problems.

        Args:
            max_response_tokens: ``None`` for training rollouts (``rollout``'s limit and
                overlong buffer); a number for held-out eval, which uses that limit and
                scores answers without the overlong penalty.
        """
        from fipo_env.config import PromptTemplate
        from server.types import RewardScheme

        training = max_response_tokens is None
        prompt = {"prompt": PromptTemplate(system=self.system_prompt)} if self.system_prompt else {}
        return {
            **prompt,
            "tokenizer": self.engine.model_dir,
            "task": self.task,
            "verifier": self.verifier,
            "max_prompt_tokens": self.rollout.max_prompt_tokens,
            "max_response_tokens": self.rollout.max_response_tokens
            if training
            else max_response_tokens,
            "reward_scheme": RewardScheme(self.reward_scheme),
            "overlong_buffer": (self.rollout.overlong_buffer or None) if training else None,
        }


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
    learner = cfg.model.num_threads  # 0: the learner uses every core, so split them
    return max(1, cores - learner if learner else cores // 2)


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
    engine = EngineConfig(
        model_dir=str(model_dir),
        kind=r.engine,
        dtype=r.dtype,
        seed=cfg.run.seed,
        gpu_memory_utilization=r.gpu_memory_utilization,
        kv_cache_gib=r.kv_cache_gib,
        max_num_seqs=r.prompts_per_step * r.group_size,
        cpu_threads=engine_threads(cfg),
        max_model_len=r.max_prompt_tokens + max(r.max_response_tokens, cfg.eval_max_tokens),
    )
    return RolloutWorkerConfig(
        engine=engine,
        rollout=r,
        task=cfg.task.spec,
        system_prompt=cfg.task.system_prompt,
        verifier=verifier,
        reward_scheme=cfg.algorithm.reward_scheme,
        seed=cfg.task.seed,
        log_file=str(log_file),
    )
