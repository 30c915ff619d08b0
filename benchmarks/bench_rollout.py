"""Rollout throughput: vLLM vs Hugging Face ``generate`` on the same model and prompts.

Both engines are the trainer's own adapters (``trainer.engines``), given the same
chat-templated arithmetic prompts from ``fipo_env`` and the same sampling settings
(n samples per prompt, temperature, max tokens, EOS stop). Both are loaded at once; each
gets an untimed warm-up call, then the prompts are split into ``--rounds`` slices and
the engines take turns on each slice (HF, vLLM, HF, vLLM, ...), so a load change on a
shared machine hits both alike. The figure is generated (response) tokens per second of
generate wall time, summed over the slices. Engine start-up is reported separately.

    python benchmarks/bench_rollout.py                      # defaults below
    python benchmarks/bench_rollout.py --prompts 64 --n 8 --max-tokens 96 --json out.json

Target (issue): vLLM >= 3x HF generate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_prompts(model_dir: str, count: int, seed: int) -> list[list[int]]:
    """``count`` chat-templated prompts of the default arithmetic task (train split)."""
    import gymnasium as gym

    import fipo_env

    env = gym.make_vec(
        fipo_env.ENV_ID, num_envs=count, tokenizer=model_dir, verifier="local", task="arithmetic"
    )
    try:
        obs, _ = env.reset(seed=seed)
        return [obs["prompt_ids"][i, : obs["prompt_len"][i]].tolist() for i in range(count)]
    finally:
        env.close()


def timed(engine, prompts, n, sampling) -> tuple[float, int]:
    """Seconds and generated tokens of one generate call."""
    start = time.perf_counter()
    out = engine.generate(prompts, n, sampling)
    return time.perf_counter() - start, sum(len(g.token_ids) for grp in out for g in grp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model dir or 'default'")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=48, help="response-length limit")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hf-batch", type=int, default=128, help="HF sequences per generate")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed slices")
    parser.add_argument(
        "--gpu-mem", type=float, default=0.15, help="vLLM memory share (CPU: of the NUMA node)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from fipo_env.models import resolve_model_dir
    from trainer.engines import EngineConfig, SamplingConfig, vllm_available
    from trainer.engines.hf_engine import HFEngine

    if not vllm_available():
        print("vLLM is not installed here: nothing to compare against.", file=sys.stderr)
        return 2
    model_dir = str(resolve_model_dir(args.model))
    prompts = make_prompts(model_dir, args.prompts, args.seed)
    sampling = SamplingConfig(max_tokens=args.max_tokens, temperature=args.temperature)
    results: dict = {"settings": vars(args) | {"model_dir": model_dir}}
    print(
        f"{len(prompts)} prompts x n={args.n}, max_tokens={args.max_tokens}, "
        f"T={args.temperature}, {args.dtype}, cpus={os.cpu_count()}",
        flush=True,
    )

    from trainer.engines.vllm_engine import VllmEngine

    t0 = time.perf_counter()
    vllm = VllmEngine(
        EngineConfig(
            model_dir=model_dir,
            kind="vllm",
            dtype=args.dtype,
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.gpu_mem,
            max_model_len=1024,
        )
    )
    results["vllm_start_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = HFEngine(
        EngineConfig(model_dir=model_dir, kind="hf", dtype=args.dtype, max_batch_size=args.hf_batch)
    )
    results["hf_start_s"] = time.perf_counter() - t0
    engines = {"hf": hf, "vllm": vllm}
    totals = {name: [0.0, 0] for name in engines}
    try:
        step = -(-len(prompts) // args.rounds)
        # Untimed warm-up: one slice for vLLM (it may compile kernels for new batch
        # shapes on first sight), two prompts for HF (eager: nothing to compile).
        vllm.generate(prompts[:step], args.n, sampling)
        hf.generate(prompts[:2], 1, sampling)
        for r in range(args.rounds):
            chunk = prompts[r * step : (r + 1) * step]
            for name, engine in engines.items():
                seconds, tokens = timed(engine, chunk, args.n, sampling)
                totals[name][0] += seconds
                totals[name][1] += tokens
                print(f"  round {r}: {name:5s} {tokens} tokens in {seconds:.1f} s", flush=True)
    finally:
        vllm.close()
        hf.close()
    for name, (seconds, tokens) in totals.items():
        results[name] = {
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "mean_len": tokens / (len(prompts) * args.n),
        }

    ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    results["ratio"] = ratio
    print(
        f"\nrollout throughput: vLLM {results['vllm']['tokens_per_s']:.0f} tok/s, "
        f"HF generate {results['hf']['tokens_per_s']:.0f} tok/s -> {ratio:.2f}x "
        f"(target >= 3x) | start-up: vLLM {results['vllm_start_s']:.0f} s, "
        f"HF {results['hf_start_s']:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
