"""K data-parallel learner ranks as Ray actors: :class:`RayLearnerGroup`.

The ranks are plain :class:`trainer.learner.Learner` objects joined by one
``torch.distributed`` group (gloo on CPU, NCCL on GPU); the update, loss and checkpoint
code is the single-process learner's (see its module docstring, "Data parallel"). This
module only decides who starts the processes and where: a Ray placement group with one
bundle per rank, one actor per bundle, rendezvous at rank 0's node IP and a free port.

What the driver sees (the same methods as a single ``Learner``, so the training loop
does not branch on the placement)::

    group = RayLearnerGroup(cfg, model_dir, loss_config, pad_id, ranks=2)
    try:
        metrics = group.update(batch, advantages)   # the batch is ray.put once
        source.publish(group.weights_ref("bfloat16"), group.version)  # never via the driver
        save_checkpoint(run_dir, step, group.state_dict(), ...)
    except LearnerRankError as exc:                 # a rank died: stop, resume later
        print(f"learner rank {exc.rank} failed; resume from the last checkpoint")
    finally:
        group.close()                               # actors killed, bundles released

Weight bus (``cluster.weight_sync=broadcast``). Rank 0 is also the sender of a weight
bus (``trainer.weight_bus``, a process group of its own beside the data-parallel one):
the group is the ``BusSender`` that ``RayRolloutSource.broadcast`` drives, and rank 0
broadcasts its model's weights from where they are (its GPU with NCCL), with no copy
through the driver.

A checkpoint is rank 0's ``state_dict`` (the ranks are replicas: same weights, optimiser
state and generator), and loads into a group of any size or into one ``Learner``.

Ray is imported here only, and lazily (inside the methods): ``python -m trainer.run``
without a cluster never imports it. The worker processes import ``trainer`` themselves:
install the package in the cluster's environment (or pass
``runtime_env={"env_vars": {"PYTHONPATH": ...}}`` to ``ray.init``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.fipo import LossConfig
    from trainer.learner import Learner
    from trainer.types import RolloutBatch
    from trainer.weight_bus import BusSpec, WeightBus

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class LearnerRankError(RuntimeError):
    """A learner rank died or failed; the group is unusable (close it and resume).

    Attributes:
        rank: The rank that failed first (an actor that died is named before the ranks
            that failed because their peer vanished from a collective).
    """

    def __init__(self, rank: int, cause: BaseException):
        self.rank = rank
        super().__init__(
            f"learner rank {rank} failed ({type(cause).__name__}); the learner group stops: "
            f"close it and resume from the last checkpoint. Cause: {cause}"
        )


class _LearnerRank:
    """One rank: a ``Learner`` in a Ray actor process (wrapped by ``ray.remote`` below)."""

    def __init__(self, rank: int, world_size: int, threads: int):
        self.rank, self.world_size = rank, world_size
        self.learner: Learner | None = None
        self.bus: WeightBus | None = None
        torch.set_num_threads(max(1, threads))

    def address(self) -> tuple[str, int]:
        """This node's IP and a port free on it (rank 0 hosts the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(
        self,
        master: tuple[str, int],
        backend: str,
        timeout_s: float,
        config: TrainConfig,
        model_dir: str,
        loss_config: LossConfig,
        pad_id: int,
    ) -> None:
        import torch.distributed as dist

        from trainer.learner import Learner

        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU(s) only
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master[0]}:{master[1]}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.learner = Learner(config, model_dir, loss_config, pad_id, dist.group.WORLD)

    def update(self, payload: tuple[RolloutBatch, Sequence[np.ndarray]]) -> tuple[dict, int]:
        batch, advantages = payload
        metrics = self.learner.update(batch, advantages)
        return metrics, self.learner.version

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return self.learner.hf_state_dict()

    def put_weights(self, dtype: str | None) -> list:
        """The weights (cast to ``dtype``) put into Ray's object store by this rank.

        The reference comes back inside a list, so the driver receives the reference and
        not the tensors (Ray resolves only top-level arguments and return values).
        """
        import ray

        return [ray.put(self.learner.hf_state_dict(getattr(torch, dtype) if dtype else None))]

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> int:
        self.learner.load_state_dict(state)
        return self.learner.version

    def pid(self) -> int:
        return os.getpid()

    # The weight bus (rank 0 only). Bus failures are returned, not raised: they are the
    # rollout side's (a worker died), and must not mark the learner group broken.

    def bus_open(self, receivers: int, dtype: str | None, backend: str, timeout_s: float):
        import ray

        from trainer.weight_bus import WeightBus, make_manifest

        self.bus_close()
        state = self.learner.model.state_dict()
        device = next(iter(state.values())).device if backend == "nccl" else None
        self.bus = WeightBus.serve(
            make_manifest(state, dtype),
            receivers,
            host=ray.util.get_node_ip_address(),
            backend=backend,
            timeout_s=timeout_s,
            device=device,
        )
        return self.bus.spec

    def bus_join(self) -> str:
        return _bus_error(self.bus.wait_joined)

    def bus_send(self, version: int) -> str:
        if version != self.learner.version:  # the rollout side would serve a wrong stamp
            problem = f"the learner is at version {self.learner.version}, not {version}"
            return _bus_error(lambda: self.bus.abort(problem)) or problem  # receivers told
        return _bus_error(lambda: self.bus.send(self.learner.model.state_dict(), version))

    def bus_close(self) -> None:
        if self.bus is not None:
            self.bus.close()
            self.bus = None


