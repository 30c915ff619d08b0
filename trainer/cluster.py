"""The Ray placement of a run (``cluster.address`` set): :class:`RayPlacement`.

Same three parts as ``trainer.placement.LocalPlacement``, started as Ray actors, each
role in its own placement group (one bundle per process, ``cluster.strategy``):

==================  ==========================================  ==========================
role                what runs in each actor                     built by
==================  ==========================================  ==========================
reward replicas     one ``python -m server`` (math-verify pool)  ``server.ray_replicas``
learner ranks       one ``Learner`` in a gloo / NCCL group       ``trainer.learner_group``
rollout workers     one ``ProcessRolloutSource`` (engine + env)  ``trainer.rollout.ray_source``
==================  ==========================================  ==========================

The driver (``python -m trainer.run``) keeps the training loop, eval, checkpoints and
logs. Faults, as the three classes handle them: a rollout worker that dies is restarted
by Ray and its prompts are asked again (``rollout/reissued_prompts``); a reward replica
that dies is failed over by the client (``reward/client_failovers``); a learner rank that
dies raises ``LearnerRankError`` and the run stops with the last checkpoint to resume.

Ray is imported here only, when a ``RayPlacement`` is built: the single-machine path
never imports it. The actors import ``trainer`` and ``server``: this repository is put on
their ``PYTHONPATH`` (harmless when the package is installed on every node).
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainer.config import TrainConfig
    from trainer.fipo import LossConfig
    from trainer.learner_group import RayLearnerGroup
    from trainer.rollout import RayRolloutSource, RolloutWorkerConfig

#: The folder that holds the ``trainer``, ``server`` and ``fipo_env`` packages.
REPO_ROOT = Path(__file__).resolve().parents[1]


def init_ray(address: str, num_cpus: int = 0) -> bool:
    """Start (``local``) or join (``auto``, ``host:port``) Ray; returns whether this
    process connected it (and so should shut it down).

    ``local`` is always a new private instance (``ray.init(address="local")``): a bare
    ``ray.init()`` would join any cluster already running on a shared machine. Ray's
    SIGTERM handler (an immediate ``sys.exit``) is undone: the trainer's own handler
    stops after the step with a checkpoint.
    """
    import ray

    if ray.is_initialized():
        return False
    if address not in ("local", "auto"):
        check_reachable(address)
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    kwargs: dict = {
        "runtime_env": {"env_vars": {"PYTHONPATH": path}},
        "log_to_driver": False,  # each worker and server writes its own log file
    }
    if address == "local":
        kwargs.update(include_dashboard=False, num_cpus=num_cpus or None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(address=address, **kwargs)
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast when nothing listens at a cluster's ``host:port`` (Ray itself would retry
    connecting to it for minutes).

    Raises:
        ConnectionError: The head's port does not accept a TCP connection.
    """
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(
            f"nothing accepts connections at {address} ({exc}); is the head started "
            f"(ray start --head --port={port})?"
        ) from None


