"""Run inside the verl venv with the project on PYTHONPATH; prints one JSON object.

Usage: ``VERL_USE_EXTERNAL_MODULES=trainer.verl_loss <verl-python> verl_driver.py spec.json``

Loss: verl's registry (``get_policy_loss_fn("fipo")``) is asked for the loss, which is run
on random tensors with a real ``FSDPActorConfig`` and compared with
``trainer.fipo.policy_loss`` (off-policy: Future-KL active) and, on-policy, with verl's own
``vanilla`` loss (values and gradients). Reward: verl's ``get_custom_reward_fn`` loads
``server/verl_reward.py`` by path (per-sample and batch functions), and verl's
``BatchRewardManager`` scores a ``DataProto`` built with the real tokenizer.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def loss_checks() -> dict:
    import torch
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config.actor import FSDPActorConfig

    import trainer.verl_loss as adapter
    from trainer.fipo import LossConfig, policy_loss

    out: dict = {
        "registry_returns_adapter": get_policy_loss_fn("fipo") is adapter.compute_policy_loss_fipo
    }
    fipo = get_policy_loss_fn("fipo")
    vanilla = get_policy_loss_fn("vanilla")
    cfg = FSDPActorConfig(
        strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
        clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0, loss_agg_mode="token-mean",
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    B, T = 6, 64
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    shift = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    shift[0, 5] = 2.5  # one token over the dual clip (ratio > 10)
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)
    adv = adv_seq[:, None].expand(B, T).clone()
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, 40 + 4 * b :] = False

    def run_verl(fn, logp):
        logp = logp.clone().requires_grad_(True)
        loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                           loss_agg_mode="token-mean", config=cfg, rollout_is_weights=None)  # fmt: skip
        loss.backward()
        return loss.detach(), logp.grad, metrics

    def run_ours(logp, loss_cfg):
        logp = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(logp, old, adv_seq, mask, loss_cfg)
        loss.backward()
        return loss.detach(), logp.grad

    official = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=10.0)
    v_loss, v_grad, metrics = run_verl(fipo, old + shift)
    o_loss, o_grad = run_ours(old + shift, official)
    out["off_policy"] = {
        "verl_fipo": v_loss.item(), "trainer_fipo": o_loss.item(),
        "grad_max_abs_diff": (v_grad - o_grad).abs().max().item(),
        "differs_from_dapo": abs(v_loss.item() - run_ours(old + shift, LossConfig.dapo(
            clip_low=0.2, clip_high=0.28, dual_clip=10.0, drop_sequences=True))[0].item()),
        "metrics": metrics,
    }  # fmt: skip
    # On-policy (the first optimiser step): FIPO is DAPO with dual clip == verl's vanilla.
    f_loss, f_grad, _ = run_verl(fipo, old)
    va_loss, va_grad, _ = run_verl(vanilla, old)
    out["on_policy"] = {
        "verl_fipo": f_loss.item(), "verl_vanilla": va_loss.item(),
        "grad_max_abs_diff": (f_grad - va_grad).abs().max().item(),
    }  # fmt: skip
    # FIPO's own fields through $FIPO_LOSS.
    os.environ[adapter.FIPO_LOSS_ENV] = "decay_rate=4,safety_threshold=3,clip_high_only=false"
    e_loss, _, _ = run_verl(fipo, old + shift)
    del os.environ[adapter.FIPO_LOSS_ENV]
    tuned = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=10.0, decay_rate=4.0,
                       safety_threshold=3.0, clip_high_only=False)  # fmt: skip
    out["env_override"] = {
        "verl_fipo": e_loss.item(),
        "trainer_fipo": run_ours(old + shift, tuned)[0].item(),
    }
    return out


def reward_checks(spec: dict) -> dict:
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager.batch import BatchRewardManager

    cases = spec["cases"]

    def load(name: str):
        cfg = OmegaConf.create({"reward": {"custom_reward_function": {
            "path": spec["reward_file"], "name": name,
            "reward_kwargs": {"address": spec["address"]}}}})  # fmt: skip
        return get_custom_reward_fn(cfg)

    per_sample = load("compute_score")
    single = [
        per_sample(
            data_source="test", solution_str=c["response"], ground_truth=c["gold"], extra_info={}
        )
        for c in cases
    ]
    tok = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
    prompts = [tok(text="Q:", add_special_tokens=False)["input_ids"] for _ in cases]
    responses = [tok(text=c["response"], add_special_tokens=False)["input_ids"] for c in cases]
    P, R = max(map(len, prompts)), max(map(len, responses))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompt_t = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    resp_t = torch.tensor([r + [pad] * (R - len(r)) for r in responses])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (R - len(r))
                         for p, r in zip(prompts, responses, strict=True)])  # fmt: skip
    data = DataProto.from_dict(
        tensors={"prompts": prompt_t, "responses": resp_t, "attention_mask": attn},
        non_tensors={
            "data_source": np.array(["test"] * len(cases), dtype=object),
            "reward_model": np.array([{"ground_truth": c["gold"]} for c in cases], dtype=object),
            "extra_info": np.array([{} for _ in cases], dtype=object),
        },
    )
    manager = BatchRewardManager(tok, num_examine=0, compute_score=load("compute_score_batch"))
    result = manager(data, return_dict=True)
    lengths = [len(r) for r in responses]
    batch_rewards = [result["reward_tensor"][i, n - 1].item() for i, n in enumerate(lengths)]
    extra = {k: list(v) for k, v in result["reward_extra_info"].items()}
    # The path verl 0.9.1's PPO trainer takes: the reward loop's naive manager, per sample.
    import asyncio

    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    naive = NaiveRewardManager(OmegaConf.create({"reward": {}}), tok, load("compute_score"))
    loop_rewards = [
        loop.run_until_complete(naive.run_single(data[i : i + 1]))["reward_score"]
        for i in range(len(cases))
    ]
    return {"single": single, "batch_rewards": batch_rewards, "batch_extra": extra,
            "reward_loop_rewards": loop_rewards}  # fmt: skip


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    import verl

    out = {"verl": verl.__version__, "loss": loss_checks(), "reward": reward_checks(spec)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
