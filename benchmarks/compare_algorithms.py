"""FIPO vs DAPO vs GRPO (and FIPO without its participation filter), side by side.

Runs ``python -m trainer.run`` once per (algorithm, seed) with the same model, task,
prompts, sampling budget and held-out problems, then writes one report: curves with the
seed spread shaded (``docs/figures/compare_*.png``), a table, accuracy against response
length, and sampled responses from the start, middle and end of training.

    python benchmarks/compare_algorithms.py                     # CPU comparison, 3 seeds
    python benchmarks/compare_algorithms.py --report-only       # redraw from finished runs
    python benchmarks/compare_algorithms.py --preset gpu --model /models/qwen2.5-0.5b

Idempotent and resumable: a finished run (its ``final_model`` written, all steps logged)
is skipped, an interrupted one continues from its last checkpoint with ``trainer.run
--resume``, so the same command finishes the comparison after a session ends.

What is compared (the CPU default): arithmetic levels 1-3 (one-digit mixed operations,
then the multi-step ones: two-digit carries, products and three-term expressions), a
system prompt asking for step-by-step work, a 256-token budget with DAPO's soft overlong
buffer on, G = 8 samples for 8 prompts a step, 12 steps (docs/fipo.md has the results).
``fipo-nofilter`` is the paper's ablation: FIPO with tokens beyond the dual-clip constant
still feeding Future-KL (``algorithm.participation_filter=false``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.plots import read_metrics  # noqa: E402 -- after the path insert
from trainer.precision import describe_machine  # noqa: E402

# Each algorithm's overrides on top of the shared settings.
ALGORITHMS: dict[str, list[str]] = {
    "fipo": ["algorithm.name=fipo"],
    "dapo": ["algorithm.name=dapo"],
    "grpo": ["algorithm.name=grpo"],
    "fipo-nofilter": ["algorithm.name=fipo", "algorithm.participation_filter=false"],
}
COLOURS = {"fipo": "tab:blue", "dapo": "tab:orange", "grpo": "tab:green",
           "fipo-nofilter": "tab:red"}  # fmt: skip

SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step: write each intermediate "
    "result on its own line, check it, then give the final answer in \\boxed{}."
)

# The same for every algorithm and preset: what the comparison is about.
SHARED = [f"task.system_prompt={SYSTEM_PROMPT}", "run.progress=false", "eval.at_start=true"]

# The CPU sizing: the embedded 135M model, a run of about 15 minutes on 2 cores.
CPU = [
    "task.spec=arithmetic:1,2,3",
    "rollout.max_response_tokens=256",
    "rollout.overlong_buffer=64",
    "rollout.prompts_per_step=8",
    "rollout.group_size=8",
    "eval.num_problems=100",
    "eval.every=4",
    "run.checkpoint_every=2",
]
CPU_STEPS = 12

# (key, title) of the curves figure; each panel one metric, every algorithm a colour.
CURVES = (
    ("eval", "eval/accuracy", "held-out accuracy (greedy)"),
    ("train", "reward/accuracy", "training accuracy (sampled)"),
    ("train", "rollout/response_len_mean", "response length, mean (tokens)"),
    ("train", "rollout/response_len_p90", "response length, p90 (tokens)"),
    ("train", "fipo/future_kl_abs_mean", "Future-KL |F| mean"),
    ("train", "fipo/influence_mean", "influence weight mean"),
    ("train", "policy/entropy", "policy entropy (sampled tokens)"),
    ("train", "loss/clip_frac_high", "clip fraction, high"),
    ("train", "loss/clip_frac_low", "clip fraction, low"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algorithms", default="fipo,dapo,grpo,fipo-nofilter",
                   help=f"comma-separated, of {sorted(ALGORITHMS)}")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (run.seed = task.seed)")
    p.add_argument("--ablation-seeds", default="",
                   help="seeds for fipo-nofilter (default: the same as --seeds)")  # fmt: skip
    p.add_argument("--out", default="runs/compare", help="folder of the runs and the report")
    p.add_argument("--preset", default="cpu", help="trainer preset (cpu, gpu, paper)")
    p.add_argument("--model", default="", help="model folder (default: the embedded model)")
    p.add_argument("--steps", type=int, default=0,
                   help=f"training steps per run (default: {CPU_STEPS} on cpu, the preset's else)")  # fmt: skip
    p.add_argument("--docs", default="docs",
                   help="where figures (figures/compare_*.png) and the table (fipo.md) go; "
                   "empty: only the report in --out")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="draw the report, run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides (section.field=value)")
    args = p.parse_args(argv)
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad:
        p.error(f"unknown algorithm(s) {bad}; known: {sorted(ALGORITHMS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        args.ablation_seeds = [int(s) for s in args.ablation_seeds.split(",") if s] or args.seeds
    except ValueError:
        p.error(f"--seeds / --ablation-seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds must name at least one seed")
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    if not args.steps and args.preset == "cpu":
        args.steps = CPU_STEPS
    return args


def planned_runs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(algorithm, seed) pairs, seed-major so an interrupted comparison is balanced."""
    seeds = sorted(set(args.seeds) | set(args.ablation_seeds))
    return [
        (alg, seed)
        for seed in seeds
        for alg in args.algorithms
        if seed in (args.ablation_seeds if alg == "fipo-nofilter" else args.seeds)
    ]


