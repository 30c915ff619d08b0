"""Pooling the loss's per-micro-batch metrics into one set per learner update.

``trainer.fipo.policy_loss`` reports statistics of one call (one micro-batch). An update
makes many calls (micro-batches x mini-batches x epochs); pooled naively (a mean of
means) the figures stop meaning what their names say. Here:

- counts (``loss/num_tokens``, ``loss/dropped_sequences``, ...) are totals over the
  update's optimiser steps;
- means and fractions are token-weighted (each call weighs its surviving tokens);
- ``_min`` / ``_max`` stay extremes;
- ``fipo/…`` statistics are over the mini-batches where Future-KL can act: every one but
  the update's first, where the policy equals ``old`` and F = 0 by construction. The
  figure over every mini-batch is kept as ``fipo/all_mb/…``;
- ``policy/entropy`` (token-weighted, every response token trained on) and the
  ratio's quantiles ``loss/ratio_p10`` / ``p50`` / ``p90`` over the surviving tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

COUNTS = frozenset(
    {
        "loss/num_tokens",
        "loss/num_sequences",
        "loss/dropped_sequences",
        "loss/dropped_tokens",
        "loss/nonfinite_tokens",
    }
)
MAX_RATIO_SAMPLES = 1 << 20  # per update: quantiles from at most ~1M tokens


class UpdateMetrics:
    """Accumulates one update's micro-batch metrics (see the module docstring)."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._weighted: dict[str, list[float]] = {}  # key -> [sum of w * v, sum of w]
        self._extremes: dict[str, float] = {}
        self._ratios: list[np.ndarray] = []

    def _mean(self, key: str, value: float, weight: float) -> None:
        acc = self._weighted.setdefault(key, [0.0, 0.0])
        acc[0] += weight * value
        acc[1] += weight

    def _extreme(self, key: str, value: float) -> None:
        if key.endswith("_max"):
            self._extremes[key] = max(self._extremes.get(key, value), value)
        else:
            self._extremes[key] = min(self._extremes.get(key, value), value)

    def add(
        self,
        metrics: dict[str, float],
        *,
        acting: bool,
        ratio: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        entropy: tuple[float, float] | None = None,
    ) -> None:
        """Add one ``policy_loss`` call.

        Args:
            metrics: Its metrics (``loss/policy`` is skipped: the learner reports the
                mini-batch's own loss).
            acting: Whether Future-KL can act in this mini-batch (not the update's first).
            ratio: The call's ratios (``TokenLosses.ratio``).  # [b, T]
            keep: The tokens that count (``TokenLosses.keep``).  # [b, T]
            entropy: ``(sum, tokens)`` of the policy entropy over the response tokens.
        """
        weight = float(metrics.get("loss/num_tokens", 0.0))
        for key, value in metrics.items():
            if key == "loss/policy" or not np.isfinite(value):
                continue
            if key in COUNTS:
                self._totals[key] = self._totals.get(key, 0.0) + value
                continue
            names = [key]
            if key.startswith("fipo/"):
                names = [f"fipo/all_mb/{key[5:]}"] + ([key] if acting else [])
            for name in names:
                if key.endswith(("_max", "_min")):
                    if weight > 0:  # an empty call reports 0, not an extreme
                        self._extreme(name, value)
                else:
                    self._mean(name, value, weight)
        if ratio is not None and keep is not None:
            self._ratios.append(ratio.detach()[keep].float().cpu().numpy())
        if entropy is not None:
            self._mean("policy/entropy", entropy[0] / max(entropy[1], 1.0), entropy[1])

    def merge_ranks(self, group: dist.ProcessGroup) -> None:
        """Pool every data-parallel rank's calls into this accumulator (a collective:
        every rank of ``group`` calls it, and all end with the same figures).

        Each rank sends at most ``MAX_RATIO_SAMPLES / K`` of its ratios (an even
        subsample), so the quantiles stay within the one-rank budget.
        """
        ratios = np.concatenate(self._ratios) if self._ratios else np.zeros(0, np.float32)
        world = dist.get_world_size(group)
        cap = max(1, MAX_RATIO_SAMPLES // world)
        if ratios.size > cap:
            ratios = ratios[:: -(-ratios.size // cap)]
        parts: list = [None] * world
        state = (self._totals, self._weighted, self._extremes, ratios)
        dist.all_gather_object(parts, state, group=group)
        self._totals, self._weighted, self._extremes, self._ratios = {}, {}, {}, []
        for totals, weighted, extremes, rank_ratios in parts:  # rank order: deterministic
            for key, value in totals.items():
                self._totals[key] = self._totals.get(key, 0.0) + value
            for key, (total, weight) in weighted.items():
                acc = self._weighted.setdefault(key, [0.0, 0.0])
                acc[0] += total
                acc[1] += weight
            for key, value in extremes.items():
                self._extreme(key, value)
            self._ratios.append(rank_ratios)

    def result(self) -> dict[str, float]:
        """The pooled metrics."""
        out = dict(self._totals)
        out.update({k: s / w if w > 0 else 0.0 for k, (s, w) in self._weighted.items()})
        out.update(self._extremes)
        ratios = np.concatenate(self._ratios) if self._ratios else np.zeros(0)
        if ratios.size:
            if ratios.size > MAX_RATIO_SAMPLES:  # an even subsample keeps the quantiles
                ratios = ratios[:: -(-ratios.size // MAX_RATIO_SAMPLES)]
            p10, p50, p90 = np.quantile(ratios, [0.1, 0.5, 0.9])
            out.update({"loss/ratio_p10": p10, "loss/ratio_p50": p50, "loss/ratio_p90": p90})
        return {k: float(v) for k, v in out.items()}
