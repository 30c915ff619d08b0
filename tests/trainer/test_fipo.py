"""trainer.fipo against the hand-checked vectors of shared/spec/FIPO.md, plus API contracts.

Spec vectors use gamma = 0.5 (tau = 1), eps_f = 0.2, eps_lo = 0.2, eps_hi = 0.28, c = 10.
Random-input comparisons with a naive reference live in test_fipo_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer import fipo
from trainer.fipo import (
    LOSS_PRESETS,
    LossConfig,
    future_kl,
    influence_weights,
    loss_config,
    policy_loss,
    token_losses,
)

TOL = dict(rtol=0.0, atol=1e-6)
SPEC = dict(decay_rate=1.0, influence_clip=0.2, clip_low=0.2, clip_high=0.28, dual_clip=10.0)


def t64(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def ones(n: int) -> torch.Tensor:
    return torch.ones(1, n, dtype=torch.bool)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, t64(expected).to(actual.dtype), **TOL)


def spec_losses(delta: list[float], adv: float, cfg: LossConfig) -> fipo.TokenLosses:
    logp = t64(delta)  # old_logp = 0, so logp - old_logp = delta
    return token_losses(logp, torch.zeros_like(logp), t64([adv])[0], ones(len(delta)), cfg)


# --- spec test vectors -----------------------------------------------------------------


def test_public_vector_unclipped_weights() -> None:
    f = torch.exp(future_kl(t64([math.log(2), math.log(0.5)]), ones(2), 1.0))
    close(f, [math.sqrt(2), 0.5])


def test_tv1_future_kl_and_weights() -> None:
    F = future_kl(t64([0.1, -0.2, 0.3]), ones(3), 1.0)
    close(F, [0.075, -0.05, 0.3])
    close(influence_weights(F, clip_range=0.2, clip_high_only=True), [1.077884, 1.0, 1.2])
    close(influence_weights(F, clip_range=0.2, clip_high_only=False), [1.077884, 0.951229, 1.2])


def test_tv2_masked_middle_counts_as_distance() -> None:
    mask = torch.tensor([[True, False, True]])
    F = future_kl(t64([0.1, 0.5, 0.2]), mask, 1.0)
    assert F[0, 0].item() == pytest.approx(0.15, abs=1e-6)
    assert F[0, 2].item() == pytest.approx(0.2, abs=1e-6)
    f = influence_weights(F, clip_range=0.2, clip_high_only=True)
    assert f[0, 0].item() == pytest.approx(1.161834, abs=1e-6)
    assert f[0, 2].item() == pytest.approx(1.2, abs=1e-6)


def test_tv3_filter_and_per_token_losses() -> None:
    delta = [0.1, 2.5, -0.1]  # r_1 = 12.18 > c: left out of the sums
    close(future_kl(t64(delta), ones(3), 1.0, ratio_cap=10.0), [0.075, -0.05, -0.1])
    neg = spec_losses(delta, -1.0, LossConfig.fipo(**SPEC))
    close(neg.weights, [1.077884, 1.0, 1.0])
    close(neg.losses, [1.191246, 10.0, 0.904837])  # token 1: dual clip
    assert not neg.dropped.any()  # only one token beyond c
    pos = spec_losses(delta, +1.0, LossConfig.fipo(**SPEC))
    close(pos.losses, [-1.191246, -1.28, -0.904837])


def test_tv3b_sequence_drop() -> None:
    cfg = LossConfig.fipo(**SPEC)
    logp = torch.tensor([[2.5, 0.0, 2.4], [0.1, 0.2, 0.0]], dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, metrics = policy_loss(logp, torch.zeros_like(logp), adv, mask, cfg)
    assert metrics["loss/dropped_sequences"] == 1.0
    assert metrics["loss/dropped_tokens"] == 3.0
    assert metrics["loss/num_tokens"] == 3.0
    # The loss is the surviving row's alone.
    alone, _ = policy_loss(logp[1:], torch.zeros_like(logp[1:]), adv[1:], mask[1:], cfg)
    assert loss.item() == pytest.approx(alone.item(), abs=1e-12)
    # Without the rule (DAPO) the row stays in.
    _, dapo_metrics = policy_loss(logp, torch.zeros_like(logp), adv, mask, LossConfig.dapo())
    assert dapo_metrics["loss/num_tokens"] == 6.0


def test_tv4_safety_symmetric() -> None:
    delta = [0.0, 1.2, 0.3]
    cfg = LossConfig.fipo(**SPEC, clip_high_only=False, safety_threshold=3.0)
    terms = spec_losses(delta, -1.0, cfg)
    close(terms.future_kl, [0.675, 1.35, 0.3])
    close(terms.weights, [1.2, 1.0, 1.2])  # token 1: A < 0, r = 3.32 > s
    close(terms.losses, [1.2, 3.320117, 1.619831])
    logp = t64(delta)
    args = (logp, torch.zeros_like(logp), t64([-1.0])[0], ones(3))
    assert policy_loss(*args, cfg)[0].item() == pytest.approx(2.046649, abs=1e-6)
    no_fkl = LossConfig.dapo(**{k: v for k, v in SPEC.items() if k != "decay_rate"})
    assert policy_loss(*args, no_fkl)[0].item() == pytest.approx(1.889992, abs=1e-6)
    loose = cfg.replace(safety_threshold=10.0)
    assert policy_loss(*args, loose)[0].item() == pytest.approx(2.267990, abs=1e-6)


def test_safety_rule_floor_and_only_for_negative_advantages() -> None:
    # Symmetric weights in [0.5, 1.5], s = 3. Token 0: r = 3.32 > s and
    # F_0 = 1.2 + 0.5 * (-3.0) = -0.3, so exp(F_0) = 0.740818 lies inside the clip range.
    cfg = LossConfig.fipo(
        **{**SPEC, "influence_clip": 0.5}, clip_high_only=False, safety_threshold=3.0
    )
    neg = spec_losses([1.2, -3.0], -1.0, cfg)
    close(neg.future_kl, [-0.3, -3.0])
    close(neg.weights, [0.8, 0.5])  # A < 0, r_0 > s: raised to the safety floor; r_1 < s
    pos = spec_losses([1.2, -3.0], +1.0, cfg)
    close(pos.weights, [math.exp(-0.3), 0.5])  # A > 0: the rule does not apply
    # TV4's inputs with A = +1: token 1 keeps its weight of 1.2.
    tv4 = LossConfig.fipo(**SPEC, clip_high_only=False, safety_threshold=3.0)
    close(spec_losses([0.0, 1.2, 0.3], +1.0, tv4).weights, [1.2, 1.2, 1.2])


def test_sequence_drop_needs_negative_advantage_and_two_response_tokens() -> None:
    cfg = LossConfig.fipo(**SPEC)
    assert not spec_losses([2.5, 0.0, 2.4], +1.0, cfg).dropped.any()  # TV3b with A > 0
    # A masked token beyond c does not count: only one response token is.
    logp = t64([2.5, 2.6, 0.0])
    mask = torch.tensor([[True, False, True]])
    terms = token_losses(logp, torch.zeros_like(logp), t64([-1.0])[0], mask, cfg)
    assert not terms.dropped.any()


def test_log_ratio_is_clamped_to_20() -> None:
    # GRPO has no dual clip, so with A < 0 the loss is the ratio itself: exp(20), not
    # exp(25); the clamp also stops the gradient of that token.
    logp = t64([25.0, 0.0]).requires_grad_()
    args = (torch.zeros_like(logp), t64([-1.0])[0], ones(2))
    terms = token_losses(logp, *args, LossConfig.grpo())
    assert terms.log_ratio[0, 0].item() == 20.0
    assert terms.losses[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-12)
    (grad,) = torch.autograd.grad(terms.losses.sum(), logp)
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() != 0.0
    assert policy_loss(logp, *args, LossConfig.grpo())[1]["loss/log_ratio_clamped_frac"] == 0.5
    # Future-KL sums the clamped value: -20 (not -30) eight tokens on, at tau = 1.
    far = spec_losses([0.0] * 8 + [-30.0], 1.0, LossConfig.fipo(**SPEC, clip_high_only=False))
    assert far.future_kl[0, 0].item() == pytest.approx(-20.0 / 256, abs=1e-9)
    assert far.weights[0, 0].item() == pytest.approx(math.exp(-20.0 / 256), abs=1e-9)


def test_tv5_zero_shift_is_dapo() -> None:
    logp = torch.randn(3, 7, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    terms = token_losses(logp, logp.clone(), adv, mask, LossConfig.fipo())
    assert torch.equal(terms.weights, torch.ones_like(terms.weights))
    a, _ = policy_loss(logp, logp.clone(), adv, mask, LossConfig.fipo())
    b, _ = policy_loss(logp, logp.clone(), adv, mask, LossConfig.dapo())
    assert a.item() == b.item()


def test_tv5_constant_shift_tau32() -> None:
    T = 2000
    F = future_kl(torch.full((1, T), 0.01), torch.ones(1, T), 32.0)
    assert F[0, -1].item() == pytest.approx(0.01, abs=1e-6)
    assert F[0, T - 32].item() == pytest.approx(0.233340, abs=1e-6)
    assert F[0, 0].item() == pytest.approx(0.466680, abs=1e-6)


def test_bf16_gamma_trap() -> None:
    """bf16 input gives the fp32 answer; a bf16 gamma would give a 35-token half-life."""
    T = 4000
    x = torch.full((1, T), 0.01, dtype=torch.bfloat16)  # 0.01 rounds to 0.010009765625
    F = future_kl(x, torch.ones(1, T), 32.0)
    assert F.dtype == torch.float32
    exact = 0.010009765625 / (1 - 2 ** (-1 / 32))
    assert F[0, 0].item() == pytest.approx(exact, abs=1e-6)
    bf16_gamma = torch.tensor(2 ** (-1 / 32), dtype=torch.bfloat16).item()
    assert bf16_gamma == 0.98046875
    assert abs(0.010009765625 / (1 - bf16_gamma) - exact) > 0.04  # what the trap costs


# --- gradients ---------------------------------------------------------------------------


def random_case(b: int = 3, t: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.2
    return logp, old, adv, mask


@pytest.mark.parametrize("name", sorted(LOSS_PRESETS))
def test_gradcheck_with_detached_weights(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autograd matches finite differences of the loss with the weights held fixed."""
    cfg = loss_config(name)
    logp, old, adv, mask = random_case()
    grad_live = torch.autograd.grad(
        policy_loss(logp.requires_grad_(), old, adv, mask, cfg)[0], logp
    )[0]
    frozen = token_losses(logp.detach(), old, adv, mask, cfg).weights
    if cfg.uses_future_kl:
        assert not frozen.requires_grad
        assert not torch.equal(frozen, torch.ones_like(frozen))  # the check is not vacuous
    # Finite differences would otherwise see the weights move with logp.
    monkeypatch.setattr(fipo, "influence_weights", lambda *a, **k: frozen)
    x = logp.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: policy_loss(lp, old, adv, mask, cfg)[0], (x,))
    grad_frozen = torch.autograd.grad(policy_loss(x, old, adv, mask, cfg)[0], x)[0]
    torch.testing.assert_close(grad_live, grad_frozen, rtol=0, atol=0)


