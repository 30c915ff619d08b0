"""The rollout worker: a process that owns an engine and fills rollout batches.

Loop of the worker (``worker_main``), which runs in its own spawned process:

1. apply control messages from the learner side: new weights (a file path + version,
   or ``join_bus`` / ``receive`` on a weight bus, ``trainer.weight_bus``), eval-style
   ``generate`` requests, ``stop``;
2. wait until the next batch is allowed (bounded staleness, below);
3. fill a batch: draw ``prompts_per_round`` problems from the ``fipo_env`` vector env
   (``group_size`` sub-envs per problem), sample ``n = G`` responses per prompt, feed them
   to the env's ``step_tokens`` so the env decides termination and reward, build one
   ``RolloutGroup`` per prompt stamped with the policy version that generated it, and
   (dynamic sampling) drop groups whose verdicts (``rollout.filter_metric``) are all
   equal, repeating for at most
   ``rollout.max_sampling_rounds`` rounds until ``rollout.prompts_per_step`` groups
   are kept;
4. hand the batch to the learner through a bounded queue.

Bounded staleness. The learner takes batches in order and publishes one new policy
version per batch it trains on (versions ``v0 + 1, v0 + 2, ...``), so batch ``b`` (0-based)
is trained on when the learner is at version ``v0 + b``. The worker starts batch ``b`` only
once it serves a version ``>= v0 + b - max_staleness``, so every group is at most
``max_staleness`` versions old when it is used; ``max_staleness = 0`` is synchronous
on-policy training (generate, train, sync, generate...).

Everything that crosses the process boundary through a queue is small (a path, a
version, a counter); batches, requests and replies travel as pickle files in a private
RAM-backed folder (``trainer.rollout.procs``). A pipe message under 4 KiB is written
atomically, so a worker that dies mid-send can never leave the learner blocked on half
a message.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fipo_env.models import offline_hub
from trainer.engines.base import Engine, EngineConfig, SamplingConfig, make_engine
from trainer.rollout.config import RolloutWorkerConfig, WorkerStart
from trainer.rollout.groups import build_groups, keep_informative
from trainer.rollout.procs import POLL_S, die_with_parent, read_pickle, write_pickle
from trainer.types import RolloutBatch, RolloutGroup

if TYPE_CHECKING:
    from fipo_env.envs.vector import MathReasoningVectorEnv, ObsType


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
        self.venv: MathReasoningVectorEnv | None = None
        self.obs: ObsType | None = None
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
        elif kind == "join_bus":
            _, req_id, spec, rank = msg
            self.bus_call(req_id, lambda: self.engine.join_bus(spec, rank))
        elif kind == "receive":
            _, req_id, version = msg
            self.bus_call(req_id, lambda: self.receive(int(version)))
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

    def receive(self, version: int) -> None:
        # A receive that fails part-way leaves a mix of two versions: no version at all
        # (-1, below every batch's need) until the next full one.
        self.version = -1
        self.engine.receive_weights(version)
        self.version = version

    def bus_call(self, req_id: int, call) -> None:
        """Run a weight-bus step; its failure is answered, not fatal (the learner side
        rebuilds the bus), and acknowledged with the version served afterwards."""
        error = ""
        try:
            call()
        except Exception:
            traceback.print_exc()  # the worker's log
            error = traceback.format_exc()[-3000:]
        self.events.put(("bus", req_id, self.version, error))

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
        return self.base_version + self.next_batch - self.cfg.rollout.max_staleness

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
        client_before = self.client_stats()
        kept: list[RolloutGroup] = []
        last: list[RolloutGroup] = []
        generated = tokens = 0
        for _ in range(cfg.rollout.max_sampling_rounds):
            self.drain()  # newer weights between rounds keep groups fresh
            last, round_tokens = self.run_round()
            generated += len(last)
            tokens += round_tokens
            if cfg.rollout.dynamic_sampling:
                kept.extend(keep_informative(last, cfg.rollout.filter_metric))
            else:
                kept.extend(last)
            if len(kept) >= cfg.rollout.prompts_per_step:
                break
        groups = kept[: cfg.rollout.prompts_per_step] or last[: cfg.rollout.prompts_per_step]
        if len(groups) < cfg.rollout.prompts_per_step or not kept:
            # Logged here (the worker's log) and by the learner (rollout/short_batch).
            print(
                f"[rollout] batch {self.next_batch}: {len(kept)} informative group(s) of "
                f"{cfg.rollout.prompts_per_step} after {cfg.rollout.max_sampling_rounds} "
                f"round(s) ({generated} generated)"
                + ("; the batch holds the last round's groups" if not kept else ""),
                flush=True,
            )
        return RolloutBatch(
            groups=tuple(groups),
            num_generated_groups=generated,
            gen_seconds=time.perf_counter() - start,
            gen_tokens=tokens,
            reward_client={k: v - client_before[k] for k, v in self.client_stats().items()},
        )

    def client_stats(self) -> dict[str, int]:
        """The reward client's counters so far (``requests``, ``retries``, ``failovers``);
        empty when the env scores with something else (a local verifier)."""
        stats = getattr(getattr(self.venv, "verifier", None), "stats", None)
        return dict(vars(stats())) if callable(stats) else {}

    def make_env(self) -> None:
        import gymnasium as gym

        import fipo_env

        cfg = self.cfg
        self.venv = gym.make_vec(
            fipo_env.ENV_ID,
            num_envs=cfg.round_prompts * cfg.rollout.group_size,
            group_size=cfg.rollout.group_size,
            autoreset_mode="SameStep",
            **cfg.env_kwargs(),
        )
        self.sampling = cfg.sampling(self.venv.stop_ids)
        # A restarted worker (or a resumed run) draws a different problem stream.
        seed = np.random.SeedSequence([cfg.seed, self.base_version, self.restarts])
        self.obs, _ = self.venv.reset(seed=int(seed.generate_state(1)[0]))

    def run_round(self) -> tuple[list[RolloutGroup], int]:
        """Sample G responses for each of the env's current prompts and score them."""
        if self.venv is None:
            self.make_env()
        g_size = self.cfg.rollout.group_size
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
    die_with_parent()
    offline_hub()  # before the engine imports transformers / vLLM
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
