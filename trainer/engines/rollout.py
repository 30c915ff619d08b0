"""The rollout worker: a process that owns an engine and fills rollout batches.

Loop of the worker (``worker_main``), which runs in its own spawned process:

1. apply control messages from the learner side: new weights (a file path + version),
   eval-style ``generate`` requests, ``stop``;
2. wait until the next batch is allowed (bounded staleness, below);
3. fill a batch: draw ``prompts_per_round`` problems from the ``fipo_env`` vector env
   (``group_size`` sub-envs per problem), sample ``n = G`` responses per prompt, feed them
   to the env's ``step_tokens`` so the env decides termination and reward, build one
   ``RolloutGroup`` per prompt stamped with the policy version that generated it, and
   (dynamic sampling) drop groups whose rewards are all equal, repeating for at most
   ``max_sampling_rounds`` rounds until ``groups_per_batch`` groups are kept;
4. hand the batch to the learner through a bounded queue.

Bounded staleness. The learner takes batches in order and publishes one new policy
version per batch it trains on (versions ``v0 + 1, v0 + 2, ...``), so batch ``b`` (0-based)
is trained on when the learner is at version ``v0 + b``. The worker starts batch ``b`` only
once it serves a version ``>= v0 + b - max_staleness``, so every group is at most
``max_staleness`` versions old when it is used; ``max_staleness = 0`` is synchronous
on-policy training (generate, train, sync, generate...).

Everything that crosses the process boundary through a queue is small (a path, a
version, a counter); batches, requests and replies travel as pickle files in a private
RAM-backed folder. A pipe message under 4 KiB is written atomically, so a worker that
dies mid-send can never leave the learner blocked on half a message.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from trainer.engines.base import Engine, EngineConfig, SamplingConfig, make_engine
from trainer.types import Generation, RolloutBatch, RolloutGroup

# Seconds between liveness checks while a loop waits on a queue.
POLL_S = 0.2


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


def write_pickle(obj: Any, path: Path) -> Path:
    """Pickle ``obj`` to ``path`` atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return path


def read_pickle(path: str | Path, delete: bool = True) -> Any:
    """Load a pickle file written by ``write_pickle`` (and delete it)."""
    with open(path, "rb") as f:
        obj = pickle.load(f)
    if delete:
        Path(path).unlink(missing_ok=True)
    return obj


def build_groups(
    prompts: Sequence[Sequence[int]],
    generations: Sequence[Sequence[Generation]],
    consumed: Sequence[int],
    rewards: Sequence[float],
    correct: Sequence[bool],
    truncated: Sequence[bool],
    version: int,
    problems: Sequence[str] = (),
    answers: Sequence[str] = (),
) -> list[RolloutGroup]:
    """Assemble one ``RolloutGroup`` per prompt from engine output and env verdicts.

    Args:
        prompts: Prompt token ids, one per group.  # P x [P_i]
        generations: ``generations[g][j]``, sample j of prompt g.  # P x G
        consumed: Tokens the env accepted per sample (flattened row-major).  # [P*G]
        rewards: Env reward per sample.  # [P*G]
        correct: Verifier verdict per sample.  # [P*G]
        truncated: Whether the env truncated the sample at the length limit.  # [P*G]
        version: Policy version that generated the samples.
        problems: Problem text per group (for logs).
        answers: Gold answer per group (for logs).
    """
    groups = []
    for g, (prompt, gens) in enumerate(zip(prompts, generations, strict=True)):
        rows = range(g * len(gens), (g + 1) * len(gens))
        resp, logp = [], []
        for gen, i in zip(gens, rows, strict=True):
            n = int(consumed[i])
            if not 0 < n <= len(gen.token_ids):
                raise RuntimeError(
                    f"env consumed {n} tokens of a {len(gen.token_ids)}-token response"
                )
            resp.append(tuple(gen.token_ids[:n]))
            logp.append(tuple(gen.logprobs[:n]))
        groups.append(
            RolloutGroup(
                prompt_ids=tuple(int(t) for t in prompt),
                response_ids=tuple(resp),
                behaviour_logp=tuple(logp),
                rewards=np.asarray([rewards[i] for i in rows], dtype=np.float64),
                correct=np.asarray([bool(correct[i]) for i in rows], dtype=bool),
                truncated=np.asarray([bool(truncated[i]) for i in rows], dtype=bool),
                policy_version=version,
                problem=str(problems[g]) if g < len(problems) else "",
                answer=str(answers[g]) if g < len(answers) else "",
            )
        )
    return groups


def keep_informative(groups: Sequence[RolloutGroup]) -> list[RolloutGroup]:
    """DAPO dynamic sampling: the groups whose rewards are not all equal."""
    from trainer.advantages import dynamic_sampling_mask

    if not groups:
        return []
    keep = dynamic_sampling_mask(np.stack([g.rewards for g in groups]))
    return [g for g, k in zip(groups, keep, strict=True) if k]