def test_on_policy_fipo_equals_dapo_loss_and_gradient() -> None:
    _, old, adv, mask = random_case(4, 9, seed=3)
    grads = []
    for cfg in (LossConfig.fipo(), LossConfig.dapo()):
        logp = old.clone().requires_grad_()
        loss, _ = policy_loss(logp, old, adv, mask, cfg)
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    # On-policy, d loss / d logp_t = -A / N on each response token.
    expected = torch.where(mask, -adv[:, None].expand_as(old), 0.0) / mask.sum()
    torch.testing.assert_close(grads[0][1], expected)


def test_bf16_logp_gets_gradient() -> None:
    logp, old, adv, mask = random_case()
    x = logp.to(torch.bfloat16).requires_grad_()
    loss, _ = policy_loss(x, old.to(torch.bfloat16), adv.float(), mask, LossConfig.fipo())
    loss.backward()
    assert loss.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()


# --- shapes and edge cases ------------------------------------------------------------


def test_padding_values_never_leak() -> None:
    logp, old, adv, mask = random_case(4, 8, seed=1)
    dirty_logp, dirty_old = logp.clone(), old.clone()
    dirty_logp[~mask] = -math.inf
    dirty_old[~mask] = math.nan
    for name in sorted(LOSS_PRESETS):
        cfg = loss_config(name)
        x = dirty_logp.clone().requires_grad_()
        dirty, metrics = policy_loss(x, dirty_old, adv, mask, cfg)
        dirty.backward()
        clean, _ = policy_loss(logp, old, adv, mask, cfg)
        assert dirty.item() == pytest.approx(clean.item(), abs=1e-12)
        assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
        assert metrics["loss/nonfinite_tokens"] == 0.0


