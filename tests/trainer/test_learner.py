"""Learner updates: old log-probs, mini-batch steps, non-finite skips, exact resume."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from trainer.config import build_config  # noqa: E402
from trainer.learner import Learner, build_loss_config  # noqa: E402
from trainer.types import RolloutBatch, RolloutGroup  # noqa: E402

VOCAB = 64


def _batch(seed: int, groups: int = 3, g: int = 4, version: int = 0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(groups):
        prompt = tuple(int(x) for x in rng.integers(1, VOCAB, size=rng.integers(3, 7)))
        resps = tuple(
            tuple(int(x) for x in rng.integers(1, VOCAB, size=rng.integers(1, 9))) for _ in range(g)
        )
        logps = tuple(tuple(float(v) for v in -rng.random(len(r)) * 3) for r in resps)
        rewards = np.array([1.0, -1.0] * (g // 2))
        out.append(
            RolloutGroup(
                prompt_ids=prompt,
                response_ids=resps,
                behaviour_logp=logps,
                rewards=rewards,
                correct=rewards > 0,
                truncated=np.zeros(g, bool),
                policy_version=version,
            )
        )
    return RolloutBatch(
        groups=tuple(out), num_generated_groups=groups, gen_seconds=0.0, gen_tokens=0
    )


def _advantages(batch: RolloutBatch) -> list[np.ndarray]:
    from trainer.advantages import group_advantages

    rewards = np.stack([g.rewards for g in batch.groups])
    return list(group_advantages(rewards))


def _learner(
    model_dir: Path, model: dict | None = None, algorithm: dict | None = None, **optim
) -> Learner:
    values = {
        "model": {
            "path": str(model_dir),
            "device": "cpu",
            "autocast_dtype": "float32",
            "micro_batch_tokens": 40,
            **(model or {}),
        },
        "rollout": {"prompts_per_step": 3, "group_size": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 0, **optim},
        "algorithm": algorithm or {},
    }
    cfg = build_config(values)
    return Learner(cfg, model_dir, build_loss_config(cfg.algorithm), pad_id=0)


def _weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def test_shared_prompt_and_padded_layouts_give_the_same_loss_and_gradient(
    tiny_model_dir: Path,
) -> None:
    # Compared through the loss and gradient norm: AdamW's first step is ~lr * sign(grad),
    # so weights after it would magnify rounding-level differences of near-zero grads.
    batch = _batch(4)
    metrics = []
    for shared in (False, True):
        model = {"share_prompt": shared, "micro_batch_tokens": 10_000}  # one micro-batch
        learner = _learner(tiny_model_dir, model, mini_batches=1)
        assert learner.shared_prompt is shared
        metrics.append(learner.update(batch, _advantages(batch)))
    padded, packed = metrics
    assert packed["learner/response_tokens"] == padded["learner/response_tokens"]
    assert packed["perf/learner_padded_tokens"] < padded["perf/learner_padded_tokens"]
    for key in ("loss/policy", "optim/grad_norm", "loss/token_loss_mean"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("algorithm", ["fipo", "grpo"])
def test_gradient_accumulation_is_exact_with_a_dropped_response(
    tiny_model_dir: Path, algorithm: str
) -> None:
    """One micro-batch or many: the same loss, gradient norm and weights, also when the
    sequence-drop rule removes responses (forced: the negative-advantage rows get old log-probs lowered
    by 3 nats, so their ratios are e^3 > c = 10)."""
    batch = _batch(9, groups=4)  # every response has >= 2 tokens
    results = []
    for micro_batch_tokens in (10_000, 16):  # one micro-batch per mini-batch / many
        learner = _learner(
            tiny_model_dir,
            {"micro_batch_tokens": micro_batch_tokens},
            mini_batches=2,
            algorithm={"name": algorithm, "dual_clip": 10.0},
        )
        forward = learner._logprobs

        def shifted(mb, forward=forward, **kwargs):
            lp = forward(mb, **kwargs)
            if torch.is_grad_enabled():
                return lp
            return lp - 3.0 * (mb.rows % 2 == 1).to(lp.dtype)[:, None]

        learner._logprobs = shifted  # type: ignore[method-assign]
        metrics = learner.update(batch, _advantages(batch))
        results.append((metrics, _weights(learner)))
    (one, w_one), (many, w_many) = results
    if algorithm == "fipo":
        assert one["loss/dropped_sequences"] > 0 and many["loss/dropped_sequences"] > 0
    for key in ("optim/grad_norm", "loss/policy"):
        assert many[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    for k in w_one:  # AdamW steps ~lr * sign(grad): near-zero grads magnify rounding
        torch.testing.assert_close(w_many[k], w_one[k], rtol=1e-3, atol=1e-4)


def test_thread_policy_is_asked_before_every_forward(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir, mini_batches=2)
    answers = iter([2, 1] * 50)
    asked = []

    def policy() -> int:
        asked.append(next(answers))
        return asked[-1]

    learner.thread_policy = policy
    before = torch.get_num_threads()
    try:
        metrics = learner.update(_batch(5), _advantages(_batch(5)))
    finally:
        torch.set_num_threads(before)
    assert len(asked) >= 3  # old-logp pass + two mini-batches, at least one forward each
    assert metrics["perf/learner_threads_mean"] == pytest.approx(sum(asked) / len(asked))


def test_first_step_is_on_policy_and_later_steps_move_the_policy(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir, mini_batches=1)
    before = _weights(learner)
    batch = _batch(1)
    metrics = learner.update(batch, _advantages(batch))
    # One mini-batch: logp == old_logp bit for bit, so the ratio is exactly 1, F = 0.
    assert metrics["loss/ratio_min"] == 1.0 and metrics["loss/ratio_max"] == 1.0
    assert metrics["fipo/all_mb/future_kl_abs_mean"] == 0.0
    assert "fipo/future_kl_abs_mean" not in metrics  # no mini-batch where F can act
    assert metrics["optim/skipped_nonfinite"] == 0.0
    assert learner.version == 1 and learner.optimizer_steps == 1
    after = _weights(learner)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    learner = _learner(tiny_model_dir, mini_batches=3)
    metrics = learner.update(batch, _advantages(batch))
    assert learner.optimizer_steps == 3
    # Later mini-batches see a moved policy: Future-KL is non-zero.
    assert metrics["loss/ratio_max"] > 1.0 or metrics["loss/ratio_min"] < 1.0
    assert metrics["fipo/future_kl_abs_mean"] > 0.0


def test_update_metrics_are_totals_token_weighted_and_future_kl_where_it_acts(
    tiny_model_dir: Path,
) -> None:
    learner = _learner(tiny_model_dir, {"micro_batch_tokens": 16}, mini_batches=3)
    batch = _batch(9, groups=4)
    metrics = learner.update(batch, _advantages(batch))
    # Totals, not per-micro-batch means (no response is dropped here).
    assert metrics["loss/dropped_sequences"] == 0.0
    assert metrics["loss/num_tokens"] == metrics["learner/response_tokens"]
    assert metrics["loss/num_sequences"] == metrics["learner/sequences"]
    # The first mini-batch has F = 0 by construction: over the mini-batches where
    # Future-KL acts |F| is larger than over all of them (kept as fipo/all_mb/...).
    acting, every = metrics["fipo/future_kl_abs_mean"], metrics["fipo/all_mb/future_kl_abs_mean"]
    assert acting > every > 0.0
    # The paper's readings: entropy of the sampled tokens' distributions, ratio quantiles.
    assert 0.0 < metrics["policy/entropy"] <= math.log(VOCAB) + 1e-5
    assert metrics["loss/ratio_p10"] <= metrics["loss/ratio_p50"] <= metrics["loss/ratio_p90"]
    assert metrics["loss/ratio_min"] <= metrics["loss/ratio_p10"]
    assert metrics["loss/ratio_p90"] <= metrics["loss/ratio_max"]


def test_nonfinite_loss_skips_the_step_and_leaves_weights_alone(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir, mini_batches=2)
    before = _weights(learner)
    batch = _batch(2)
    bad = [np.full(len(a), np.nan) for a in _advantages(batch)]
    metrics = learner.update(batch, bad)
    assert metrics["optim/skipped_nonfinite"] == 2.0
    assert learner.optimizer_steps == 0
    after = _weights(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(s["exp_avg"].abs().sum() > 0 for s in learner.optimizer.state.values())


def test_all_zero_advantages_do_not_move_the_weights(tiny_model_dir: Path) -> None:
    # Weight decay and Adam momentum would move the weights on a zero gradient.
    learner = _learner(tiny_model_dir, mini_batches=2, weight_decay=0.1)
    warm = _batch(6)
    learner.update(warm, _advantages(warm))  # Adam state is non-zero from here on
    steps, before = learner.optimizer_steps, _weights(learner)
    batch = _batch(2)
    metrics = learner.update(batch, [np.zeros(len(a)) for a in _advantages(batch)])
    assert metrics["optim/skipped_zero_advantage"] == 2.0
    assert learner.optimizer_steps == steps
    after = _weights(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert learner.version == 2  # the batch was consumed all the same


def _poison_first_forward(learner: Learner, value: float, grad: bool = True) -> None:
    """The first forward with autograd on (``grad``; else off) returns ``value`` at one
    response token."""
    forward, calls = learner._logprobs, []

    def poisoned(mb, **kwargs):
        out = forward(mb, **kwargs)
        lp, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        if torch.is_grad_enabled() == grad and not calls:
            calls.append(1)
            row, col = (mb.response_mask > 0).nonzero()[0].tolist()
            lp = lp.index_put((torch.tensor([row]), torch.tensor([col])), torch.tensor(value))
        return lp if rest is None else (lp, *rest)

    learner._logprobs = poisoned  # type: ignore[method-assign]


def test_infinite_logprob_skips_the_step(tiny_model_dir: Path) -> None:
    # An old log-prob of -inf (the no-grad pass of the second mini-batch) is clamped to a
    # ratio of e^20 and the loss stays finite: only the nonfinite-token count shows it,
    # and docs/fipo.md says such a step is skipped.
    learner = _learner(tiny_model_dir, mini_batches=2)
    _poison_first_forward(learner, -math.inf, grad=False)
    batch = _batch(3)
    metrics = learner.update(batch, _advantages(batch))
    assert metrics["optim/skipped_nonfinite"] == 1.0
    assert learner.optimizer_steps == 1


def test_epochs_after_a_skipped_first_mini_batch_have_every_old_logp(
    tiny_model_dir: Path,
) -> None:
    """Every training forward after the skipped one uses the policy the update started
    from as ``old``, row by row (not the moved policy, not the poisoned values)."""
    import trainer.fipo
    from trainer.packing import flatten_batch

    learner = _learner(tiny_model_dir, {"micro_batch_tokens": 16}, mini_batches=2, epochs=2)
    batch = _batch(9, groups=4)
    adv = _advantages(batch)
    reference = learner.logprobs(flatten_batch(batch, adv))  # the old policy, per row
    _poison_first_forward(learner, math.nan)
    forward, rows_seen, olds = learner._logprobs, [], []

    def spy_forward(mb, **kwargs):
        if torch.is_grad_enabled():
            rows_seen.append(mb.rows.tolist())
        return forward(mb, **kwargs)

    def spy_loss(logp, old, *args, **kwargs):
        olds.append(old.detach().cpu())
        return real_loss(logp, old, *args, **kwargs)

    real_loss = trainer.fipo.policy_loss_terms
    learner._logprobs = spy_forward  # type: ignore[method-assign]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.fipo, "policy_loss_terms", spy_loss)
        metrics = learner.update(batch, adv)
    assert metrics["optim/skipped_nonfinite"] == 1.0
    assert learner.optimizer_steps == 3
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["optim/grad_norm"])
    for rows, old in list(zip(rows_seen, olds, strict=True))[1:]:  # [0]: the poisoned one
        for i, r in enumerate(rows):
            n = len(reference[r])
            torch.testing.assert_close(old[i, :n], reference[r], atol=1e-5, rtol=1e-5)


def test_resume_continues_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    a = _learner(tiny_model_dir, mini_batches=2)
    b1, b2 = _batch(3), _batch(4)
    a.update(b1, _advantages(b1))
    save_checkpoint(tmp_path, 1, a.state_dict(), {"note": "x"}, keep=2)

    b = _learner(tiny_model_dir, mini_batches=2)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 1 and state["extra"]["note"] == "x"
    b.load_state_dict(state["learner"])
    assert b.version == a.version and b.optimizer_steps == a.optimizer_steps
    ma = a.update(b2, _advantages(b2))
    mb = b.update(b2, _advantages(b2))
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ma["loss/policy"] == mb["loss/policy"]


def test_checkpoints_are_pruned_and_latest_points_to_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, {}, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_000002", "step_000003"]
    assert load_checkpoint(tmp_path)["learner"]["x"].item() == 3
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_checkpoint(tmp_path / "nowhere")


def test_hf_state_dict_unties_shared_tensors(tiny_model_dir: Path) -> None:
    learner = _learner(tiny_model_dir)
    sd = learner.hf_state_dict()
    ptrs = [t.untyped_storage().data_ptr() for t in sd.values()]
    assert len(ptrs) == len(set(ptrs))
    # Cast for the engine: every float tensor in bf16, none sharing the model's memory.
    cast = learner.hf_state_dict(torch.bfloat16)
    assert cast.keys() == sd.keys()
    params = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    for name, t in cast.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, sd[name].to(torch.bfloat16)), name
        assert t.untyped_storage().data_ptr() not in params, name