def start_engine(cfg: EngineConfig) -> tuple[Engine, str]:
    """Build the engine; with ``kind="auto"``, fall back to HF ``generate`` if vLLM fails.

    Returns:
        ``(engine, note)``: ``note`` is empty, or one line saying why the fallback ran.
    """
    try:
        return make_engine(cfg), ""
    except Exception as exc:
        if cfg.kind != "auto" or cfg.resolved_kind() != "vllm":
            raise  # an explicit engine fails loudly
        traceback.print_exc()  # the whole story goes to the worker's log
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        note = (
            f"vLLM could not start ({reason}); falling back to Hugging Face generate "
            "(slower). Set rollout.engine=vllm to make this an error instead."
        )
        return make_engine(replace(cfg, kind="hf")), note


class _Stop(Exception):
    """The learner side asked the worker to stop."""


class _Worker:
    """State of the worker process (see the module docstring for the loop)."""

    def __init__(
        self, cfg: RolloutWorkerConfig, start: WorkerStart, ctrl, events, batches, busy=None
    ):
        self.cfg = cfg
        self.busy = busy  # shared flag: 1 while generating
        self.ctrl, self.events, self.batches = ctrl, events, batches
        self.io_dir = Path(start.io_dir)
        self.base_version = start.base_version
        self.next_batch = start.next_batch
        self.started = start.started
        self.restarts = start.restarts
        self.engine, self.engine_note = start_engine(cfg.engine)
        self.version = start.version
        if start.weights_path is not None:
            self.engine.load_weights(start.weights_path)
        self.venv: Any = None
        self.obs: Any = None
        self.sampling: SamplingConfig | None = None
        # Built before "ready" so a bad task / verifier spec fails the start, clearly,
        # instead of crashing (and restarting) the worker at its first batch.
        self.make_env()

    # ---------------------------------------------------------------- control messages

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "stop":
            raise _Stop
        if kind == "start":
            self.started = True
        elif kind == "weights":
            _, path, version = msg
            self.engine.load_weights(path)
            self.version = int(version)
            self.events.put(("loaded", self.version))
        elif kind == "generate":
            _, req_id, path = msg
            prompts, n, sampling = read_pickle(path, delete=False)  # the source deletes it
            with self.generating():
                out = self.engine.generate(prompts, n, sampling)
            reply = write_pickle((out, self.version), self.io_dir / f"reply-{req_id}.pkl")
            self.events.put(("generated", req_id, str(reply)))
        elif kind == "ping":
            state = {
                "version": self.version,
                "next_batch": self.next_batch,
                "waiting_for_version": self.needed_version(),
                "started": self.started,
            }
            self.events.put(("pong", msg[1], state))
        else:
            raise ValueError(f"unknown control message {kind!r}")

    def drain(self) -> None:
        """Apply every pending control message without blocking."""
        while True:
            try:
                msg = self.ctrl.get_nowait()
            except queue.Empty:
                return
            self.handle(msg)

    def wait_message(self) -> None:
        """Block until one control message arrives (exit if the learner process is gone)."""
        import multiprocessing as mp

        parent = mp.parent_process()
        while True:
            try:
                msg = self.ctrl.get(timeout=POLL_S * 5)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    raise _Stop from None
                continue
            self.handle(msg)
            return

    # ---------------------------------------------------------------- batches

    def needed_version(self) -> int:
        """Oldest policy version allowed to generate batch ``next_batch``."""
        return self.base_version + self.next_batch - self.cfg.max_staleness

    def run(self) -> None:
        kind = "hf" if self.engine_note else self.cfg.engine.resolved_kind()
        self.events.put(("ready", self.version, kind, self.engine_note[:1000]))
        try:
            while True:
                self.drain()
                if not self.started or self.version < self.needed_version():
                    self.wait_message()
                    continue
                with self.generating():
                    batch = self.make_batch()
                self.put_batch(batch)
        except _Stop:
            pass
        finally:
            if self.venv is not None:
                self.venv.close()
            self.engine.close()

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Raise the shared busy flag for the duration (the learner reads it)."""
        if self.busy is not None:
            self.busy.value = 1
        try:
            yield
        finally:
            if self.busy is not None:
                self.busy.value = 0

    def put_batch(self, batch: RolloutBatch) -> None:
        path = write_pickle(batch, self.io_dir / f"batch-{self.next_batch:08d}.pkl")
        while True:
            try:
                self.batches.put((self.next_batch, str(path)), timeout=POLL_S)
                break
            except queue.Full:
                self.drain()  # stay responsive (weight syncs, eval) while the queue is full
        self.next_batch += 1

    def make_batch(self) -> RolloutBatch:
        cfg = self.cfg
        start = time.perf_counter()
        kept: list[RolloutGroup] = []
        last: list[RolloutGroup] = []
        generated = tokens = 0
        for _ in range(cfg.max_sampling_rounds):
            self.drain()  # newer weights between rounds keep groups fresh
            last, round_tokens = self.run_round()
            generated += len(last)
            tokens += round_tokens
            kept.extend(keep_informative(last) if cfg.dynamic_sampling else last)
            if len(kept) >= cfg.groups_per_batch:
                break
        groups = kept[: cfg.groups_per_batch] or last[: cfg.groups_per_batch]
        return RolloutBatch(
            groups=tuple(groups),
            num_generated_groups=generated,
            gen_seconds=time.perf_counter() - start,
            gen_tokens=tokens,
        )

    def make_env(self) -> None:
        import gymnasium as gym

        import fipo_env
        from server.types import RewardScheme

        cfg = self.cfg
        self.venv = gym.make_vec(
            fipo_env.ENV_ID,
            num_envs=cfg.round_prompts * cfg.group_size,
            group_size=cfg.group_size,
            tokenizer=cfg.engine.model_dir,
            task=cfg.task,
            verifier=cfg.verifier,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_response_tokens=cfg.max_response_tokens,
            reward_scheme=RewardScheme(cfg.reward_scheme),
            overlong_buffer=cfg.overlong_buffer or None,
            autoreset_mode="SameStep",
        )
        self.sampling = cfg.sampling(self.venv.stop_ids)
        # A restarted worker (or a resumed run) draws a different problem stream.
        seed = np.random.SeedSequence([cfg.seed, self.base_version, self.restarts])
        self.obs, _ = self.venv.reset(seed=int(seed.generate_state(1)[0]))

    def run_round(self) -> tuple[list[RolloutGroup], int]:
        """Sample G responses for each of the env's current prompts and score them."""
        if self.venv is None:
            self.make_env()
        g_size = self.cfg.group_size
        obs = self.obs
        n_prompts = self.venv.num_envs // g_size
        heads = [g * g_size for g in range(n_prompts)]  # first sub-env of each group
        prompts = [obs["prompt_ids"][i, : obs["prompt_len"][i]].tolist() for i in heads]
        problems = [self.venv.problems[i] for i in heads]
        version = self.version
        gens = self.engine.generate(prompts, g_size, self.sampling)
        rows = [np.asarray(gen.token_ids, dtype=np.int64) for group in gens for gen in group]
        self.obs, rewards, terminated, truncated, infos = self.venv.step_tokens(rows)
        ended = terminated | truncated
        if not ended.all():
            raise RuntimeError(
                f"the env did not end {int((~ended).sum())} episode(s) after a whole response: "
                "engine stop tokens / max_tokens disagree with the env's"
            )
        groups = build_groups(
            prompts,
            gens,
            infos["tokens_consumed"],
            rewards,
            infos["final_info"]["correct"],
            truncated,
            version,
            problems=[p.question for p in problems],
            answers=[p.gold for p in problems],
        )
        return groups, sum(len(r) for r in rows)