def test_padded_rows_match_unpadded() -> None:
    logp, old, adv, _ = random_case(2, 5, seed=2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    wide = lambda x, fill: torch.cat([x, torch.full((2, 4), fill, dtype=x.dtype)], 1)  # noqa: E731
    wmask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    for name in ("fipo", "dapo", "grpo"):
        cfg = loss_config(name)
        a, _ = policy_loss(logp, old, adv, mask, cfg)
        b, _ = policy_loss(wide(logp, 0.3), wide(old, -1.0), adv, wmask, cfg)
        assert a.item() == pytest.approx(b.item(), abs=1e-12)


@pytest.mark.parametrize("name", ["fipo", "dapo", "grpo", "dr_grpo"])
def test_all_masked_is_a_defined_zero(name: str) -> None:
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(
        logp, logp.detach() - 0.1, torch.ones(3), torch.zeros(3, 4), loss_config(name)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))
    assert metrics["loss/num_tokens"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


def test_all_masked_row_does_not_change_the_loss() -> None:
    logp, old, adv, mask = random_case(3, 6, seed=4)
    mask[1] = False
    for name in ("fipo", "grpo"):
        cfg = loss_config(name)
        a, _ = policy_loss(logp, old, adv, mask, cfg)
        keep = torch.tensor([0, 2])
        b, _ = policy_loss(logp[keep], old[keep], adv[keep], mask[keep], cfg)
        assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_single_token() -> None:
    logp = torch.tensor([[-0.5]], requires_grad=True)
    loss, metrics = policy_loss(
        logp, torch.tensor([[-0.6]]), torch.tensor([1.0]), torch.ones(1, 1), LossConfig.fipo()
    )
    # F = 0.1 -> f = exp(0.1); r = exp(0.1) < 1.28: loss = -f * r.
    assert loss.item() == pytest.approx(-math.exp(0.1) * math.exp(0.1), rel=1e-6)
    assert metrics["fipo/future_kl_mean"] == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batch_is_a_clear_error(shape: tuple[int, int]) -> None:
    logp = torch.zeros(shape)
    with pytest.raises(ValueError, match="empty batch"):
        policy_loss(logp, logp, torch.zeros(shape[0]), logp.bool(), LossConfig.fipo())


def test_future_kl_empty_and_shape_errors() -> None:
    assert future_kl(torch.zeros(0, 5), torch.zeros(0, 5), 32.0).shape == (0, 5)
    with pytest.raises(ValueError, match="mask"):
        future_kl(torch.zeros(2, 5), torch.zeros(2, 4), 32.0)
    with pytest.raises(ValueError, match="decay_rate"):
        future_kl(torch.zeros(2, 5), torch.zeros(2, 5), 0.0)
    with pytest.raises(ValueError, match="2-D"):
        future_kl(torch.zeros(5), torch.zeros(5), 32.0)


def test_policy_loss_input_errors() -> None:
    logp, old, adv, mask = random_case()
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old[:, :-1], adv, mask, LossConfig.fipo())
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:-1], mask, LossConfig.fipo())
    with pytest.raises(TypeError, match="cfg"):
        policy_loss(logp, old, adv, mask, "fipo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normaliser"):
        policy_loss(logp, old, adv, mask, LossConfig.fipo(), normaliser=0.0)
    with pytest.raises(ValueError, match="safety_threshold needs"):
        influence_weights(old, clip_range=0.2, clip_high_only=True, safety_threshold=3.0)


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clip_low", 1.0),
        ("clip_low", -0.1),
        ("clip_high", -0.01),
        ("dual_clip", 1.1),
        ("decay_rate", 0.0),
        ("decay_rate", math.inf),
        ("influence_clip", -0.2),
        ("safety_threshold", 0.0),
        ("aggregation", "sum"),
        ("log_ratio_clamp", 0.0),
        ("tis_cap", -1.0),
        ("clip_high_only", 1),
        ("clip_low", "0.2"),
        ("clip_low", math.nan),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"LossConfig.{field}"):
        LossConfig(**{field: value})  # type: ignore[arg-type]


