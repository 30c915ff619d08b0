"""Helpers for the data-parallel learner tests (no tests of its own).

Importable by a spawned process (``tests/trainer`` is on ``sys.path``, see conftest.py),
so ``torch.multiprocessing`` can run :func:`rank_main` as K gloo ranks on one machine.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64


def make_batch(seed: int, groups: int = 4, g: int = 4):
    """A random rollout batch over the tiny vocabulary, every response >= 2 tokens."""
    from trainer.types import RolloutBatch, RolloutGroup

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(groups):
        prompt = tuple(int(x) for x in rng.integers(1, VOCAB, size=rng.integers(3, 7)))
        resps = tuple(
            tuple(int(x) for x in rng.integers(1, VOCAB, size=rng.integers(2, 9))) for _ in range(g)
        )
        rewards = np.array([1.0, -1.0] * (g // 2))
        out.append(
            RolloutGroup(
                prompt_ids=prompt,
                response_ids=resps,
                behaviour_logp=tuple(tuple(float(v) for v in -rng.random(len(r))) for r in resps),
                rewards=rewards,
                correct=rewards > 0,
                truncated=np.zeros(g, bool),
                policy_version=0,
            )
        )
    return RolloutBatch(
        groups=tuple(out), num_generated_groups=groups, gen_seconds=0.0, gen_tokens=0
    )


def advantages(batch, zero_groups: tuple[int, ...] = ()) -> list[np.ndarray]:
    """Group-normalised advantages; the groups in ``zero_groups`` get all zeros."""
    from trainer.advantages import group_advantages

    adv = list(group_advantages(np.stack([g.rewards for g in batch.groups])))
    return [np.zeros_like(a) if i in zero_groups else a for i, a in enumerate(adv)]


def train_config(
    model_dir: Path, model: dict | None = None, algorithm: dict | None = None, **optim
):
    """A CPU fp32 ``TrainConfig`` for the tiny learner model."""
    from trainer.config import build_config

    return build_config(
        {
            "model": {
                "path": str(model_dir),
                "device": "cpu",
                "autocast_dtype": "float32",
                "micro_batch_tokens": 40,
                **(model or {}),
            },
            "rollout": {"prompts_per_step": 4, "group_size": 4},
            "optim": {"lr": 1e-2, "warmup_steps": 0, **optim},
            "algorithm": algorithm or {},
        }
    )


def build_learner(model_dir: Path, settings: dict[str, Any], process_group=None):
    """A ``Learner`` from ``settings`` (``train_config`` keywords, plus ``sgd_lr``: swap
    AdamW for plain SGD so the weights move by exactly ``lr * grad``; AdamW's first step
    is ~``lr * sign(grad)`` and magnifies rounding-level differences of near-zero grads)."""
    from trainer.learner import Learner, build_loss_config

    settings = dict(settings)
    sgd_lr = settings.pop("sgd_lr", None)
    cfg = train_config(model_dir, **settings)
    learner = Learner(cfg, model_dir, build_loss_config(cfg.algorithm), 0, process_group)
    if sgd_lr is not None:
        learner.optimizer = torch.optim.SGD(learner._params, lr=sgd_lr)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
    return learner


def weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(
    rank: int,
    world: int,
    port: int,
    model_dir: Path,
    cases: list[tuple[dict[str, Any], Any, list[np.ndarray]]],
    out: Path,
) -> None:
    """One gloo rank: for each ``(settings, batch, advantages)`` case a fresh learner and
    one update; saves ``out/rank{rank}_case{i}.pt`` (weights and metrics)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for i, (settings, batch, adv) in enumerate(cases):
            learner = build_learner(model_dir, settings, dist.group.WORLD)
            metrics = learner.update(batch, adv)
            result = {"weights": weights(learner), "metrics": metrics}
            torch.save(result, out / f"rank{rank}_case{i}.pt")
    finally:
        dist.destroy_process_group()


def init_local_ray(num_cpus: int) -> None:
    """A private local Ray whose worker processes can import ``trainer`` (this checkout)."""
    import ray

    import trainer

    repo = str(Path(trainer.__file__).resolve().parents[1])
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": repo}},
    )