def _die_with_parent() -> None:
    """Take this worker's whole process group down when its parent dies, even by SIGKILL.

    ``PR_SET_PDEATHSIG`` signals only this process, and vLLM's EngineCore / worker
    processes (and the verifier pool) are its children: killed alone, they would live on
    as orphans. So the death signal is SIGTERM, handled by SIGKILLing our own process group,
    and a watchdog thread does the same when the parent changes, in case the handler cannot
    run (vLLM may install its own, or the main thread may sit in a long C call).
    """
    parent = os.getppid()

    def kill_group(*_: Any) -> None:
        if os.getpgrp() == os.getpid():  # never the learner's group: only one we lead
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_group)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                kill_group()

    threading.Thread(target=watch, name="fipo-parent-watch", daemon=True).start()


def worker_main(
    cfg: RolloutWorkerConfig, start: WorkerStart, ctrl, events, batches, busy=None
) -> None:
    """Entry point of the rollout worker process (spawned by ``ProcessRolloutSource``)."""
    # Own process group: the source can kill vLLM's EngineCore / worker processes together
    # with this one, even if this process died without shutting them down.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if cfg.log_file:
        # Third-party warnings (vLLM, NUMA, Triton...) that a user cannot act on go to the
        # run's log; the learner's console keeps its progress bar and summaries.
        fd = os.open(cfg.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    _die_with_parent()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine_cfg = cfg.engine
    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cfg.cpus)
        if engine_cfg.cpu_threads is None:
            engine_cfg = replace(engine_cfg, cpu_threads=len(cfg.cpus))
            cfg = replace(cfg, engine=engine_cfg)
    try:
        worker = _Worker(cfg, start, ctrl, events, batches, busy)
    except BaseException:
        # Keep the message under the pipe's atomic-write size (see the module docstring).
        events.put(("fatal", traceback.format_exc()[-3000:]))
        raise SystemExit(1) from None
    try:
        worker.run()
    except BaseException:
        events.put(("error", traceback.format_exc()[-3000:]))
        raise SystemExit(1) from None