def test_cross_field_checks() -> None:
    with pytest.raises(ValueError, match="LossConfig.drop_sequences"):
        LossConfig(dual_clip=None)
    with pytest.raises(ValueError, match="LossConfig.influence_clip"):
        LossConfig(clip_high_only=False, influence_clip=1.0)
    assert LossConfig(dual_clip=None, drop_sequences=False).dual_clip is None


def test_presets_by_name() -> None:
    fipo_cfg, dapo_cfg, grpo_cfg = (loss_config(n) for n in ("fipo", "dapo", "grpo"))
    assert fipo_cfg == LossConfig()
    assert fipo_cfg.uses_future_kl and not dapo_cfg.uses_future_kl
    # DAPO = FIPO minus Future-KL (and the rules that only exist with it).
    assert dapo_cfg == fipo_cfg.replace(
        decay_rate=None, safety_threshold=None, drop_sequences=False
    )
    assert (grpo_cfg.clip_low, grpo_cfg.clip_high) == (0.2, 0.2)
    assert grpo_cfg.aggregation == "seq_mean_token_mean" and grpo_cfg.dual_clip is None
    assert loss_config("fipo", decay_rate=16.0).decay_rate == 16.0
    with pytest.raises(ValueError, match="unknown loss preset"):
        loss_config("ppo")
    with pytest.raises(TypeError):
        loss_config("fipo", no_such_field=1)
    with pytest.raises(AttributeError):
        fipo_cfg.decay_rate = 1.0  # type: ignore[misc]  # frozen


