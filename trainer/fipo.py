"""FIPO policy loss: Future-KL, influence weights, and the clipped surrogate (+ DAPO, GRPO).

FIPO (Ma et al., arXiv 2603.19835) keeps DAPO's scaffold (group-normalised outcome
advantage, clip-higher PPO surrogate, token-mean loss) and re-weights each token's
advantage by ``exp(F_t)``, clipped, where the Future-KL ``F_t`` is the discounted sum of
the log-ratio shifts of the token and of everything after it. Step numbers in comments
refer to "Per-token math" in ``shared/spec/FIPO.md``.

One code path serves three algorithms; a frozen ``LossConfig`` picks the variant:

- ``fipo``: the official recipe (Future-KL on, clip-high-only weights, safety, dual clip,
  sequence drop, token-mean).
- ``dapo``: the same loss with Future-KL, safety and sequence drop off (the drop rule does
  not depend on Future-KL, so ``decay_rate=None`` alone still drops sequences).
- ``grpo``: symmetric PPO clip, no dual clip, per-sequence mean then mean over sequences.

Use ``loss_config("fipo", decay_rate=16.0)`` to start from a preset by name.

Everything here is a pure function: tensors and plain numbers in, ``(loss, metrics)`` out;
nothing is logged. The influence weights are detached (no gradient flows through them).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from trainer.kernels.reverse_scan import discounted_reverse_cumsum

__all__ = [
    "AGGREGATIONS",
    "LOSS_PRESETS",
    "LossConfig",
    "TokenLosses",
    "future_kl",
    "influence_weights",
    "loss_config",
    "policy_loss",
    "policy_loss_terms",
    "token_losses",
]


# --------------------------------------------------------------------------------------
# Aggregation: how per-token losses become one scalar. Chosen by name from this registry.
# Each takes the per-token losses [B, T], the boolean mask of tokens that count [B, T] and
# an optional normaliser (see ``policy_loss``), and returns a 0-d tensor.
# --------------------------------------------------------------------------------------


def _token_mean(losses: torch.Tensor, keep: torch.Tensor, normaliser: float | None) -> torch.Tensor:
    # DAPO / FIPO: every surviving token of the mini-batch weighs the same.
    total = torch.where(keep, losses, 0.0).sum()
    denom = normaliser if normaliser is not None else keep.sum().clamp(min=1)
    return total / denom


def _seq_mean_token_mean(
    losses: torch.Tensor, keep: torch.Tensor, normaliser: float | None
) -> torch.Tensor:
    # GRPO: mean over each response's tokens, then mean over responses that have any.
    per_token = keep.sum(dim=1)
    per_seq = torch.where(keep, losses, 0.0).sum(dim=1) / per_token.clamp(min=1)
    denom = normaliser if normaliser is not None else (per_token > 0).sum().clamp(min=1)
    return per_seq.sum() / denom


def _seq_mean_token_sum_norm(
    losses: torch.Tensor, keep: torch.Tensor, normaliser: float | None
) -> torch.Tensor:
    # Dr. GRPO: token sum per response divided by a constant (the padded length T), so
    # long responses are not down-weighted; then mean over responses.
    total = torch.where(keep, losses, 0.0).sum()
    denom = normaliser if normaliser is not None else max(losses.shape[0] * losses.shape[1], 1)
    return total / denom


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float | None], torch.Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """Settings of the policy loss. Defaults are the official FIPO 32B recipe.

    Attributes:
        clip_low: PPO clip below 1 (``eps_lo``): the ratio is clipped at ``1 - clip_low``.
        clip_high: PPO clip above 1 (``eps_hi``, DAPO's clip-higher): clipped at
            ``1 + clip_high``.
        dual_clip: Dual-clip constant ``c`` (> 1), or None for no dual clip. It is also the
            Future-KL participation filter (tokens with ratio > c add nothing to F) and the
            threshold of the sequence-drop rule, as in the official code.
        decay_rate: Future-KL half-life ``tau`` in tokens (gamma = 2^(-1/tau)); None turns
            Future-KL off (f = 1). With ``drop_sequences=False`` too (the ``dapo`` preset)
            the loss is DAPO's.
        influence_clip: ``eps_f``: influence weights are clipped to ``[1, 1 + eps_f]``
            (clip_high_only) or ``[1 - eps_f, 1 + eps_f]``.
        clip_high_only: Whether influence weights may only raise a token's advantage.
        safety_threshold: ``s``: for tokens with negative advantage and ratio > s the
            weight is clipped to [0.8, 1.0]; None disables. Only acts with Future-KL on.
        drop_sequences: Drop a response from the loss when more than one of its tokens has
            negative advantage and ratio > ``dual_clip`` (official FIPO; needs dual_clip).
            Acts whether or not Future-KL is on.
        aggregation: How token losses are reduced, a key of ``AGGREGATIONS``:
            ``token_mean`` (DAPO/FIPO), ``seq_mean_token_mean`` (GRPO) or
            ``seq_mean_token_sum_norm`` (Dr. GRPO).
        participation_filter: Whether tokens with ratio > ``dual_clip`` are left out of
            Future-KL (the official recipe). False lets every token feed F: the paper's
            ablation, reported to derail training and collapse response length.
        log_ratio_clamp: ``logp - old_logp`` is clamped to +-this before anything else.
        tis_cap: Cap of the truncated importance-sampling weight
            ``min(exp(old_logp - behaviour_logp), tis_cap)`` that corrects for the rollout
            engine's (behaviour) policy differing from ``old``. Used only when
            ``policy_loss`` gets ``behaviour_logp``; None there reports the mismatch
            metrics without correcting.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 10.0
    decay_rate: float | None = 32.0
    influence_clip: float = 0.2
    clip_high_only: bool = True
    safety_threshold: float | None = 10.0
    drop_sequences: bool = True
    aggregation: str = "token_mean"
    participation_filter: bool = True
    log_ratio_clamp: float = 20.0
    tis_cap: float | None = 2.0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"LossConfig.{field} {why}, got {getattr(self, field)!r}")

        def number(field: str, *, optional: bool = False) -> float | None:
            value = getattr(self, field)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(field, "must be a number" + (" or None" if optional else ""))
            if not math.isfinite(value):
                raise bad(field, "must be finite")
            return float(value)

        if not 0.0 <= number("clip_low") < 1.0:
            raise bad("clip_low", "must be in [0, 1)")
        if number("clip_high") < 0.0:
            raise bad("clip_high", "must be >= 0")
        c = number("dual_clip", optional=True)
        if c is not None and c <= 1.0 + self.clip_high:
            raise bad("dual_clip", f"must exceed 1 + clip_high = {1.0 + self.clip_high}")
        tau = number("decay_rate", optional=True)
        if tau is not None and tau <= 0.0:
            raise bad("decay_rate", "must be > 0 (or None to turn Future-KL off)")
        eps_f = number("influence_clip")
        if eps_f < 0.0:
            raise bad("influence_clip", "must be >= 0")
        if not isinstance(self.clip_high_only, bool):
            raise bad("clip_high_only", "must be a bool")
        if not self.clip_high_only and eps_f >= 1.0:
            raise bad("influence_clip", "must be < 1 when clip_high_only is False")
        s = number("safety_threshold", optional=True)
        if s is not None and s <= 0.0:
            raise bad("safety_threshold", "must be > 0 (or None)")
        if not isinstance(self.drop_sequences, bool):
            raise bad("drop_sequences", "must be a bool")
        if self.drop_sequences and c is None:
            raise bad("drop_sequences", "needs dual_clip (its threshold); set it False")
        if not isinstance(self.participation_filter, bool):
            raise bad("participation_filter", "must be a bool")
        if self.aggregation not in AGGREGATIONS:
            raise bad("aggregation", f"must be one of {sorted(AGGREGATIONS)}")
        if number("log_ratio_clamp") <= 0.0:
            raise bad("log_ratio_clamp", "must be > 0")
        cap = number("tis_cap", optional=True)
        if cap is not None and cap <= 0.0:
            raise bad("tis_cap", "must be > 0 (or None)")

    @property
    def uses_future_kl(self) -> bool:
        """Whether Future-KL influence weights are applied."""
        return self.decay_rate is not None

    @classmethod
    def fipo(cls, **overrides: object) -> LossConfig:
        """The official FIPO recipe (spec "Defaults", official 32B column)."""
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def dapo(cls, **overrides: object) -> LossConfig:
        """DAPO: FIPO's loss with Future-KL off (clip-higher, dual clip, token-mean)."""
        base = dict(decay_rate=None, safety_threshold=None, drop_sequences=False)
        return cls(**{**base, **overrides})  # type: ignore[arg-type]

    @classmethod
    def grpo(cls, **overrides: object) -> LossConfig:
        """GRPO: symmetric clip 0.2, no dual clip, per-sequence mean (KL beta = 0)."""
        base = dict(
            clip_high=0.2,
            dual_clip=None,
            decay_rate=None,
            safety_threshold=None,
            drop_sequences=False,
            aggregation="seq_mean_token_mean",
        )
        return cls(**{**base, **overrides})  # type: ignore[arg-type]

    @classmethod
    def dr_grpo(cls, **overrides: object) -> LossConfig:
        """Dr. GRPO: GRPO's clip with the constant-length normaliser (no length bias)."""
        return cls.grpo(**{"aggregation": "seq_mean_token_sum_norm", **overrides})

    def replace(self, **changes: object) -> LossConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


