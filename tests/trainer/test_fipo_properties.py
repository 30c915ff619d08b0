"""Property tests: trainer.fipo against deliberately naive references written here.

The references transcribe the spec's definitions literally (no recurrence, no blocking,
float64, one position at a time), so they share no code or trick with the fast path.
Example counts are kept small so the file runs in seconds on a loaded 2-core machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trainer.fipo import LossConfig, future_kl, influence_weights, policy_loss, token_losses

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def naive_future_kl(
    x: np.ndarray, mask: np.ndarray, decay_rate: float, ratio_cap: float | None
) -> np.ndarray:
    """``F[b, t] = sum_{k >= t} gamma^(k-t) * x_k`` straight from the definition: O(T^2)."""
    gamma = 2.0 ** (-1.0 / decay_rate)
    keep = mask.astype(bool)
    if ratio_cap is not None:
        keep &= np.exp(x) <= ratio_cap
    xs = np.where(keep, x, 0.0)
    B, T = x.shape
    out = np.zeros((B, T))
    for t in range(T):
        # The inner sum over k >= t, written out in full for every t (no reuse of F_{t+1}).
        powers = gamma ** np.arange(T - t, dtype=np.float64)
        out[:, t] = (xs[:, t:] * powers).sum(axis=1)
    return out


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    length=st.one_of(st.sampled_from([1, 2, 63, 64, 65, 129, 2048]), st.integers(1, 2048)),
    decay_rate=st.floats(0.25, 512.0),
    mask_density=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    scale=st.sampled_from([0.01, 0.3, 3.0]),
    ratio_cap=st.one_of(st.none(), st.floats(1.5, 20.0)),
    dtype=st.sampled_from(sorted(DTYPES)),
)
@example(7, 4, 2048, 32.0, 1.0, 0.3, None, "float32")
@example(8, 3, 2048, 32.0, 0.9, 0.3, 10.0, "bfloat16")
@example(9, 2, 2047, 512.0, 0.3, 3.0, 2.0, "float32")
def test_future_kl_matches_naive_double_loop(
    seed: int,
    batch: int,
    length: int,
    decay_rate: float,
    mask_density: float,
    scale: float,
    ratio_cap: float | None,
    dtype: str,
) -> None:
    g = torch.Generator().manual_seed(seed)
    log_ratio = (torch.randn(batch, length, generator=g) * scale).to(DTYPES[dtype])
    mask = torch.rand(batch, length, generator=g) < mask_density
    got = future_kl(log_ratio, mask, decay_rate, ratio_cap=ratio_cap)
    # The reference sees exactly the (possibly bf16-rounded) values we were given.
    want = naive_future_kl(log_ratio.double().numpy(), mask.numpy(), decay_rate, ratio_cap)
    assert got.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert got.shape == log_ratio.shape and not got.requires_grad
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-6)


def naive_policy_loss(
    logp: np.ndarray, old: np.ndarray, adv: np.ndarray, mask: np.ndarray, cfg: LossConfig
) -> tuple[float, int]:
    """Spec steps 1-9 token by token in plain Python floats. Returns (loss, dropped rows)."""
    B, T = logp.shape
    c = cfg.dual_clip
    lo_f = 1.0 if cfg.clip_high_only else 1.0 - cfg.influence_clip
    hi_f = 1.0 + cfg.influence_clip
    rows: list[list[float]] = []
    dropped = 0
    for b in range(B):
        A = float(adv[b])
        delta = [
            min(max(logp[b, t] - old[b, t], -cfg.log_ratio_clamp), cfg.log_ratio_clamp)
            if mask[b, t]
            else 0.0
            for t in range(T)
        ]
        r = [math.exp(d) for d in delta]
        losses = []
        for t in range(T):
            if not mask[b, t]:
                continue
            f = 1.0
            if cfg.decay_rate is not None:
                gamma = 2.0 ** (-1.0 / cfg.decay_rate)
                F = sum(
                    gamma ** (k - t) * delta[k]
                    for k in range(t, T)
                    if mask[b, k] and (c is None or r[k] <= c)
                )
                f = min(max(math.exp(F), lo_f), hi_f)
                s = cfg.safety_threshold
                if s is not None and A < 0 and r[t] > s:
                    f = min(max(f, 0.8), 1.0)
            At = A * f
            clipped = min(max(r[t], 1.0 - cfg.clip_low), 1.0 + cfg.clip_high)
            loss = max(-At * r[t], -At * clipped)
            if c is not None and At < 0:
                loss = min(loss, -At * c)
            losses.append(loss)
        n_bad = sum(1 for t in range(T) if mask[b, t] and A < 0 and c is not None and r[t] > c)
        if cfg.drop_sequences and n_bad > 1:
            dropped += 1
            losses = []
        rows.append(losses)
    if cfg.aggregation == "token_mean":
        n = sum(len(x) for x in rows)
        return (sum(sum(x) for x in rows) / n if n else 0.0), dropped
    if cfg.aggregation == "seq_mean_token_mean":
        means = [sum(x) / len(x) for x in rows if x]
        return (sum(means) / len(means) if means else 0.0), dropped
    return sum(sum(x) for x in rows) / (B * T), dropped


@st.composite
def loss_configs(draw: st.DrawFn) -> LossConfig:
    name = draw(st.sampled_from(["fipo", "dapo", "grpo", "dr_grpo"]))
    base = {"fipo": LossConfig.fipo, "dapo": LossConfig.dapo, "grpo": LossConfig.grpo}
    cfg = base.get(name, LossConfig.dr_grpo)()
    if name == "fipo":
        symmetric = draw(st.booleans())
        cfg = cfg.replace(
            decay_rate=draw(st.floats(0.5, 64.0)),
            clip_high_only=not symmetric,
            influence_clip=draw(st.floats(0.0, 0.9)),
            safety_threshold=draw(st.one_of(st.none(), st.floats(1.0, 12.0))),
            dual_clip=draw(st.floats(2.0, 12.0)),
            drop_sequences=draw(st.booleans()),
        )
    return cfg


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 5),
    length=st.integers(1, 24),
    spike=st.sampled_from([0.0, 0.2]),
    cfg=loss_configs(),
)
def test_policy_loss_matches_naive_reference(
    seed: int, batch: int, length: int, spike: float, cfg: LossConfig
) -> None:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 4
    shift = torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.5
    # Some tokens far beyond the dual clip, to exercise the filter, dual clip and drop.
    shift += (torch.rand(batch, length, generator=g) < spike) * 3.0
    logp = old + shift
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=g) < 0.8
    got, metrics = policy_loss(logp, old, adv, mask, cfg)
    want, dropped = naive_policy_loss(logp.numpy(), old.numpy(), adv.numpy(), mask.numpy(), cfg)
    assert got.item() == pytest.approx(want, abs=1e-9, rel=1e-9)
    assert metrics["loss/dropped_sequences"] == dropped


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    eps_f=st.floats(0.0, 0.99),
    high_only=st.booleans(),
    safety=st.one_of(st.none(), st.floats(0.5, 20.0)),
)
def test_influence_weights_stay_in_their_bounds(
    seed: int, eps_f: float, high_only: bool, safety: float | None
) -> None:
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(3, 50, generator=g) * 5  # far beyond both bounds
    ratio = torch.exp(torch.randn(3, 50, generator=g) * 2)
    adv = torch.randn(3, generator=g)
    w = influence_weights(
        F.requires_grad_(),
        clip_range=eps_f,
        clip_high_only=high_only,
        advantages=adv,
        ratio=ratio,
        safety_threshold=safety,
    )
    assert not w.requires_grad
    lo = 1.0 if high_only else 1.0 - eps_f
    risky = (
        (adv[:, None] < 0) & (ratio > safety) if safety is not None else torch.zeros_like(w).bool()
    )
    assert ((w >= min(lo, 0.8) - 1e-7) & (w <= 1.0 + eps_f + 1e-6)).all()
    assert ((w[~risky] >= lo - 1e-7) & (w[~risky] <= 1 + eps_f + 1e-6)).all()
    assert (w[risky] <= 1.0 + 1e-7).all()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), tau=st.floats(0.5, 64.0))
def test_weights_only_scale_the_advantage(seed: int, tau: float) -> None:
    """FIPO's token losses equal DAPO's with the advantage multiplied by the weights."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 20, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(3, 20, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 20, dtype=torch.bool)
    cfg = LossConfig.fipo(decay_rate=tau, drop_sequences=False)
    fipo_terms = token_losses(logp, old, adv, mask, cfg)
    dapo_terms = token_losses(logp, old, adv[:, None] * fipo_terms.weights, mask, LossConfig.dapo())
    torch.testing.assert_close(fipo_terms.losses, dapo_terms.losses)
