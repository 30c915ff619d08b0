"""Wall time per training step: synchronous (max_staleness=0) vs decoupled (=1).

Runs ``python -m trainer.run`` once per mode and CPU layout with the same settings and
prints the median step time of each and the decoupled / synchronous ratio. Layouts:

- ``pinned``: the rollout worker and the learner on separate CPU sets in both modes (as
  separate GPUs would be in production);
- ``shared``: no pinning, both sides share every core (the learner uses one thread while
  the worker generates and all cores while it waits, ``model.idle_threads``).

The first ``--warmup`` steps of each run are left out (engine warm-up, first compiles).

    python benchmarks/bench_trainer.py --steps 6 --worker-cpus 0 --learner-cpus 1

On a 2-core machine both sides are compute-bound on one core each, so the overlap has
little to win when shared; the figure that matters there is that decoupling is never
slower.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(
    staleness: int, pinned: bool, args: argparse.Namespace, out_dir: Path
) -> dict[str, float]:
    """Train ``args.steps`` steps with ``max_staleness=staleness``; return step-time stats."""
    name = f"{'pinned' if pinned else 'shared'}-staleness{staleness}"
    worker_cpus, learner_cpus = (args.worker_cpus, args.learner_cpus) if pinned else ("", "")
    cmd = [
        sys.executable, "-m", "trainer.run",
        f"run.out_dir={out_dir}", f"run.name={name}", f"run.steps={args.steps}",
        f"rollout.max_staleness={staleness}", "run.progress=false",
        "eval.num_problems=0", "eval.at_start=false", "run.checkpoint_every=0",
        f"rollout.worker_cpus={worker_cpus}", f"rollout.learner_cpus={learner_cpus}",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group_size}",
        f"rollout.max_response_tokens={args.max_tokens}", "rollout.dynamic_sampling=false",
        *args.extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [
        r
        for r in map(json.loads, (out_dir / name / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    timed = rows[args.warmup :] or rows
    return {
        "step_s": statistics.median(r["perf/step_s"] for r in timed),
        "wait_s": statistics.median(r["perf/wait_s"] for r in timed),
        "learner_s": statistics.median(r["perf/learner_s"] for r in timed),
        "gen_s": statistics.median(r["rollout/gen_s"] for r in timed),
        "staleness": statistics.mean(r["rollout/staleness_mean"] for r in timed),
        "threads": statistics.mean(r.get("perf/learner_threads_mean", 0.0) for r in timed),
        "steps_timed": float(len(timed)),
    }


def main() -> None:
    from trainer.precision import describe_machine

    print(describe_machine(), flush=True)  # figures depend on it (bf16 is native only on some CPUs)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--worker-cpus", default="0")
    p.add_argument("--learner-cpus", default="1")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--layout", choices=("pinned", "shared", "both"), default="both")
    p.add_argument("--out-dir", default="", help="keep the run folders here (default: a temp dir)")
    p.add_argument("extra", nargs="*", help="more trainer overrides (key=value)")
    args = p.parse_args()
    layouts = [True, False] if args.layout == "both" else [args.layout == "pinned"]
    with contextlib.ExitStack() as stack:
        out = Path(args.out_dir) if args.out_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-trainer-")))  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        results = {}
        for pinned in layouts:
            for s in (0, 1):
                results[pinned, s] = run_mode(s, pinned, args, out)
                print(f"done: {'pinned' if pinned else 'shared'} S={s}: {results[pinned, s]}",
                      flush=True)  # fmt: skip
    print(f"\n{'layout':<8}{'mode':<15}{'step s':>8}{'wait s':>8}{'gen s':>8}{'learn s':>9}"
          f"{'stale':>7}{'threads':>9}")  # fmt: skip
    for (pinned, s), r in results.items():
        label = "sync (S=0)" if s == 0 else "decoupled S=1"
        print(f"{'pinned' if pinned else 'shared':<8}{label:<15}{r['step_s']:>8.1f}"
              f"{r['wait_s']:>8.1f}{r['gen_s']:>8.1f}{r['learner_s']:>9.1f}"
              f"{r['staleness']:>7.2f}{r['threads']:>9.2f}")  # fmt: skip
    for pinned in layouts:
        ratio = results[pinned, 1]["step_s"] / results[pinned, 0]["step_s"]
        where = (f"worker cpus {args.worker_cpus}, learner cpus {args.learner_cpus}; target "
                 "<= 0.7x" if pinned else "all cores shared; target: never slower (<= 1x)")  # fmt: skip
        print(
            f"{'pinned' if pinned else 'shared'}: decoupled / sync step time {ratio:.2f}x ({where})"
        )


if __name__ == "__main__":
    main()