def test_grpo_is_sequence_mean() -> None:
    logp = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    grpo_loss, _ = policy_loss(logp, logp, adv, mask, LossConfig.grpo())
    dapo_loss, _ = policy_loss(logp, logp, adv, mask, LossConfig.dapo())
    assert grpo_loss.item() == pytest.approx((-1.0 + 2.0) / 2)  # per row, then over rows
    assert dapo_loss.item() == pytest.approx((-3.0 + 2.0) / 4)  # over tokens
    drgrpo_loss, _ = policy_loss(logp, logp, adv, mask, LossConfig.dr_grpo())
    assert drgrpo_loss.item() == pytest.approx((-3.0 + 2.0) / 6)  # constant B * T


def test_normaliser_splits_micro_batches_exactly() -> None:
    logp, old, adv, mask = random_case(4, 6, seed=5)
    for name in ("fipo", "grpo"):
        cfg = loss_config(name)
        whole, _ = policy_loss(logp, old, adv, mask, cfg)
        norm = float(mask.sum()) if cfg.aggregation == "token_mean" else float(mask.any(1).sum())
        parts = sum(
            policy_loss(logp[s], old[s], adv[s], mask[s], cfg, normaliser=norm)[0]
            for s in (slice(0, 2), slice(2, 4))
        )
        assert parts.item() == pytest.approx(whole.item(), abs=1e-12)