def _bus_error(step) -> str:
    """``""`` when ``step()`` succeeds, else what failed (the bus is then rebuilt)."""
    try:
        step()
    except (RuntimeError, TimeoutError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


class RayLearnerGroup:
    """``ranks`` learner ranks as Ray actors; the driver-side twin of one ``Learner``.

    Needs a running Ray (``ray.init(...)`` by the caller). Blocks until every rank has
    loaded the model and joined the process group.

    Args:
        config: The trainer config, as for ``Learner`` (``model.device`` must be ``cuda``
            or ``auto`` when ``gpus_per_rank`` > 0).
        model_dir: Local HF model directory, readable at the same path on every node.
        loss_config: A ``trainer.fipo.LossConfig``.
        pad_id: Token id used for padding.
        ranks: K, the number of data-parallel ranks.
        cpus_per_rank: Ray CPUs per rank (also its torch threads, at least 1).
        gpus_per_rank: Ray GPUs per rank; > 0 selects NCCL, 0 gloo.
        strategy: Placement-group strategy: ``PACK`` (ranks on as few nodes as fit),
            ``SPREAD``, or their ``STRICT_`` forms.
        timeout_s: Collective timeout of the process group (a rank stuck on a dead
            peer gives up after this long).
        ready_timeout_s: How long to wait for the placement group's resources.

    Raises:
        LearnerRankError: A rank failed while starting.
        TimeoutError: The cluster could not place the ranks in ``ready_timeout_s``.
    """

    def __init__(
        self,
        config: TrainConfig,
        model_dir: str | Path,
        loss_config: LossConfig,
        pad_id: int,
        *,
        ranks: int,
        cpus_per_rank: float = 1.0,
        gpus_per_rank: float = 0.0,
        strategy: str = "PACK",
        timeout_s: float = 1800.0,
        ready_timeout_s: float = 300.0,
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.ranks = ranks
        self.version = 0
        self._bus_backend = "nccl" if gpus_per_rank > 0 else "gloo"
        self._broken: LearnerRankError | None = None
        self._closed = False
        self.actors: list = []
        self.placement_group = None
        bundle = {"CPU": float(cpus_per_rank)}
        if gpus_per_rank > 0:
            bundle["GPU"] = float(gpus_per_rank)
        self.placement_group = placement_group([dict(bundle) for _ in range(ranks)], strategy)
        try:
            ready, _ = ray.wait([self.placement_group.ready()], timeout=ready_timeout_s)
            if not ready:
                raise TimeoutError(
                    f"Ray could not place {ranks} learner ranks of {bundle} ({strategy}) in "
                    f"{ready_timeout_s:.0f} s: too few resources in the cluster"
                )
            remote = ray.remote(_LearnerRank)
            for rank in range(ranks):
                options = remote.options(
                    num_cpus=cpus_per_rank,
                    num_gpus=gpus_per_rank,
                    max_restarts=0,  # a dead rank stops the run; it never rejoins
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group,
                        placement_group_bundle_index=rank,
                    ),
                )
                self.actors.append(options.remote(rank, ranks, int(cpus_per_rank)))
            master = self._gather([self.actors[0].address.remote()])[0]
            backend = "nccl" if gpus_per_rank > 0 else "gloo"
            args = (master, backend, timeout_s, config, str(model_dir), loss_config, pad_id)
            self._gather([a.setup.remote(*args) for a in self.actors])
        except BaseException:
            self.close()
            raise

    # --- calls on every rank --------------------------------------------------------

    def _gather(self, refs: list, grace_s: float = 2.0) -> list:
        """Every rank's result, in rank order; the first failure as ``LearnerRankError``.

        Results are taken as they come (``ray.wait``), so a dead rank is seen at once
        even while the others block in a collective waiting for it. After a failure the
        others get ``grace_s`` to fail too, and a rank whose actor died is named before
        the ranks that only lost their peer.
        """
        import ray
        from ray.exceptions import RayActorError, RayError

        if self._closed:
            raise RuntimeError("the learner group is closed")
        if self._broken is not None:
            raise self._broken
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, results = list(refs), {}
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[rank_of[ref]] = ray.get(ref)
            except RayError as first:
                failures = {rank_of[ref]: first}
                done, _ = ray.wait(pending, num_returns=len(pending), timeout=grace_s)
                for other in done:
                    try:
                        ray.get(other)
                    except RayError as exc:
                        failures[rank_of[other]] = exc
                dead = [r for r, e in sorted(failures.items()) if isinstance(e, RayActorError)]
                rank = dead[0] if dead else rank_of[ref]
                self._broken = LearnerRankError(rank, failures[rank])
                raise self._broken from failures[rank]
        return [results[rank] for rank in range(len(refs))]

    def update(self, batch: RolloutBatch, advantages: Sequence[np.ndarray]) -> dict[str, float]:
        """``Learner.update`` on every rank over the same batch (sent once, ``ray.put``).

        Returns:
            Rank 0's metrics: pooled over every rank, except ``perf/…`` timings and
            thread counts, which are rank 0's own (``perf/learner_padded_tokens`` is the
            sum over the ranks).

        Raises:
            LearnerRankError: A rank died or failed (now or in an earlier call).
        """
        import ray

        payload = ray.put((batch, list(advantages)))
        results = self._gather([a.update.remote(payload) for a in self.actors])
        metrics, self.version = results[0]
        return metrics

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Rank 0's weights under HF names (every rank holds the same)."""
        return self._gather([self.actors[0].hf_state_dict.remote()])[0]

    def weights_ref(self, dtype: str | None = None):
        """Rank 0's weights under HF names, cast to ``dtype``, as a Ray object reference.

        What ``RayRolloutSource.publish`` takes: rank 0 casts (a bf16 engine gets half the
        bytes) and puts the tensors into its node's object store, and each rollout actor
        fetches them from there; the driver never holds them (``hf_state_dict`` would
        copy them into the driver, then ``publish`` would put them back: two more copies
        of the weights per step, measured in ``benchmarks/bench_scale.py --parts publish``).

        Raises:
            LearnerRankError: Rank 0 died or failed.
        """
        return self._gather([self.actors[0].put_weights.remote(dtype)])[0][0]

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's ``Learner.state_dict`` (the ranks are replicas): a checkpoint."""
        return self._gather([self.actors[0].state_dict.remote()])[0]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a ``Learner.state_dict`` (from any number of ranks) into every rank."""
        import ray

        ref = ray.put(dict(state))
        self.version = self._gather([a.load_state_dict.remote(ref) for a in self.actors])[0]

    # --- weight-bus sender (``trainer.rollout.ray_source.BusSender``): rank 0 -----------

    def open_bus(self, receivers: int, dtype: str | None, timeout_s: float) -> BusSpec:
        """Rank 0 opens a new weight bus for ``receivers`` (leaving the previous one) with
        its model's manifest (floats in ``dtype``); returns where to join it."""
        ref = self.actors[0].bus_open.remote(receivers, dtype, self._bus_backend, timeout_s)
        return self._gather([ref])[0]

    def join_bus_async(self):
        """Rank 0 waits for the receivers to join (a Ray ref: ``bus_result`` awaits it)."""
        return self.actors[0].bus_join.remote()

    def send_async(self, version: int):
        """Rank 0 broadcasts its weights as ``version`` (a Ray ref for ``bus_result``)."""
        return self.actors[0].bus_send.remote(int(version))

    def bus_result(self, ref) -> str:
        """``""`` or what failed on the bus.

        Raises:
            LearnerRankError: Rank 0 died.
        """
        return self._gather([ref])[0]

    def close(self) -> None:
        """Kill the rank actors and remove the placement group (idempotent).

        No graceful teardown of the process group: a rank may be blocked in a collective
        on a dead peer, and killing the processes ends it either way.
        """
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
        self._closed = True

    def __enter__(self) -> RayLearnerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
