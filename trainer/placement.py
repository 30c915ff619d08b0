"""Who starts the run's processes, and where: the one thing a placement decides.

``trainer.run`` asks a placement for its three parts, in this order, and never branches on
which placement it has: the reward server's address, the learner, and the rollout source.
The worker, learner and loss code behind them is the same:

- :class:`LocalPlacement` (``cluster.address`` empty, ``make run``): a reward-server
  subprocess (unless ``rollout.reward_address`` names one), one in-process ``Learner``,
  one ``ProcessRolloutSource`` worker process. No Ray.
- ``trainer.cluster.RayPlacement`` (``cluster.address`` set): reward-server replicas,
  K learner ranks and N rollout workers as Ray actors in placement groups.

A placement's ``close`` stops what it started, newest first, and is safe to call twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from trainer.config import TrainConfig
    from trainer.fipo import LossConfig
    from trainer.learner import Learner
    from trainer.learner_group import RayLearnerGroup
    from trainer.rollout import ProcessRolloutSource, RayRolloutSource, RolloutWorkerConfig


class Placement(Protocol):
    """Starts the reward server(s), the learner and the rollout source of one run."""

    def reward_address(self) -> str:
        """``host:port`` (or a comma-separated list of replicas) of the reward server."""
        ...

    def learner(
        self, model_dir: Path, loss_config: LossConfig, pad_id: int
    ) -> Learner | RayLearnerGroup:
        """The learner: ``update``, ``hf_state_dict``, ``state_dict``, ``version``, ..."""
        ...

    def rollout_source(
        self,
        worker_cfg: RolloutWorkerConfig,
        initial_version: int,
        initial_weights: Mapping[str, torch.Tensor] | None,
    ) -> ProcessRolloutSource | RayRolloutSource:
        """The rollout side, not producing batches until the first ``next_batch``."""
        ...

    def publish(
        self, learner: Learner | RayLearnerGroup, source: ProcessRolloutSource | RayRolloutSource
    ) -> None:
        """Make the learner's weights (at ``learner.version``) what the rollout side serves."""
        ...

    def metrics(self) -> dict[str, float]:
        """Run totals the placement adds to each step's metrics (re-issued prompts...)."""
        ...

    def save_model(self, learner: Learner | RayLearnerGroup, folder: Path) -> None:
        """Write the learner's policy as a Hugging Face folder."""
        ...

    def close(self) -> None:
        """Stop everything this placement started (idempotent)."""
        ...


class LocalPlacement:
    """Everything on this machine: today's single-machine path, without Ray."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self._closers: list[Callable[[], None]] = []

    def reward_address(self) -> str:
        from server.launch import start_reward_server, stop_process

        if self.cfg.rollout.reward_address:
            return self.cfg.rollout.reward_address
        proc, address = start_reward_server(
            self.cfg.rollout.reward_workers, self.run_dir / "reward_server.log"
        )
        self._closers.append(lambda: stop_process(proc))
        return address

    def learner(self, model_dir: Path, loss_config: LossConfig, pad_id: int) -> Learner:
        from trainer.learner import Learner

        return Learner(self.cfg, model_dir, loss_config, pad_id=pad_id)

    def rollout_source(
        self,
        worker_cfg: RolloutWorkerConfig,
        initial_version: int,
        initial_weights: Mapping[str, torch.Tensor] | None,
    ) -> ProcessRolloutSource:
        from trainer.rollout import ProcessRolloutSource

        source = ProcessRolloutSource(
            worker_cfg,
            initial_version=initial_version,
            initial_weights=initial_weights,
            autostart=False,  # the first eval runs before rollouts compete for the CPU
        )
        self._closers.append(source.close)
        return source

    def publish(self, learner: Learner, source: ProcessRolloutSource) -> None:
        source.publish(learner.hf_state_dict(), learner.version)

    def metrics(self) -> dict[str, float]:
        return {}

    def save_model(self, learner: Learner, folder: Path) -> None:
        learner.model.save_pretrained(folder, state_dict=learner.hf_state_dict())

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


def make_placement(cfg: TrainConfig, run_dir: Path) -> Placement:
    """This machine (no Ray), or Ray actors when ``cluster.address`` is set (Ray is
    imported only then)."""
    if not cfg.cluster.enabled:
        return LocalPlacement(cfg, run_dir)
    from trainer.cluster import RayPlacement

    placement = RayPlacement(cfg, run_dir)
    print(f"[fipo] {placement.describe()}", flush=True)
    return placement