# --- behaviour-policy correction ---------------------------------------------------------


def test_truncated_importance_sampling() -> None:
    logp = t64([-1.0, -1.0, -1.0])
    behaviour = t64([-1.0, -1.0 - math.log(1.5), -1.0 - math.log(5.0)])  # w = 1, 1.5, 5 -> 2
    args = (logp, logp.clone(), t64([1.0])[0], ones(3))
    cfg = LossConfig.dapo(tis_cap=2.0)
    plain, _ = policy_loss(*args, cfg)
    corrected, metrics = policy_loss(*args, cfg, behaviour_logp=behaviour)
    assert plain.item() == pytest.approx(-1.0)
    assert corrected.item() == pytest.approx(-(1.0 + 1.5 + 2.0) / 3)
    assert metrics["loss/tis_clip_frac"] == pytest.approx(1 / 3)
    assert metrics["loss/tis_weight_max"] == pytest.approx(5.0)
    assert metrics["loss/behaviour_kl"] > 0
    # tis_cap=None: mismatch metrics only, no correction.
    off, off_metrics = policy_loss(*args, cfg.replace(tis_cap=None), behaviour_logp=behaviour)
    assert off.item() == pytest.approx(-1.0) and "loss/behaviour_kl" in off_metrics


def test_metrics_are_namespaced_floats() -> None:
    logp, old, adv, mask = random_case(4, 8, seed=6)
    _, metrics = policy_loss(logp, old, adv, mask, LossConfig.fipo())
    assert metrics and all(k.split("/")[0] in {"loss", "fipo"} for k in metrics)
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert 1.0 <= metrics["fipo/influence_min"] <= metrics["fipo/influence_max"] <= 1.2
    _, dapo_metrics = policy_loss(logp, old, adv, mask, LossConfig.dapo())
    assert not any(k.startswith("fipo/") for k in dapo_metrics)


def test_participation_filter_off_lets_capped_tokens_feed_future_kl():
    """The paper's ablation: with the filter off, a token whose ratio exceeds the dual-clip
    constant still adds to F; with it on (the recipe) it adds nothing."""
    from trainer.fipo import future_kl, token_losses

    old = torch.zeros(1, 4, dtype=torch.float64)
    # Token 2's ratio is e^3 ~ 20 > dual_clip 10; the others are mild.
    logp = torch.tensor([[0.05, -0.02, 3.0, 0.01]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=torch.float64)
    on = token_losses(logp, old, adv, mask, LossConfig.fipo(tis_cap=None))
    off = token_losses(
        logp, old, adv, mask, LossConfig.fipo(tis_cap=None, participation_filter=False)
    )
    assert torch.allclose(on.future_kl, future_kl(logp, mask, 32.0, ratio_cap=10.0))
    assert torch.allclose(off.future_kl, future_kl(logp, mask, 32.0, ratio_cap=None))
    # Tokens at or before the capped one see it in F only with the filter off.
    assert (off.future_kl[0, :3] - on.future_kl[0, :3] > 2.5).all()
    assert torch.equal(off.future_kl[0, 3], on.future_kl[0, 3])
    with pytest.raises(ValueError, match="participation_filter"):
        LossConfig.fipo(participation_filter="no")


def test_algorithm_participation_filter_reaches_the_loss():
    from trainer.config import AlgorithmConfig
    from trainer.learner import build_loss_config

    assert build_loss_config(AlgorithmConfig()).participation_filter is True
    cfg = AlgorithmConfig(participation_filter=False)
    assert build_loss_config(cfg).participation_filter is False
