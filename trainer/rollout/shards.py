"""How one rollout step is shared among N rollout workers (pure; no Ray, no processes).

- :func:`split_evenly`: each worker's share of ``rollout.prompts_per_step``;
- :func:`worker_seed`: each worker's own problem stream;
- :func:`worker_configs`: each worker's ``RolloutWorkerConfig`` derived from the one;
- :func:`merge_batches`: the step's batch, the union of the workers' batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from trainer.rollout.config import RolloutWorkerConfig
from trainer.types import RolloutBatch


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` as evenly as possible, the larger shares first.

    >>> split_evenly(8, 3)
    [3, 3, 2]
    """
    if parts < 1 or total < parts:
        raise ValueError(
            f"cannot split {total} item(s) over {parts} worker(s): need 1 <= {parts} <= {total}"
        )
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def worker_seed(seed: int, index: int, incarnation: int = 0) -> int:
    """Problem-stream seed of worker ``index`` (its ``incarnation``-th reopening).

    Worker 0's first incarnation keeps ``seed`` (one Ray worker draws what a
    ``ProcessRolloutSource`` draws); every other (worker, incarnation) gets its own
    stream, derived with ``numpy.random.SeedSequence``.
    """
    if index == 0 and incarnation == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), index, incarnation]).generate_state(1)[0])


def worker_configs(cfg: RolloutWorkerConfig, num_workers: int) -> list[RolloutWorkerConfig]:
    """Each worker's settings: its share of ``prompts_per_step`` (and of
    ``prompts_per_round`` when set), its own problem stream and log file; the rest
    (engine, staleness, timeouts) is ``cfg``'s."""
    if not 1 <= num_workers <= cfg.rollout.prompts_per_step:
        raise ValueError(
            f"num_workers ({num_workers}) must be in 1..rollout.prompts_per_step "
            f"({cfg.rollout.prompts_per_step}): every worker makes at least one group a step"
        )
    shares = split_evenly(cfg.rollout.prompts_per_step, num_workers)
    rounds = (
        split_evenly(max(cfg.prompts_per_round, num_workers), num_workers)
        if cfg.prompts_per_round
        else [0] * num_workers
    )
    out = []
    for i, (share, per_round) in enumerate(zip(shares, rounds, strict=True)):
        log = Path(cfg.log_file)
        out.append(
            replace(
                cfg,
                rollout=replace(cfg.rollout, prompts_per_step=share),
                prompts_per_round=per_round,
                seed=worker_seed(cfg.seed, i),
                log_file=str(log.with_name(f"{log.stem}.{i}{log.suffix}")) if cfg.log_file else "",
            )
        )
    return out


def merge_batches(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    """The union of the workers' batches (groups in worker order, versions kept).

    ``gen_seconds`` is the slowest worker's: they generate side by side.
    """
    return RolloutBatch(
        groups=tuple(g for b in batches for g in b.groups),
        num_generated_groups=sum(b.num_generated_groups for b in batches),
        gen_seconds=max(b.gen_seconds for b in batches),
        gen_tokens=sum(b.gen_tokens for b in batches),
        reward_client={
            k: sum(b.reward_client.get(k, 0) for b in batches)
            for k in {k for b in batches for k in b.reward_client}
        },
    )
