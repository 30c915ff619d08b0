"""Seconds per ``Learner.update``: padded micro-batches vs shared-prompt packing.

Builds one rollout batch of the TRL benchmark's shape (``arithmetic:0`` prompts rendered by
the env, 8 prompts x 8 samples, response lengths drawn uniformly from 5-96 tokens, random
token ids, +-1 rewards) and times ``Learner.update`` on the embedded default model with
the CPU preset, once per layout (``model.share_prompt=false`` is the baseline) and per
thread count, in this one process. Each configuration gets a fresh learner, one untimed
warm-up update, then ``--repeats`` timed updates (median reported).

    python benchmarks/bench_learner.py                   # 1 thread, both layouts
    python benchmarks/bench_learner.py --threads 1,2 --repeats 3

``--random-qwen2`` instead measures the GPU targets: a randomly initialised
Qwen2-0.5B-shaped model under the GPU preset (bf16 autocast, gradient checkpointing,
chunked log-probs), one group of ``--batch`` responses of ``--response-tokens`` tokens,
reporting learner tokens/s, the share of the update spent in ``policy_loss`` (forward;
its backward is part of the model's) and peak GPU memory:

    python benchmarks/bench_learner.py --random-qwen2 --batch 4 --response-tokens 16384
    python benchmarks/bench_learner.py --random-qwen2 --tiny --device cpu   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: make the project's packages importable


def make_batch(model_dir: Path, prompts: int, group_size: int, max_tokens: int, seed: int):
    """A scored rollout batch with real prompts and random responses."""
    import numpy as np

    from fipo_env.config import EnvConfig
    from fipo_env.envs.common import render_prompt
    from fipo_env.models import load_tokenizer
    from fipo_env.tasks import make_task, sample_problems
    from trainer.types import RolloutBatch, RolloutGroup

    tok = load_tokenizer(model_dir)
    rng = np.random.default_rng(seed)
    groups = []
    for p in sample_problems(
        make_task("arithmetic:0", split="train"), prompts, seed, distinct=False
    ):
        resps = tuple(
            tuple(int(x) for x in rng.integers(100, 40_000, int(rng.integers(5, max_tokens + 1))))
            for _ in range(group_size)
        )
        rewards = rng.integers(0, 2, group_size).astype(np.float32) * 2 - 1
        groups.append(
            RolloutGroup(
                prompt_ids=tuple(render_prompt(tok, EnvConfig(), p.question)),
                response_ids=resps,
                behaviour_logp=tuple(tuple(-1.0 for _ in r) for r in resps),
                rewards=rewards,
                correct=rewards > 0,
                truncated=np.zeros(group_size, bool),
                policy_version=0,
            )
        )
    return RolloutBatch(groups=tuple(groups), num_generated_groups=prompts, gen_seconds=0.0,
                        gen_tokens=0)  # fmt: skip


def time_updates(model_dir: Path, batch, overrides: list[str], repeats: int) -> dict[str, float]:
    """Median seconds (and token positions) of ``repeats`` updates after one warm-up."""
    import torch

    from trainer.config import parse_args
    from trainer.learner import Learner, build_loss_config

    cfg = parse_args(["optim.warmup_steps=0", f"model.path={model_dir}", *overrides]).config
    torch.set_num_threads(cfg.model.num_threads or os.cpu_count() or 1)
    learner = Learner(cfg, model_dir, build_loss_config(cfg.algorithm), pad_id=0)
    adv = [g.rewards - g.rewards.mean() for g in batch.groups]
    learner.update(batch, adv)  # warm-up
    seconds, positions = [], 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        m = learner.update(batch, adv)
        seconds.append(time.perf_counter() - t)
        positions = m["perf/learner_padded_tokens"]
    return {"s": statistics.median(seconds), "positions": positions}


def qwen2_05b_config(max_positions: int = 32_768, tiny: bool = False):
    """A Qwen2-0.5B-shaped config (``tiny``: the same architecture, toy sizes)."""
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=max_positions, tie_word_embeddings=True)  # fmt: skip
    return Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=max_positions, tie_word_embeddings=True)  # fmt: skip


def random_qwen2(args: argparse.Namespace) -> int:
    """The GPU learner figures on a random Qwen2-0.5B-shaped model (see the docstring)."""
    import tempfile

    import numpy as np
    import torch
    from transformers import Qwen2ForCausalLM

    import trainer.fipo as fipo
    from trainer.config import parse_args
    from trainer.learner import Learner, build_loss_config
    from trainer.types import RolloutBatch, RolloutGroup

    B, T, P = args.batch, args.response_tokens, args.prompt_tokens
    cfg_model = qwen2_05b_config(max(32_768, P + T), tiny=args.tiny)
    rng = np.random.default_rng(args.seed)
    resps = tuple(tuple(int(x) for x in rng.integers(0, cfg_model.vocab_size, T)) for _ in range(B))
    rewards = np.array([1.0, -1.0] * (B // 2) + [1.0] * (B % 2))
    group = RolloutGroup(
        prompt_ids=tuple(int(x) for x in rng.integers(0, cfg_model.vocab_size, P)),
        response_ids=resps,
        behaviour_logp=tuple(tuple(-2.0 for _ in r) for r in resps),
        rewards=rewards, correct=rewards > 0, truncated=np.zeros(B, bool), policy_version=0,
    )  # fmt: skip
    batch = RolloutBatch(groups=(group,), num_generated_groups=1, gen_seconds=0.0, gen_tokens=0)
    with tempfile.TemporaryDirectory(prefix="qwen2-random-") as tmp:
        torch.manual_seed(args.seed)
        Qwen2ForCausalLM(cfg_model).save_pretrained(tmp)
        cfg = parse_args([
            "--preset", "gpu", f"model.device={args.device}", f"model.path={tmp}",
            "rollout.prompts_per_step=1", f"rollout.group_size={B}",
            f"optim.mini_batches={args.mini_batches}", "optim.warmup_steps=0",
            f"model.micro_batch_tokens={args.micro_batch_tokens or B * (P + T)}",
        ]).config  # fmt: skip
        learner = Learner(cfg, tmp, build_loss_config(cfg.algorithm), pad_id=0)
    device = learner.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss_s = [0.0]
    original = fipo.policy_loss

    def timed_loss(*a, **kw):
        sync()
        t = time.perf_counter()
        out = original(*a, **kw)
        sync()
        loss_s[0] += time.perf_counter() - t
        return out

    fipo.policy_loss = timed_loss  # Learner.update imports it at call time
    adv = [rewards - rewards.mean()]
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        learner.update(batch, adv)  # warm-up
        times, shares = [], []
        for _ in range(args.repeats):
            loss_s[0] = 0.0
            sync()
            t = time.perf_counter()
            learner.update(batch, adv)
            sync()
            times.append(time.perf_counter() - t)
            shares.append(loss_s[0] / times[-1])
    finally:
        fipo.policy_loss = original
    s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"random Qwen2-0.5B shape{' (tiny)' if args.tiny else ''} on {device}: "
          f"{B} x ({P} prompt + {T} response) tokens, {args.mini_batches} mini-batches, "
          f"gradient checkpointing, bf16 autocast")  # fmt: skip
    print(f"update (old log-probs + optimiser steps): {s:.2f} s  -> {B * T / s:,.0f} response "
          f"tokens/s; policy_loss forward share {100 * statistics.median(shares):.2f} %; "
          f"peak GPU memory {peak:.1f} GiB")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    from trainer.precision import describe_machine

    print(describe_machine(), flush=True)  # figures depend on it (bf16 is native only on some CPUs)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-qwen2", action="store_true", help="the GPU mode (see above)")
    p.add_argument("--tiny", action="store_true", help="toy sizes of the same architecture")
    p.add_argument("--device", default="cuda", help="--random-qwen2 device (default cuda)")
    p.add_argument("--batch", type=int, default=4, help="--random-qwen2 responses")
    p.add_argument("--response-tokens", type=int, default=16_384)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--micro-batch-tokens", type=int, default=0, help="0: the whole batch")
    args = p.parse_args(argv)
    if args.random_qwen2:
        return random_qwen2(args)
    try:
        threads = [int(x) for x in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if min(threads) < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be >= 1")
    from fipo_env.models import default_model_dir, offline_hub

    offline_hub()

    model_dir = default_model_dir()
    batch = make_batch(model_dir, args.prompts, args.group_size, args.max_tokens, args.seed)
    tokens = sum(len(r) for g in batch.groups for r in g.response_ids)
    print(f"batch: {args.prompts} prompts of {len(batch.groups[0].prompt_ids)} tokens x "
          f"{args.group_size} samples, {tokens} response tokens; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'threads':>7} {'layout':<14}{'positions':>10}{'s/update':>10}{'speed-up':>10}")
    for n in threads:
        base = None
        for shared in (False, True):
            over = [f"model.num_threads={n}", f"model.share_prompt={str(shared).lower()}"]
            r = time_updates(model_dir, batch, over, args.repeats)
            base = base or r["s"]
            print(f"{n:>7} {'shared prompt' if shared else 'padded':<14}{r['positions']:>10.0f}"
                  f"{r['s']:>10.1f}{base / r['s']:>9.2f}x", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
