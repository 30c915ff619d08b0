"""Wall time per training step: synchronous (max_staleness=0) vs decoupled (=1).

Runs ``python -m trainer.run`` twice with the same settings, once per mode, with the
rollout worker and the learner pinned to separate CPU sets in both (as separate GPUs
would be in production), and prints the median step time of each and their ratio.
The first ``--warmup`` steps of each run are left out (engine warm-up, first compiles).

    python benchmarks/bench_trainer.py --steps 6 --worker-cpus 0 --learner-cpus 1

On a 2-core machine both sides are compute-bound on one core each, so the overlap has
little to win; the figure that matters there is that decoupling is never slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(staleness: int, args: argparse.Namespace, out_dir: Path) -> dict[str, float]:
    """Train ``args.steps`` steps with ``max_staleness=staleness``; return step-time stats."""
    name = f"staleness{staleness}"
    cmd = [
        sys.executable, "-m", "trainer.run",
        f"run.out_dir={out_dir}", f"run.name={name}", f"run.steps={args.steps}",
        f"rollout.max_staleness={staleness}", "run.progress=false",
        "eval.num_problems=0", "eval.at_start=false", "run.checkpoint_every=0",
        f"rollout.worker_cpus={args.worker_cpus}", f"rollout.learner_cpus={args.learner_cpus}",
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
        "steps_timed": float(len(timed)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--worker-cpus", default="0")
    p.add_argument("--learner-cpus", default="1")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("extra", nargs="*", help="more trainer overrides (key=value)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        results = {s: run_mode(s, args, Path(tmp)) for s in (0, 1)}
    print(f"{'mode':<14}{'step s':>9}{'wait s':>9}{'gen s':>9}{'learn s':>9}{'stale':>7}")
    for s, r in results.items():
        label = "sync (S=0)" if s == 0 else "decoupled S=1"
        print(f"{label:<14}{r['step_s']:>9.1f}{r['wait_s']:>9.1f}{r['gen_s']:>9.1f}"
              f"{r['learner_s']:>9.1f}{r['staleness']:>7.2f}")  # fmt: skip
    ratio = results[1]["step_s"] / results[0]["step_s"]
    print(
        f"decoupled / sync step time: {ratio:.2f}x  (target <= 0.7x with separate compute; "
        f"worker cpus {args.worker_cpus}, learner cpus {args.learner_cpus})"
    )


if __name__ == "__main__":
    main()
