"""The FIPO loss as a verl policy loss: ``actor.policy_loss.loss_mode=fipo`` (verl 0.9.1).

Importing this module registers ``fipo`` in verl's policy-loss registry
(``verl.trainer.ppo.core_algos.register_policy_loss``). verl imports it in every process
when ``VERL_USE_EXTERNAL_MODULES=trainer.verl_loss`` is set, and on its own when this
project is installed in verl's environment (entry point ``verl.plugins``: ``fipo``).

The per-token terms are ``trainer.fipo.token_losses`` (the exact O(T) Future-KL with the
official semantics: participation filter, influence clip, safety clip, dual clip and
sequence drop); the aggregation is verl's own ``agg_loss`` with verl's global batch
information, so data-parallel normalisation is verl's. With no global batch information
and ``token-mean`` the result equals ``trainer.fipo.policy_loss``.

Settings, from verl's actor config: ``clip_ratio_low`` / ``clip_ratio_high`` (else
``clip_ratio``) are FIPO's PPO clip, ``clip_ratio_c`` is the dual clip (also the Future-KL
filter and the sequence-drop threshold; set it to 10 for the official recipe, verl's
default is 3), ``loss_agg_mode`` the aggregation. FIPO's own fields keep the official
defaults (``trainer.fipo.LossConfig``) unless set in ``$FIPO_LOSS`` as comma-separated
``field=value`` pairs, e.g. ``FIPO_LOSS=decay_rate=16,safety_threshold=3`` (fields:
``decay_rate``, ``influence_clip``, ``clip_high_only``, ``safety_threshold``,
``drop_sequences``, ``log_ratio_clamp``; ``none`` for an optional field), or as
``fipo_<field>`` keys of ``policy_loss`` in a plain DictConfig. verl's
``rollout_is_weights`` multiply the per-token losses, as in verl's vanilla loss.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from trainer.fipo import LossConfig, token_losses

FIPO_LOSS_ENV = "FIPO_LOSS"
FIPO_FIELDS = (
    "decay_rate",
    "influence_clip",
    "clip_high_only",
    "safety_threshold",
    "drop_sequences",
    "log_ratio_clamp",
)


def _value(field: str, text: str) -> object:
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if field in ("clip_high_only", "drop_sequences"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"${FIPO_LOSS_ENV}: {field} must be true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"${FIPO_LOSS_ENV}: {field} must be a number, got {text!r}") from None


def fipo_overrides(config: Any = None, env: str | None = None) -> dict[str, object]:
    """FIPO-specific fields from ``policy_loss.fipo_<field>`` keys and ``$FIPO_LOSS``.

    Raises:
        ValueError: An unknown field or a bad value, naming it.
    """
    out: dict[str, object] = {}
    policy_loss = _get(config, "policy_loss", None) if config is not None else None
    for field in FIPO_FIELDS:
        value = _get(policy_loss, f"fipo_{field}", None) if policy_loss is not None else None
        if value is not None:
            out[field] = value
    text = os.environ.get(FIPO_LOSS_ENV, "") if env is None else env
    for pair in filter(None, (p.strip() for p in text.split(","))):
        field, sep, value = pair.partition("=")
        field = field.strip()
        if not sep or field not in FIPO_FIELDS:
            raise ValueError(
                f"${FIPO_LOSS_ENV}: {pair!r} is not field=value with a field of {FIPO_FIELDS}"
            )
        out[field] = _value(field, value)
    return out


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    getter = getattr(config, "get", None)
    return getter(key, default) if getter is not None else getattr(config, key, default)


def loss_config_from_verl(config: Any) -> LossConfig:
    """FIPO's ``LossConfig`` from verl's actor config (and ``$FIPO_LOSS``).

    Raises:
        ValueError: No actor config, or a value FIPO refuses (the message names it).
    """
    if config is None:
        raise ValueError("the fipo policy loss needs verl's actor config (got None)")
    clip = _get(config, "clip_ratio", 0.2)
    low = _get(config, "clip_ratio_low", None)
    high = _get(config, "clip_ratio_high", None)
    return LossConfig(
        clip_low=float(clip if low is None else low),
        clip_high=float(clip if high is None else high),
        dual_clip=float(_get(config, "clip_ratio_c", 3.0)),
        **fipo_overrides(config),  # type: ignore[arg-type]
    )


def compute_policy_loss_fipo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss signature around FIPO's per-token terms.

    Args:
        old_log_prob: Log-probs of the policy the update started from.  # [B, T]
        log_prob: Current log-probs; carries the gradient.  # [B, T]
        advantages: Per-token advantages (verl broadcasts the sequence advantage).  # [B, T]
        response_mask: Response tokens.  # [B, T]
        loss_agg_mode: verl's aggregation mode, passed to verl's ``agg_loss``.
        config: verl's actor config (``ActorConfig`` or a DictConfig).
        rollout_is_weights: Optional per-token rollout-correction weights.  # [B, T]

    Returns:
        ``(loss, metrics)``: verl's contract, metrics under ``actor/``.
    """
    from verl.trainer.ppo.core_algos import agg_loss

    cfg = loss_config_from_verl(config)
    terms = token_losses(log_prob, old_log_prob, advantages, response_mask, cfg)
    losses = terms.losses
    if rollout_is_weights is not None:
        losses = losses * rollout_is_weights
    batch_info = dict(_get(config, "global_batch_info", None) or {})
    loss = agg_loss(
        loss_mat=losses, loss_mask=terms.keep.to(losses.dtype), loss_agg_mode=loss_agg_mode,
        **batch_info,
    )  # fmt: skip
    with torch.no_grad():
        keep = terms.keep
        n = keep.sum().clamp(min=1)
        adv = terms.advantages

        def frac(flags: torch.Tensor) -> float:
            return ((flags & keep).sum() / n).item()

        metrics = {
            "actor/pg_clipfrac": frac(
                ((terms.ratio > 1 + cfg.clip_high) & (adv > 0))
                | ((terms.ratio < 1 - cfg.clip_low) & (adv < 0))
            ),
            "actor/ppo_kl": (torch.where(keep, -terms.log_ratio, 0.0).sum() / n).item(),
            "actor/pg_clipfrac_lower": frac(terms.over_cap & (adv < 0)),
            "actor/fipo_influence_mean": (torch.where(keep, terms.weights, 0.0).sum() / n).item(),
            "actor/fipo_future_kl_mean": (torch.where(keep, terms.future_kl, 0.0).sum() / n).item(),
            "actor/fipo_dropped_sequences": terms.dropped.sum().item(),
        }
    return loss, metrics


def register() -> None:
    """Register ``fipo`` in verl's policy-loss registry (done on import)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss("fipo")(compute_policy_loss_fipo)


register()