def trainer_args(args: argparse.Namespace, alg: str, seed: int) -> list[str]:
    """``trainer.run`` arguments of one run (a fresh start)."""
    out = ["--preset", args.preset, *SHARED, *(CPU if args.preset == "cpu" else [])]
    out += [f"run.seed={seed}", f"task.seed={seed}", *ALGORITHMS[alg]]
    if args.model:
        out.append(f"model.path={args.model}")
    if args.steps:
        out.append(f"run.steps={args.steps}")
    return out + list(args.overrides)


def run_state(run_dir: Path, steps: int) -> str:
    """``done``, ``resume`` (a checkpoint to continue from) or ``new``."""
    metrics = run_dir / "metrics.jsonl"
    if (run_dir / "final_model" / "config.json").is_file() and metrics.is_file():
        logged = [r["step"] for r in read_metrics(metrics) if r.get("kind") == "train"]
        if logged and (not steps or max(logged) >= steps):
            return "done"
    if (run_dir / "checkpoints" / "latest").is_file():
        return "resume"
    return "new"


class LoadSampler:
    """Samples the 1-minute load average every ``every_s`` seconds while a run goes."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(args: argparse.Namespace, alg: str, seed: int, ledger: dict[str, Any]) -> None:
    """Run (or resume) one (algorithm, seed) and record its wall time and load."""
    name = f"{alg}-s{seed}"
    run_dir = Path(args.out) / name
    state = run_state(run_dir, args.steps)
    if state == "done":
        print(f"[compare] {name}: finished earlier, skipped", flush=True)
        return
    if state == "resume":
        cmd = ["--resume", str(run_dir), *([f"run.steps={args.steps}"] if args.steps else [])]
    else:
        if run_dir.exists():  # started but no checkpoint yet: nothing worth keeping
            shutil.rmtree(run_dir)
        cmd = [*trainer_args(args, alg, seed), f"run.out_dir={args.out}", f"run.name={name}"]
    full = [sys.executable, "-m", "trainer.run", *cmd]
    print(f"[compare] {name}: {state}: {' '.join(full)}", flush=True)
    if args.dry_run:
        return
    start = time.perf_counter()
    with LoadSampler() as load, open(Path(args.out) / f"{name}.log", "a") as log:
        rc = subprocess.call(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    entry = ledger.setdefault(name, {"wall_s": 0.0, "load": []})
    entry["wall_s"] += seconds
    entry["load"] += load.samples
    save_ledger(args.out, ledger)
    if rc != 0:
        raise SystemExit(f"[compare] {name} failed (exit {rc}); see {Path(args.out) / name}.log")
    print(f"[compare] {name}: done in {seconds / 60:.1f} min", flush=True)


def load_ledger(out: str) -> dict[str, Any]:
    path = Path(out) / "ledger.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_ledger(out: str, ledger: dict[str, Any]) -> None:
    path = Path(out) / "ledger.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------- the report


def series(records: list[dict[str, Any]], kind: str, key: str) -> dict[int, float]:
    """step -> value of ``key`` in the records of ``kind`` (the last record of a step wins)."""
    out = {}
    for r in records:
        if r.get("kind") == kind and isinstance(r.get(key), (int, float)):
            out[int(r["step"])] = float(r[key])
    return out


def load_runs(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Per algorithm, its finished runs' records (metrics, rollouts, name, seed), and the
    planned runs not finished yet (left out: a half-done run would cut every curve short)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    pending = []
    for alg, seed in planned_runs(args):
        run_dir = Path(args.out) / f"{alg}-s{seed}"
        if run_state(run_dir, args.steps) != "done":
            pending.append(run_dir.name)
            continue
        rollouts_path = run_dir / "rollouts.jsonl"
        rollouts = read_metrics(rollouts_path) if rollouts_path.is_file() else []
        runs.setdefault(alg, []).append({
            "name": run_dir.name, "seed": seed, "metrics": read_metrics(run_dir / "metrics.jsonl"),
            "rollouts": {int(r["step"]): r["groups"] for r in rollouts},
            "machine": run_machine(run_dir),
        })  # fmt: skip
    return runs, pending


def run_machine(run_dir: Path) -> str:
    """The hardware a run trained on (``"CPU AVX512, native bf16"``), from the precision
    line ``trainer.run`` writes at the top of its ``config.yaml`` and prints into the
    run's log, on the machine that ran it: a report drawn elsewhere still says where each
    run came from. ``"?"`` when neither names it (older runs resumed with explicit dtypes)."""
    texts = []
    config = run_dir / "config.yaml"
    if config.is_file():
        texts.append(config.read_text().split("\n", 1)[0])
    log = run_dir.with_name(run_dir.name + ".log")
    if log.is_file():
        texts += [line for line in log.read_text().splitlines() if "[fipo] precision:" in line]
    for text in texts:
        if found := re.search(r"CPU capability (\S+) (with|without|has no) native bf16", text):
            return f"CPU {found[1]}, native bf16 {'yes' if found[2] == 'with' else 'no'}"
        if found := re.search(r"GPU (.+?) (supports|lacks|with|without)", text):
            return f"GPU {found[1]}"
    return "?"


def machines_line(runs: dict[str, list[dict[str, Any]]]) -> str:
    """``Runs made on: <cpu> (n runs); ...`` over every finished run."""
    from collections import Counter

    count = Counter(r["machine"] for rs in runs.values() for r in rs)
    return "Runs made on: " + "; ".join(
        f"{m if m != '?' else 'machine not recorded'} ({n} run{'s' if n > 1 else ''})"
        for m, n in count.most_common()
    )


def spread(runs: list[dict[str, Any]], kind: str, key: str):
    """Steps present in every run, and the mean, min and max across runs at each."""
    import numpy as np

    per_run = [series(r["metrics"], kind, key) for r in runs]
    per_run = [s for s in per_run if s]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(s) for s in per_run)))
    if not steps:
        return None
    values = np.array([[s[t] for t in steps] for s in per_run])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    plt = _pyplot()

    cols = 3
    rows = -(-len(CURVES) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, (kind, key, title) in zip(axes.flat, CURVES, strict=False):
        for alg, alg_runs in runs.items():
            got = spread(alg_runs, kind, key)
            if got is None:
                continue
            steps, mean, lo, hi = got
            colour = COLOURS.get(alg)
            ax.plot(steps, mean, color=colour, marker="o", ms=3,
                    label=f"{alg} (n={len(alg_runs)})")  # fmt: skip
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.18, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(CURVES) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("mean over seeds, shaded: min-max across seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lengths(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """The whole response-length distribution per step: p10-p90 band, p50 line."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False,
                             sharey=True)  # fmt: skip
    for ax, (alg, alg_runs) in zip(axes.flat, runs.items(), strict=True):
        got = [spread(alg_runs, "train", f"rollout/response_len_p{q}") for q in (10, 50, 90)]
        if any(g is None for g in got):
            continue
        (steps, p10, _, _), (_, p50, _, _), (_, p90, _, _) = got  # type: ignore[misc]
        colour = COLOURS.get(alg)
        ax.fill_between(steps, p10, p90, color=colour, alpha=0.25, label="p10-p90")
        ax.plot(steps, p50, color=colour, label="p50")
        ax.set_title(f"{alg}: response length (tokens)", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("per-step percentiles, averaged over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def phases(steps: list[int]) -> dict[str, list[int]]:
    """The first, middle and last third of the logged training steps."""
    n = len(steps)
    cut = [0, n // 3, 2 * n // 3, n]
    return {name: steps[cut[i] : cut[i + 1]] for i, name in enumerate(("early", "middle", "late"))}


def length_accuracy(alg_runs: list[dict[str, Any]], edges: list[int]):
    """Per phase, accuracy of the sampled responses in each length bin, and the mean
    within-group length gap (correct minus wrong) over groups with both."""
    import numpy as np

    out = {}
    steps = sorted(set.intersection(*(set(r["rollouts"]) for r in alg_runs))) if alg_runs else []
    for phase, chosen in phases(steps).items():
        lengths, correct, gaps = [], [], []
        for run in alg_runs:
            for step in chosen:
                for g in run["rollouts"][step]:
                    lengths += g["lengths"]
                    correct += g["correct"]
                    ok = np.array(g["correct"], bool)
                    if ok.any() and (~ok).any():
                        ln = np.array(g["lengths"], float)
                        gaps.append(ln[ok].mean() - ln[~ok].mean())
        lengths_a, correct_a = np.array(lengths), np.array(correct, float)
        bins = np.digitize(lengths_a, edges[1:-1])
        acc = [float(correct_a[bins == b].mean()) if (bins == b).any() else float("nan")
               for b in range(len(edges) - 1)]  # fmt: skip
        counts = [int((bins == b).sum()) for b in range(len(edges) - 1)]
        out[phase] = {"acc": acc, "counts": counts, "gap": float(np.mean(gaps)) if gaps else None,
                      "groups": len(gaps)}  # fmt: skip
    return out


def plot_length_accuracy(runs, edges: list[int], path: Path) -> dict[str, Any]:
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False,
                             sharey=True)  # fmt: skip
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    stats = {}
    for ax, (alg, alg_runs) in zip(axes.flat, runs.items(), strict=True):
        stats[alg] = length_accuracy(alg_runs, edges)
        for phase, style in zip(("early", "late"), ("--", "-"), strict=True):
            ax.plot(centres, stats[alg][phase]["acc"], style, marker="o", ms=3,
                    color=COLOURS.get(alg), label=phase)  # fmt: skip
        ax.set_title(f"{alg}: accuracy by response length", fontsize=10)
        ax.set_xlabel("response length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes.flat[0].set_ylabel("share correct (sampled)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return stats


def summary_rows(runs: dict[str, list[dict[str, Any]]], ledger: dict[str, Any]) -> list[str]:
    import numpy as np

    def pm(values: list[float], fmt: str = ".3f") -> str:
        if not values:
            return "n/a"
        return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"

    rows = ["| algorithm | runs (seeds) | held-out acc, step 0 | final | best | response length "
            "at the end: mean / p90 | train acc, last 4 steps | wall time per run |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for alg, alg_runs in runs.items():
        evals = [series(r["metrics"], "eval", "eval/accuracy") for r in alg_runs]
        evals = [e for e in evals if e]
        start = [e[min(e)] for e in evals]
        final = [e[max(e)] for e in evals]
        best = [max(e.values()) for e in evals]
        lens, p90, acc4 = [], [], []
        for r in alg_runs:
            mean = series(r["metrics"], "train", "rollout/response_len_mean")
            high = series(r["metrics"], "train", "rollout/response_len_p90")
            acc = series(r["metrics"], "train", "reward/accuracy")
            if mean:
                last = sorted(mean)[-2:]  # the last two steps, less noisy than one
                lens.append(float(np.mean([mean[s] for s in last])))
                p90.append(float(np.mean([high[s] for s in last])))
            if acc:
                acc4.append(float(np.mean([acc[s] for s in sorted(acc)[-4:]])))
        walls = [ledger.get(r["name"], {}).get("wall_s", 0.0) / 60 for r in alg_runs]
        seeds = ",".join(str(r["seed"]) for r in alg_runs)
        rows.append(
            f"| {alg} | {len(alg_runs)} ({seeds}) | {pm(start)} | {pm(final)} | {pm(best)} "
            f"| {pm(lens, '.0f')} / {pm(p90, '.0f')} | {pm(acc4)} | {pm(walls, '.1f')} min |"
        )
    return rows


def sample_lines(runs: dict[str, list[dict[str, Any]]], chars: int = 500) -> list[str]:
    """One sampled response per phase per algorithm (its first seed), quoted."""
    out = []
    for alg, alg_runs in runs.items():
        run = alg_runs[0]
        steps = sorted(run["rollouts"])
        for phase, chosen in phases(steps).items():
            if not chosen:
                continue
            step = chosen[len(chosen) // 2]
            group = run["rollouts"][step][0]
            text = re.sub(r"<\|[a-z_]+\|>", "", group["sample"]).strip().replace("\n", " ⏎ ")
            text = text if len(text) <= chars else text[:chars] + " …"
            verdict = "correct" if group["correct"][0] else "wrong"
            out.append(f"- **{alg}** (seed {run['seed']}), {phase}, step {step}: "
                       f"`{group['problem']}` (gold {group['answer']}; {verdict}, "
                       f"{group['lengths'][0]} tokens): {text}")  # fmt: skip
    return out


def report(args: argparse.Namespace) -> Path:
    """Draw the figures and write ``report.md`` (and the table into ``docs/fipo.md``)."""
    runs, pending = load_runs(args)
    if not runs:
        raise SystemExit(f"[compare] no finished runs under {args.out}")
    ledger = load_ledger(args.out)
    fig_dir = Path(args.docs) / "figures" if args.docs else Path(args.out)
    fig_dir.mkdir(parents=True, exist_ok=True)
    curves, lengths, by_len = (
        fig_dir / f"compare_{n}.png" for n in ("curves", "lengths", "acc_vs_length")
    )
    plot_curves(runs, curves)
    plot_lengths(runs, lengths)
    budget = max((int(r.get("rollout/response_len_max", 0)) for rs in runs.values()
                  for run in rs for r in run["metrics"] if r.get("kind") == "train"), default=256)  # fmt: skip
    edges = [int(budget * i / 8) for i in range(9)]
    edges[-1] += 1
    stats = plot_length_accuracy(runs, edges, by_len)
    loads = [x for v in ledger.values() for x in v.get("load", [])]
    lines = [
        "<!-- compare:begin (written by benchmarks/compare_algorithms.py; edit the prose "
        "outside these markers) -->",
        f"Command: `python benchmarks/compare_algorithms.py {' '.join(sys.argv[1:])}`".rstrip(),
        machines_line(runs) + f". Report drawn on this {describe_machine()}; 1-minute "
        "load while the runs ran: "
        + (
            f"median {sorted(loads)[len(loads) // 2]:.1f}, max {max(loads):.1f}" if loads else "n/a"
        ),
        "",
        *summary_rows(runs, ledger),
        "",
        *(
            [f"Not finished yet (rerun the command to finish them): {', '.join(pending)}.", ""]
            if pending
            else []
        ),
        "Within-group length gap (mean length of correct minus wrong responses, over groups "
        "with both) and accuracy of the longest vs shortest quarter of the budget, early -> "
        "late third of training:",
        "",
    ]
    for alg, s in stats.items():
        gap = " -> ".join(
            "n/a" if s[p]["gap"] is None else f"{s[p]['gap']:+.1f}" for p in ("early", "late")
        )
        lines.append(f"- {alg}: gap {gap} tokens; " + ", ".join(
            f"{p}: short {_acc(s[p], slice(0, 2))} / long {_acc(s[p], slice(6, 8))}" for p in ("early", "late")))  # fmt: skip
    rel = (lambda p: p.relative_to(Path(args.docs)).as_posix()) if args.docs else (lambda p: p.name)
    lines += ["", f"![curves]({rel(curves)})", "", f"![lengths]({rel(lengths)})", "",
              f"![accuracy vs length]({rel(by_len)})", "", "<details><summary>Sampled responses "
              "(first seed, one per phase)</summary>", "", *sample_lines(runs), "", "</details>",
              "<!-- compare:end -->"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = Path(args.out) / "report.md"
    out.write_text(text)
    if args.docs:
        _splice(Path(args.docs) / "fipo.md", text)
    print(text)
    return out


def _acc(phase: dict[str, Any], bins: slice) -> str:
    counts, acc = phase["counts"][bins], phase["acc"][bins]
    n = sum(counts)
    if not n:
        return "n/a"
    return f"{sum(a * c for a, c in zip(acc, counts, strict=True) if c) / n:.2f} (n={n})"


def _splice(path: Path, block: str) -> None:
    """Replace the compare block of ``path`` (between its markers), or append it."""
    text = path.read_text() if path.is_file() else ""
    begin, end = text.find("<!-- compare:begin"), text.find("<!-- compare:end -->")
    if begin >= 0 and end > begin:
        text = text[:begin] + block + text[end + len("<!-- compare:end -->\n") :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"[compare] {describe_machine()}", flush=True)
    if not args.report_only:
        ledger = load_ledger(args.out)
        plan = planned_runs(args)
        for i, (alg, seed) in enumerate(plan, 1):
            print(f"[compare] run {i}/{len(plan)}", flush=True)
            run_one(args, alg, seed, ledger)
    if not args.dry_run:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