LOSS_PRESETS: dict[str, Callable[..., LossConfig]] = {
    "fipo": LossConfig.fipo,
    "dapo": LossConfig.dapo,
    "grpo": LossConfig.grpo,
    "dr_grpo": LossConfig.dr_grpo,
}


def loss_config(name: str, **overrides: object) -> LossConfig:
    """Build the preset ``name`` (a key of ``LOSS_PRESETS``) with ``overrides`` applied.

    Raises:
        ValueError: For an unknown preset name or a bad field value.
        TypeError: For an unknown field name.
    """
    try:
        preset = LOSS_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown loss preset {name!r}; choose one of {sorted(LOSS_PRESETS)}"
        ) from None
    return preset(**overrides)


# --------------------------------------------------------------------------------------
# Future-KL and influence weights
# --------------------------------------------------------------------------------------


def _check_pair(name: str, value: torch.Tensor, shape: torch.Size, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(
            f"{name} must have the shape of {what} {tuple(shape)}, got {tuple(value.shape)}"
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 inputs are promoted: in bf16, gamma = 2^(-1/32) rounds to 0.98046875, a
    # half-life of 35 tokens instead of 32, and long sums lose all precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def future_kl(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    decay_rate: float,
    *,
    ratio_cap: float | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Future-KL ``F_t = sum_{k >= t} gamma^(k-t) * x_k`` with ``gamma = 2^(-1/decay_rate)``.

    ``x = mask * log_ratio``, leaving out tokens whose ratio ``exp(log_ratio)`` exceeds
    ``ratio_cap`` (the dual-clip constant c; spec step 2). Masked positions add nothing but
    still count as distance. Values at masked positions are never read, so padding may hold
    anything (``-inf``, NaN). A non-finite value at an unmasked, unfiltered position may make F
    non-finite after it too, up to the whole row (the matmul scan multiplies it by zeros),
    not only at and before it; ``policy_loss`` clamps log-ratios first, so it only ever
    passes NaN here, and then its loss is NaN anyway. The result is detached: it only feeds
    detached weights.

    Computed in O(B*T) memory and O(B*T*64) work by a blocked scan made of matmuls, always
    accumulated in float64 (exact to float32 rounding for any T; bf16/fp16 inputs never set
    the precision, see the "bf16 gamma trap" in docs/fipo.md).

    Args:
        log_ratio: ``logp - old_logp`` per token (any float dtype).  # [B, T]
        mask: Response-token mask, bool or 0/1 (nonzero = token counts).  # [B, T]
        decay_rate: Half-life ``tau`` in tokens, > 0.
        ratio_cap: Tokens with ratio above this are left out of the sums; None keeps all.
        backend: ``"torch"`` (the blocked scan above, any device) or ``"triton"``: the
            one-pass CUDA kernel of ``trainer.kernels.triton_scan``, float32 accumulation,
            not yet validated on a GPU (see that module).

    Returns:
        ``F`` in float32 (float64 for float64 input), detached.  # [B, T]

    Raises:
        TypeError: If an argument is not a tensor.
        ValueError: On a shape mismatch, a non-float ``log_ratio`` or a bad parameter.
    """
    if not isinstance(log_ratio, torch.Tensor):
        raise TypeError(f"log_ratio must be a torch.Tensor, got {type(log_ratio).__name__}")
    if log_ratio.dim() != 2 or not log_ratio.is_floating_point():
        raise ValueError(
            f"log_ratio must be a 2-D float tensor [B, T], got {log_ratio.dtype} {tuple(log_ratio.shape)}"
        )
    _check_pair("mask", mask, log_ratio.shape, "log_ratio")
    if isinstance(decay_rate, bool) or not isinstance(decay_rate, int | float):
        raise TypeError(f"decay_rate must be a number, got {type(decay_rate).__name__}")
    if not (math.isfinite(decay_rate) and decay_rate > 0):
        raise ValueError(f"decay_rate must be finite and > 0, got {decay_rate}")
    if ratio_cap is not None and not ratio_cap > 0:
        raise ValueError(f"ratio_cap must be > 0 or None, got {ratio_cap}")

    if backend == "triton":
        if not (log_ratio.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
        if log_ratio.dtype == torch.float64:
            raise ValueError("backend='triton' accumulates in float32; use 'torch' for float64")
        from trainer.kernels.triton_scan import future_kl_triton

        return future_kl_triton(log_ratio, mask, float(decay_rate), ratio_cap)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")

    out_dtype = _acc_dtype(log_ratio.dtype)
    x = log_ratio.detach().to(torch.float64)
    keep = mask.detach().to(torch.bool)
    if ratio_cap is not None:
        # ratio <= c  <=>  log_ratio <= ln c (no exp, so no overflow); NaN fails it too.
        keep = keep & (x <= math.log(ratio_cap))
    x = torch.where(keep, x, 0.0)
    gamma = 2.0 ** (-1.0 / float(decay_rate))
    return discounted_reverse_cumsum(x, gamma).to(out_dtype)


def influence_weights(
    future_kl: torch.Tensor,
    *,
    clip_range: float,
    clip_high_only: bool,
    advantages: torch.Tensor | None = None,
    ratio: torch.Tensor | None = None,
    safety_threshold: float | None = None,
) -> torch.Tensor:
    """Influence weights ``f = clamp(exp(F), lo, hi)`` with the safety rule (spec steps 4-5).

    ``[lo, hi] = [1, 1 + clip_range]`` if ``clip_high_only`` else
    ``[1 - clip_range, 1 + clip_range]``. With ``safety_threshold = s``, tokens with a
    negative advantage and ``ratio > s`` get ``f = clamp(f, 0.8, 1.0)`` so that a token the
    update already pushed far is not pushed down harder.

    Args:
        future_kl: Future-KL values.  # [B, T]
        clip_range: ``eps_f`` >= 0 (< 1 when not clip_high_only).
        clip_high_only: Clip to ``[1, 1 + eps_f]`` instead of symmetric.
        advantages: Per-sequence ``[B]`` or per-token ``[B, T]`` advantages; needed for
            the safety rule.
        ratio: Token ratios ``exp(logp - old_logp)``; needed for the safety rule.  # [B, T]
        safety_threshold: ``s``, or None for no safety rule.

    Returns:
        Detached weights, float32 (float64 for float64 input).  # [B, T]

    Raises:
        ValueError: On bad shapes or parameters, or a safety threshold without
            ``advantages`` and ``ratio``.
    """
    if not isinstance(future_kl, torch.Tensor) or future_kl.dim() != 2:
        raise ValueError("future_kl must be a 2-D tensor [B, T]")
    if not (math.isfinite(clip_range) and clip_range >= 0):
        raise ValueError(f"clip_range must be finite and >= 0, got {clip_range}")
    if not clip_high_only and clip_range >= 1:
        raise ValueError(f"clip_range must be < 1 for a symmetric clip, got {clip_range}")
    dtype = _acc_dtype(future_kl.dtype)
    lo = 1.0 if clip_high_only else 1.0 - clip_range
    # exp(+large) = inf clamps to hi; no NaN unless F itself is NaN.
    weights = torch.exp(future_kl.detach().to(dtype)).clamp(lo, 1.0 + clip_range)
    if safety_threshold is None:
        return weights
    if advantages is None or ratio is None:
        raise ValueError("safety_threshold needs both advantages and ratio")
    if not safety_threshold > 0:
        raise ValueError(f"safety_threshold must be > 0 or None, got {safety_threshold}")
    _check_pair("ratio", ratio, future_kl.shape, "future_kl")
    adv = _token_advantages(advantages, future_kl.shape).to(dtype)
    risky = (adv < 0) & (ratio.detach() > safety_threshold)
    return torch.where(risky, weights.clamp(0.8, 1.0), weights)


def _token_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast ``[B]``, ``[B, 1]`` or ``[B, T]`` advantages to ``[B, T]`` (detached)."""
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    b = shape[0]
    if advantages.dim() == 1 and advantages.shape[0] == b:
        return advantages.detach()[:, None].expand(shape)
    if advantages.dim() == 2 and advantages.shape[0] == b and advantages.shape[1] in (1, shape[1]):
        return advantages.detach().expand(shape)
    raise ValueError(
        f"advantages must have shape [B] = [{b}] or [B, T] = {list(shape)}, got {list(advantages.shape)}"
    )


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def _masked_stats(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean, min and max of ``values`` over ``keep`` (0 when ``keep`` is empty)."""
    n = keep.sum()
    mean = torch.where(keep, values, 0.0).sum() / n.clamp(min=1)
    vmin = torch.where(keep, values, math.inf).amin() if values.numel() else values.new_zeros(())
    vmax = torch.where(keep, values, -math.inf).amax() if values.numel() else values.new_zeros(())
    empty = n == 0
    return mean, torch.where(empty, 0.0, vmin), torch.where(empty, 0.0, vmax)


class TokenLosses(NamedTuple):
    """Per-token terms of the loss, before aggregation (all detached except ``losses``).

    Attributes:
        losses: Per-token surrogate ``l_t`` (TIS applied); carries the gradient.  # [B, T]
        keep: Tokens that count: the mask minus dropped responses.  # [B, T]
        token_mask: The input mask as bool.  # [B, T]
        dropped: Responses removed by the sequence-drop rule.  # [B]
        log_ratio: Clamped ``logp - old_logp`` (0 at masked positions).  # [B, T]
        ratio: ``exp(log_ratio)``.  # [B, T]
        advantages: Future-aware advantages ``A~ = A * f`` (0 at masked positions).  # [B, T]
        weights: Influence weights ``f`` (1 with Future-KL off).  # [B, T]
        future_kl: ``F`` (0 with Future-KL off).  # [B, T]
        over_cap: Response tokens with ratio > dual_clip (filtered out of F).  # [B, T]
        tis: ``exp(old_logp - behaviour_logp)`` before capping, or None.  # [B, T]
    """

    losses: torch.Tensor
    keep: torch.Tensor
    token_mask: torch.Tensor
    dropped: torch.Tensor
    log_ratio: torch.Tensor
    ratio: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    future_kl: torch.Tensor
    over_cap: torch.Tensor
    tis: torch.Tensor | None


def token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    behaviour_logp: torch.Tensor | None = None,
) -> TokenLosses:
    """Per-token FIPO / DAPO / GRPO terms (spec "Per-token math", steps 1-8).

    Same arguments as ``policy_loss`` (without ``normaliser``); ``policy_loss`` is this
    plus the aggregation and the metrics.
    """
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(
            f"logp must be a 2-D float tensor [B, T], got {logp.dtype} {tuple(logp.shape)}"
        )
    if logp.numel() == 0:
        raise ValueError(f"policy_loss got an empty batch: logp has shape {tuple(logp.shape)}")
    _check_pair("old_logp", old_logp, logp.shape, "logp")
    _check_pair("mask", mask, logp.shape, "logp")
    if behaviour_logp is not None:
        _check_pair("behaviour_logp", behaviour_logp, logp.shape, "logp")

    dtype = _acc_dtype(logp.dtype)
    token_mask = mask.detach().to(torch.bool)
    adv = torch.where(token_mask, _token_advantages(advantages, logp.shape).to(dtype), 0.0)
    old = old_logp.detach().to(dtype)
    bound = cfg.log_ratio_clamp

    # 1. Clamped log-ratio; padding values never enter (where, not multiply).
    delta = torch.where(token_mask, logp.to(dtype) - old, 0.0).clamp(-bound, bound)
    ratio = torch.exp(delta)  # [B, T], carries the gradient
    ratio_d = ratio.detach()

    # 2-6. Future-KL influence weights (detached). Off: f = 1, i.e. DAPO.
    if cfg.uses_future_kl:
        cap = cfg.dual_clip if cfg.participation_filter else None
        fkl = future_kl(delta, token_mask, cfg.decay_rate, ratio_cap=cap).to(dtype)
        weights = influence_weights(
            fkl,
            clip_range=cfg.influence_clip,
            clip_high_only=cfg.clip_high_only,
            advantages=adv,
            ratio=ratio_d,
            safety_threshold=cfg.safety_threshold,
        )
    else:
        fkl = torch.zeros_like(ratio_d)
        weights = torch.ones_like(ratio_d)
    adv_f = adv * weights  # A~_t

    # 7. Clipped surrogate (clip-higher) and dual clip for negative advantages.
    surr = -adv_f * ratio
    surr_clipped = -adv_f * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    losses = torch.maximum(surr, surr_clipped)
    if cfg.dual_clip is not None:
        losses = torch.where(adv_f < 0, torch.minimum(losses, -adv_f * cfg.dual_clip), losses)

    # Truncated importance sampling against the rollout engine's policy (decoupled runs):
    # samples came from the behaviour policy, the surrogate's ratio is against ``old``.
    tis = None
    if behaviour_logp is not None:
        shift = torch.where(token_mask, old - behaviour_logp.detach().to(dtype), 0.0)
        tis = torch.exp(shift.clamp(-bound, bound))
        if cfg.tis_cap is not None:
            losses = losses * tis.clamp(max=cfg.tis_cap)

    # 8. Sequence drop: more than one negative-advantage token beyond the dual clip.
    if cfg.dual_clip is not None:
        over_cap = token_mask & (ratio_d > cfg.dual_clip)
    else:
        over_cap = torch.zeros_like(token_mask)
    if cfg.drop_sequences:
        dropped = (over_cap & (adv < 0)).sum(dim=1) > 1  # [B]
    else:
        dropped = torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
    keep = token_mask & ~dropped[:, None]
    return TokenLosses(
        losses=losses,
        keep=keep,
        token_mask=token_mask,
        dropped=dropped,
        log_ratio=delta.detach(),
        ratio=ratio_d,
        advantages=adv_f,
        weights=weights,
        future_kl=fkl,
        over_cap=over_cap,
        tis=tis,
    )


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    behaviour_logp: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The FIPO / DAPO / GRPO policy loss (spec "Per-token math", steps 1-9).

    Args:
        logp: Current-policy log-probs of the sampled tokens; carries the gradient.  # [B, T]
        old_logp: Log-probs of the policy this update started from, recomputed by the
            learner before its first optimiser step on the rollout batch (NOT the rollout
            engine's; see ``behaviour_logp``).  # [B, T]
        advantages: Per-sequence ``[B]`` (or per-token ``[B, T]``) advantages.
        mask: Response-token mask, bool or 0/1. Values of the other inputs at masked
            positions are never used (padding may hold -inf or NaN).  # [B, T]
        cfg: Which variant, see ``LossConfig`` / ``loss_config``.
        behaviour_logp: Optional log-probs from the rollout engine. When given and
            ``cfg.tis_cap`` is set, each token loss is multiplied by the detached truncated
            importance weight ``min(exp(old_logp - behaviour_logp), tis_cap)``.  # [B, T]
        normaliser: Denominator of the aggregation instead of this call's own count
            (surviving tokens for ``token_mean``, responses for ``seq_mean_token_mean``,
            ``B * T`` for ``seq_mean_token_sum_norm``). Pass the mini-batch's total when
            one mini-batch is split into micro-batches for gradient accumulation, so that
            the summed gradients equal the whole mini-batch's.

    Returns:
        ``(loss, metrics)``: a 0-d loss (float32; float64 for float64 input; exactly 0,
        still connected to ``logp``, when no token survives) and a dict of plain floats
        under ``loss/`` and ``fipo/`` (one device sync to gather them).

    Raises:
        TypeError: If a tensor argument is not a tensor or ``cfg`` is not a LossConfig.
        ValueError: On mismatched shapes, non-float log-probs or an empty batch.
    """
    loss, metrics, _ = policy_loss_terms(
        logp,
        old_logp,
        advantages,
        mask,
        cfg,
        behaviour_logp=behaviour_logp,
        normaliser=normaliser,
    )
    return loss, metrics


def policy_loss_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    behaviour_logp: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, float], TokenLosses]:
    """``policy_loss`` plus its per-token terms (for statistics a caller pools over
    several calls, e.g. ratio quantiles over a whole update)."""
    if normaliser is not None and not normaliser > 0:
        raise ValueError(f"normaliser must be > 0 or None, got {normaliser}")
    terms = token_losses(logp, old_logp, advantages, mask, cfg, behaviour_logp=behaviour_logp)
    # 9. Aggregation (token-mean for DAPO/FIPO).
    loss = AGGREGATIONS[cfg.aggregation](terms.losses, terms.keep, normaliser)
    finite = torch.isfinite(logp.detach()) & torch.isfinite(old_logp.detach())
    if isinstance(advantages, torch.Tensor):
        finite = finite & torch.isfinite(_token_advantages(advantages, logp.shape))
    nonfinite = terms.token_mask & ~finite
    return loss, _metrics(terms, cfg, loss.detach(), nonfinite), terms


def _metrics(
    terms: TokenLosses, cfg: LossConfig, loss: torch.Tensor, nonfinite: torch.Tensor
) -> dict[str, float]:
    """Namespaced statistics over the surviving tokens, gathered with one device sync."""
    keep, ratio, adv_f, fkl = terms.keep, terms.ratio, terms.advantages, terms.future_kl
    over_cap, weights, tis = terms.over_cap, terms.weights, terms.tis
    dropped, delta = terms.dropped, terms.log_ratio
    with torch.no_grad():
        n = keep.sum().to(torch.float64)
        denom = n.clamp(min=1)

        def frac(flags: torch.Tensor) -> torch.Tensor:
            return (flags & keep).sum() / denom

        out: dict[str, torch.Tensor] = {
            "loss/policy": loss,
            "loss/num_tokens": n,
            "loss/num_sequences": keep.any(dim=1).sum(),
            "loss/dropped_sequences": dropped.sum(),
            "loss/dropped_tokens": (terms.token_mask & dropped[:, None]).sum(),
            "loss/nonfinite_tokens": nonfinite.sum(),
            "loss/clip_frac_low": frac((ratio < 1.0 - cfg.clip_low) & (adv_f < 0)),
            "loss/clip_frac_high": frac((ratio > 1.0 + cfg.clip_high) & (adv_f > 0)),
            "loss/dual_clip_frac": frac(over_cap & (adv_f < 0)),
            "loss/log_ratio_clamped_frac": frac(delta.abs() >= cfg.log_ratio_clamp),
            # k3 estimator of KL(old || current), >= 0 per token.
            "loss/approx_kl": torch.where(keep, (ratio - 1.0) - delta, 0.0).sum() / denom,
        }
        out["loss/ratio_mean"], out["loss/ratio_min"], out["loss/ratio_max"] = _masked_stats(
            ratio, keep
        )
        out["loss/token_loss_mean"], _, _ = _masked_stats(terms.losses.detach(), keep)
        if cfg.uses_future_kl:
            out["fipo/future_kl_mean"], out["fipo/future_kl_min"], out["fipo/future_kl_max"] = (
                _masked_stats(fkl, keep)
            )
            out["fipo/future_kl_abs_mean"], _, _ = _masked_stats(fkl.abs(), keep)
            out["fipo/influence_mean"], out["fipo/influence_min"], out["fipo/influence_max"] = (
                _masked_stats(weights, keep)
            )
            hi = 1.0 + cfg.influence_clip
            lo = 1.0 if cfg.clip_high_only else 1.0 - cfg.influence_clip
            unclipped = torch.exp(fkl)
            out["fipo/influence_clip_frac_high"] = frac(unclipped > hi)
            out["fipo/influence_clip_frac_low"] = frac(unclipped < lo)
            out["fipo/filtered_frac"] = frac(over_cap)
            if cfg.safety_threshold is not None:
                out["fipo/safety_frac"] = frac((adv_f < 0) & (ratio > cfg.safety_threshold))
        if tis is not None:
            out["loss/tis_weight_mean"], _, out["loss/tis_weight_max"] = _masked_stats(tis, keep)
            if cfg.tis_cap is not None:
                out["loss/tis_clip_frac"] = frac(tis > cfg.tis_cap)
            # k3 estimate of KL(behaviour || old) from behaviour samples: the
            # inference/training mismatch.
            out["loss/behaviour_kl"] = (
                torch.where(keep, tis - 1.0 - torch.log(tis), 0.0).sum() / denom
            )
        names = list(out)
        values = torch.stack([v.to(torch.float64).reshape(()) for v in out.values()]).tolist()
    return dict(zip(names, values, strict=True))
