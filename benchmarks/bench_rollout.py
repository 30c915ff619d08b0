"""Rollout throughput: vLLM vs Hugging Face ``generate``, in the trainer's own layout.

Default (``--mode trainer``): each engine runs inside ``python -m trainer.run`` exactly as
a user's run does -- the rollout worker process (engine + env + verifier), the reward
server, and the learner training on the previous batch while the next is generated
(``max_staleness=1``). The figure is the worker's own ``rollout/gen_tokens_per_s`` (response
tokens per second of generation wall time) over the steps after the first, i.e. with the
learner busy beside it; the engine start-up is reported apart. ``--cold`` points vLLM's
and torch inductor's compile caches at empty folders, as on a fresh machine.

    python benchmarks/bench_rollout.py                       # trainer layout, both engines
    python benchmarks/bench_rollout.py --cold --steps 3
    python benchmarks/bench_rollout.py --mode isolated       # engines alone, alternating

``--mode isolated`` loads both adapters in this process, gives each an untimed warm-up,
then alternates timed slices of the same prompts (HF, vLLM, HF, ...). Both modes print the
CPU capability (``torch.backends.cpu.get_cpu_capability()``) and the dtype used.

Target (issue): vLLM >= 3x HF generate, in the trainer's configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fipo_env.models import offline_hub  # noqa: E402 -- after the path insert

offline_hub()


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


def machine() -> dict:
    """What the figures depend on: CPU capability, native bf16, cores, load."""
    from trainer.precision import choose, detect

    hw = detect("auto")
    return {
        "capability": hw.capability,
        "bf16_native": hw.bf16_native,
        "auto_dtype": choose(hw).engine_dtype,
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def run_trainer(engine: str, args, out_dir: Path, cache_dir: Path | None) -> dict:
    """One ``python -m trainer.run`` with ``rollout.engine=engine``; its rollout figures."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cache_dir is not None:  # a fresh machine: no compiled graphs to reuse
        env["VLLM_CACHE_ROOT"] = str(cache_dir / "vllm")
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    cmd = [
        sys.executable, "-m", "trainer.run", f"rollout.engine={engine}",
        f"rollout.dtype={args.dtype}", f"model.autocast_dtype={args.dtype}",
        f"run.steps={args.steps}", "eval.num_problems=0", "run.checkpoint_every=0",
        "run.progress=false", f"run.out_dir={out_dir}", f"run.name={engine}",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.n}",
        f"rollout.max_response_tokens={args.max_tokens}",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"trainer run ({engine}) failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    records = [json.loads(x) for x in (out_dir / engine / "metrics.jsonl").read_text().splitlines()]
    setup = next(r for r in records if r["kind"] == "setup")
    train = [r for r in records if r["kind"] == "train"]
    later = train[1:] or train  # batch 0 is made before the learner has anything to train
    tokens = sum(r["rollout/gen_tokens_per_s"] * r["rollout/gen_s"] for r in later)
    seconds = sum(r["rollout/gen_s"] for r in later)
    return {
        "engine_start_s": setup["perf/engine_start_s"],
        "engine_is_vllm": bool(setup["setup/engine_vllm"]),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_first_batch": train[0]["rollout/gen_tokens_per_s"],
        "learner_s_mean": sum(r["perf/learner_s"] for r in train) / len(train),
        "step_s_mean": sum(r["perf/step_s"] for r in later) / len(later),
        "wall_s": wall,
    }


def trainer_mode(args) -> dict:
    import tempfile

    results: dict = {"mode": "trainer", "settings": vars(args), "machine": machine()}
    m = results["machine"]
    print(f"trainer layout: {args.prompts} prompts x G={args.n}, <= {args.max_tokens} tokens, "
          f"{args.steps} steps, dtype {args.dtype} | CPU {m['capability']} (bf16 native: "
          f"{m['bf16_native']}), {m['cpus']} cores, load {m['load_avg_1m']:.1f}"
          + (" | cold compile caches" if args.cold else ""), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        for engine in ("vllm", "hf"):
            cache = Path(tmp) / f"cache-{engine}" if args.cold else None
            r = run_trainer(engine, args, Path(tmp) / "runs", cache)
            results[engine] = r
            print(f"  {engine:5s} start-up {r['engine_start_s']:6.1f} s | "
                  f"{r['tokens_per_s']:6.1f} tokens/s with the learner busy "
                  f"(first batch, learner idle: {r['tokens_per_s_first_batch']:.1f}) | "
                  f"step {r['step_s_mean']:.1f} s, learner {r['learner_s_mean']:.1f} s",
                  flush=True)  # fmt: skip
    if not results["vllm"]["engine_is_vllm"]:
        raise SystemExit("vLLM did not start (the run fell back to HF): see its rollout_worker.log")
    ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    results["ratio"] = ratio
    print(f"\nrollout throughput in the trainer: vLLM {results['vllm']['tokens_per_s']:.0f} "
          f"tok/s vs HF generate {results['hf']['tokens_per_s']:.0f} tok/s -> {ratio:.2f}x "
          f"(target >= 3x) | engine start-up: vLLM {results['vllm']['engine_start_s']:.0f} s, "
          f"HF {results['hf']['engine_start_s']:.0f} s")  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="trainer", choices=["trainer", "isolated"])
    parser.add_argument("--steps", type=int, default=3, help="trainer mode: training steps")
    parser.add_argument("--cold", action="store_true", help="trainer mode: empty compile caches")
    parser.add_argument("--model", default="default", help="model dir or 'default'")
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts (per step)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=96, help="response-length limit")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--hf-batch", type=int, default=128, help="HF sequences per generate")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed slices")
    parser.add_argument(
        "--gpu-mem", type=float, default=0.15, help="vLLM memory share (CPU: of the NUMA node)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.mode == "trainer":
        results = trainer_mode(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    if args.dtype == "auto":
        from trainer.precision import resolve

        args.dtype = resolve("auto", "auto").engine_dtype

    from fipo_env.models import resolve_model_dir
    from trainer.engines import EngineConfig, SamplingConfig, vllm_available
    from trainer.engines.hf_engine import HFEngine

    if not vllm_available():
        print("vLLM is not installed here: nothing to compare against.", file=sys.stderr)
        return 2
    model_dir = str(resolve_model_dir(args.model))
    prompts = make_prompts(model_dir, args.prompts, args.seed)
    sampling = SamplingConfig(max_tokens=args.max_tokens, temperature=args.temperature)
    results: dict = {"mode": "isolated", "settings": vars(args) | {"model_dir": model_dir},
                     "machine": machine()}  # fmt: skip
    print(
        f"{len(prompts)} prompts x n={args.n}, max_tokens={args.max_tokens}, "
        f"T={args.temperature}, {args.dtype}, cpus={os.cpu_count()}, "
        f"CPU {results['machine']['capability']}",
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