class RayPlacement:
    """Reward replicas, learner ranks and rollout workers as Ray actors.

    Args:
        cfg: The run's config; ``cfg.cluster`` says where and how many.
        run_dir: The run folder (reward-replica logs go to its ``fipo-reward-replicas/``
            and rollout-worker logs beside the single-machine one, on the node each runs).

    Raises:
        ConnectionError: Ray could not be started or joined (the message says how to fix).
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.replicas = None
        self.model_dir: Path | None = None
        self.source: RayRolloutSource | None = None
        self.group: RayLearnerGroup | None = None
        self._closers: list[Callable[[], None]] = []
        c = cfg.cluster
        try:
            owns = init_ray(c.address.strip(), c.num_cpus)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConnectionError(
                f"cluster.address={c.address!r}: could not start or join Ray ({exc}). "
                "Use cluster.address=local for a Ray instance on this machine, or start "
                "the cluster first (ray start --head; see docs/scale.md)"
            ) from exc
        if owns:
            import ray

            self._closers.append(ray.shutdown)

    def describe(self) -> str:
        """One line: the cluster's nodes and resources, and the layout asked for."""
        import ray

        c = self.cfg.cluster
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        res = ray.cluster_resources()
        return (
            f"Ray cluster: {nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} "
            f"GPU; {c.rollout_workers} rollout worker(s) x {c.rollout_cpus:g} CPU "
            f"{c.rollout_gpus:g} GPU, {c.reward_replicas} reward replica(s) x "
            f"{c.reward_cpus:g} CPU, {c.learner_ranks} learner rank(s) x "
            f"{c.learner_rank_cpus:g} CPU {c.learner_rank_gpus:g} GPU, {c.strategy}"
        )

    def reward_address(self) -> str:
        from server.ray_replicas import RewardReplicas

        if self.cfg.rollout.reward_address:
            return self.cfg.rollout.reward_address
        c = self.cfg.cluster
        self.replicas = RewardReplicas(
            c.reward_replicas,
            workers_per_replica=self.cfg.rollout.reward_workers,
            cpus_per_replica=c.reward_cpus,
            strategy=c.strategy,
            port=c.reward_port,
            max_restarts=c.max_restarts,
            start_timeout_s=c.ready_timeout_s,
            log_dir=str(self.run_dir),
        )
        self._closers.append(self.replicas.close)
        return self.replicas.address

    def learner(self, model_dir: Path, loss_config: LossConfig, pad_id: int) -> RayLearnerGroup:
        from trainer.learner_group import RayLearnerGroup

        c = self.cfg.cluster
        self.model_dir = model_dir
        group = RayLearnerGroup(
            self.cfg,
            model_dir,
            loss_config,
            pad_id,
            ranks=c.learner_ranks,
            cpus_per_rank=c.learner_rank_cpus,
            gpus_per_rank=c.learner_rank_gpus,
            strategy=c.strategy,
            ready_timeout_s=c.ready_timeout_s,
        )
        self._closers.append(group.close)
        self.group = group
        return group

    def rollout_source(
        self,
        worker_cfg: RolloutWorkerConfig,
        initial_version: int,
        initial_weights: Mapping[str, torch.Tensor] | None,
    ) -> RayRolloutSource:
        from trainer.rollout import RayRolloutSource

        c = self.cfg.cluster
        # Each worker's engine uses its bundle's CPUs, not this machine's cores.
        threads = self.cfg.rollout.engine_threads or max(1, int(c.rollout_cpus))
        worker_cfg = dataclasses.replace(
            worker_cfg, engine=dataclasses.replace(worker_cfg.engine, cpu_threads=threads)
        )
        self.source = RayRolloutSource(
            worker_cfg,
            num_workers=c.rollout_workers,
            cpus_per_worker=c.rollout_cpus,
            gpus_per_worker=c.rollout_gpus,
            strategy=c.strategy,
            max_worker_failures=c.max_restarts,
            initial_version=initial_version,
            initial_weights=initial_weights,
            autostart=False,  # the first eval runs before rollouts compete for the CPU
            # Broadcast: learner rank 0 sends (built before the source, see trainer.run).
            sender=self.group if c.weight_sync == "broadcast" else None,
            bus_timeout_s=c.bus_timeout_s,
        )
        self._closers.append(self.source.close)
        return self.source

    def publish(self, learner: RayLearnerGroup, source: RayRolloutSource) -> None:
        """``cluster.weight_sync``: rank 0 broadcasts to every engine, or rank 0 casts the
        weights to the engine's dtype and puts them into Ray's object store, and the
        rollout actors fetch them from there (never through this process)."""
        if self.cfg.cluster.weight_sync == "broadcast":
            source.broadcast(learner.version)
        else:
            source.publish(learner.weights_ref(source.wire_dtype), learner.version)

    def metrics(self) -> dict[str, float]:
        """``rollout/reissued_prompts`` and ``rollout/worker_restarts`` (run totals)."""
        return self.source.metrics() if self.source is not None else {}

    def save_model(self, learner: RayLearnerGroup, folder: Path) -> None:
        """Rank 0's weights as a Hugging Face folder, from a weightless (meta) skeleton of
        the model: the driver never holds a second copy of the parameters."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        skeleton.save_pretrained(folder, state_dict=learner.hf_state_dict())

    def close(self) -> None:
        """Rollout workers, learner ranks, reward replicas, then Ray (if started here);
        each step runs even when an earlier one fails."""
        errors = []
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                errors.append(exc)
        if errors:
            raise errors[0]
