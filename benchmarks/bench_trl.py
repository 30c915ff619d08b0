"""Seconds per training step: TRL's ``GRPOTrainer`` vs our ``python -m trainer.run``.

Both train SmolLM2-135M-Instruct (our converted folder, ``fipo_env.models``) on one-digit
additions (our task ``arithmetic:0``, train split, the same prompt text), 8 prompts x 8
samples, at most 96 new tokens, lr 1e-5 (constant), rewarded by the same math-verify
verifier behind one reward server that this script starts. They run one after the
other on this machine, and the script prints a table of seconds per step (median of the
steps after the first) and training accuracy per step for both, and the ratio ours/TRL.

TRL is not a dependency of this project: it runs in a throwaway virtualenv, driven by a
small runner file this script writes next to its results. Create the venv once with::

    python benchmarks/bench_trl.py --setup-trl-venv           # /tmp/trl-venv, pinned

then measure (ours runs in this interpreter's environment, TRL in ``--trl-python``)::

    python benchmarks/bench_trl.py                             # 3 steps each, full size
    python benchmarks/bench_trl.py --steps 1 --prompts 2 --group-size 2 --max-tokens 16

What each side runs (their defaults, except where the shared settings say otherwise):

- TRL 1.16 ``GRPOTrainer``: HF ``generate`` (no vLLM), ``num_generations=G``,
  ``per_device_train_batch_size=G`` x ``gradient_accumulation_steps=prompts`` (one
  optimiser step per batch of prompts x G completions), TRL's own defaults otherwise
  (bf16 autocast, gradient checkpointing, loss ``dapo``, beta 0), constant lr. It runs
  once per ``--trl-threads`` entry (default: 1 thread, then torch's default of all
  cores: on a loaded 2-core machine OpenMP's spinning threads can make two threads
  several times slower than one), and the ratio is taken against the fastest. Reward: ``server.trl_reward.make_trl_reward_func`` over a
  ``RewardClient`` to the reward server (binary 0/1, so its mean reward is accuracy).
- Ours: ``python -m trainer.run`` with its defaults (FIPO, vLLM rollout worker one policy
  version ahead, 4 optimiser steps per batch, bf16 autocast, shared-prompt packing, one
  learner thread while the worker generates and all cores while it waits) plus the
  shared settings, dynamic sampling off (exactly prompts x G samples per step, as TRL),
  no warm-up, no eval, the same reward server.

The script also draws ``trl_vs_ours.png`` (accuracy and seconds per step) in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: make the project's packages importable

TRL_VENV = Path("/tmp/trl-venv")
# TRL 1.16 is the version of the reference figure in PLATFORM.md and works with
# transformers 5.19; the rest is pinned to what the project's venv holds so both sides
# run the same torch / tokenizer / protobuf code.
TRL_REQUIREMENTS = (
    "torch==2.13.0",
    "trl==1.16.0",
    "transformers==5.19.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface_hub==2.4.0",
    "numpy==2.3.5",
    "grpcio==1.85.1",
    "grpcio-health-checking==1.85.1",
    "protobuf==7.36.2",
)


@dataclass(frozen=True)
class BenchSettings:
    """The settings both trainers share.

    Attributes:
        task: ``fipo_env`` task spec; problems come from its train split.
        steps: Training steps (rollout batches) per trainer.
        prompts: Prompts per step.
        group_size: Samples per prompt (G).
        max_tokens: Most new tokens per sample.
        lr: Constant learning rate (no warm-up, no decay).
        seed: Seed of the problem draws and of both trainers.
    """

    task: str = "arithmetic:0"
    steps: int = 3
    prompts: int = 8
    group_size: int = 8
    max_tokens: int = 96
    lr: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "prompts", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.group_size < 2:
            raise ValueError(
                f"--group-size must be >= 2 (GRPO needs two samples), got {self.group_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


# --------------------------------------------------------------------------------------
# The TRL side: a runner file executed by the TRL venv's python
# --------------------------------------------------------------------------------------

# Written to the results folder and run as `<trl-python> trl_runner.py spec.json`. It
# imports the project only for the reward function and client (grpc + protobuf are in the
# TRL venv), never for training. It appends one JSON line per event to spec["out"], so a
# run that is stopped early still leaves its finished steps.
TRL_RUNNER = r'''
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
spec = json.load(open(sys.argv[1]))
sys.path.insert(0, spec["project_root"])
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
import trl
from trl import GRPOConfig, GRPOTrainer
from server.client import RewardClient
from server.trl_reward import make_trl_reward_func

out = open(spec["out"], "a", buffering=1)
def emit(**row):
    out.write(json.dumps(row) + "\n")

if spec["threads"]:
    torch.set_num_threads(spec["threads"])
tok = AutoTokenizer.from_pretrained(spec["model_dir"])
rows = [json.loads(line) for line in open(spec["dataset"])]
# Same prompt tokens as our env: the rendered text must tokenise to our prompt ids.
for r in rows[:8]:
    ids = tok(r["prompt"], add_special_tokens=True)["input_ids"]
    if ids != r["prompt_ids"]:
        raise SystemExit(f"TRL would tokenise the prompt differently: {ids} vs {r['prompt_ids']}")
data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
client = RewardClient(spec["reward_address"])
reward = make_trl_reward_func(client, gold_column="answer")

class StepClock(TrainerCallback):
    """Wall time between optimiser steps (generation + reward + update) and TRL's logs."""
    def on_train_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        emit(kind="step", step=state.global_step, seconds=now - self.t)
        self.t = now
    def on_log(self, args, state, control, logs=None, **kw):
        emit(kind="log", step=state.global_step, logs=logs or {})

G, P = spec["group_size"], spec["prompts"]
cfg = GRPOConfig(
    output_dir=spec["work_dir"], use_cpu=True, report_to="none", save_strategy="no",
    logging_steps=1, max_steps=spec["steps"], seed=spec["seed"],
    learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
    num_generations=G, per_device_train_batch_size=G, gradient_accumulation_steps=P,
    max_completion_length=spec["max_tokens"], temperature=1.0, use_vllm=False,
    dataloader_pin_memory=False,
)
t0 = time.perf_counter()
trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[reward], args=cfg,
                      train_dataset=data, processing_class=tok)
emit(kind="setup", seconds=time.perf_counter() - t0, trl=trl.__version__,
     torch=torch.__version__, threads=torch.get_num_threads(),
     bf16=bool(cfg.bf16), gradient_checkpointing=bool(cfg.gradient_checkpointing),
     loss_type=cfg.loss_type, generation_batch_size=cfg.generation_batch_size)
trainer.add_callback(StepClock())
trainer.train()
client.close()
emit(kind="done")
'''


def build_dataset(s: BenchSettings, model_dir: Path, path: Path) -> None:
    """Write the TRL dataset: our prompts (rendered as our env renders them) and golds.

    Problems are drawn from the task's train split with the env's prompt template, so TRL
    sees exactly the prompt text our rollout worker feeds the model.
    """
    from fipo_env.config import EnvConfig
    from fipo_env.envs.common import render_prompt
    from fipo_env.models import load_tokenizer
    from fipo_env.tasks import make_task, sample_problems

    tok = load_tokenizer(model_dir)
    task = make_task(s.task, split="train")  # the split our rollout worker draws from
    # TRL shuffles and may draw a few extra prompts; twice the need is plenty.
    problems = sample_problems(task, 2 * s.steps * s.prompts, s.seed, distinct=False)
    env_cfg = EnvConfig()
    with open(path, "w") as f:
        for p in problems:
            ids = render_prompt(tok, env_cfg, p.question)
            text = tok.decode(ids)
            row = {"prompt": text, "prompt_ids": ids, "answer": list(p.golds)}
            f.write(json.dumps(row) + "\n")


def _run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict[str, str]) -> int:
    """Run ``cmd`` with output to ``log_path``; on timeout SIGTERM (then SIGKILL) it.

    Returns:
        The exit code, or -1 when it was stopped for running past ``timeout_s``.
    """
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # our trainer checkpoints and stops its workers on SIGTERM
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            return -1
        finally:
            if proc.poll() is None:  # e.g. Ctrl-C of this script: stop it cleanly first
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def run_trl(s: BenchSettings, args: argparse.Namespace, model_dir: Path, address: str,
            out: Path, threads: int) -> dict[str, Any]:  # fmt: skip
    """Train with TRL in its venv (``threads`` torch threads, 0 = default); return
    per-step seconds and accuracy."""
    runner = out / "trl_runner.py"
    runner.write_text(TRL_RUNNER)
    dataset = out / "trl_dataset.jsonl"
    build_dataset(s, model_dir, dataset)
    tag = f"trl_t{threads}"
    events = out / f"{tag}_events.jsonl"
    events.unlink(missing_ok=True)
    spec = {
        **asdict(s),
        "project_root": str(ROOT),
        "model_dir": str(model_dir),
        "dataset": str(dataset),
        "reward_address": address,
        "out": str(events),
        "work_dir": str(out / f"{tag}_work"),
        "threads": threads,
    }
    (out / f"{tag}_spec.json").write_text(json.dumps(spec, indent=1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    rc = _run_logged([args.trl_python, str(runner), str(out / f"{tag}_spec.json")],
                     out / f"{tag}.log", args.timeout_s, env)  # fmt: skip
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
    setup = next((r for r in rows if r["kind"] == "setup"), {})
    step_s = {r["step"]: r["seconds"] for r in rows if r["kind"] == "step"}
    logs = {r["step"]: r["logs"] for r in rows if r["kind"] == "log" and "reward" in r["logs"]}
    steps = sorted(step_s)
    return {
        "rc": rc,
        "wall_s": wall,
        "step_s": [step_s[k] for k in steps],
        "accuracy": [logs.get(k, {}).get("reward", float("nan")) for k in steps],
        "response_len": [
            logs.get(k, {}).get("completions/mean_length", float("nan")) for k in steps
        ],  # fmt: skip
        "info": {k: v for k, v in setup.items() if k != "kind"},
        "log": str(out / f"{tag}.log"),
    }


def run_ours(s: BenchSettings, args: argparse.Namespace, address: str, out: Path) -> dict[str, Any]:
    """Train with ``python -m trainer.run``; return per-step seconds and accuracy."""
    name = "ours"
    overrides = [
        f"task.spec={s.task}", f"task.seed={s.seed}", f"run.seed={s.seed}",
        f"run.steps={s.steps}", f"rollout.prompts_per_step={s.prompts}",
        f"rollout.group_size={s.group_size}", f"rollout.max_response_tokens={s.max_tokens}",
        f"optim.lr={s.lr}", "optim.warmup_steps=0", "rollout.dynamic_sampling=false",
        f"rollout.reward_address={address}",
        "eval.num_problems=0", "eval.at_start=false", "eval.every=0",
        "run.checkpoint_every=0", "run.progress=false",
        f"run.out_dir={out}", f"run.name={name}",
        *args.ours_override,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    rc = _run_logged([sys.executable, "-m", "trainer.run", *overrides], out / "ours.log",
                     args.timeout_s, env)  # fmt: skip
    wall = time.perf_counter() - t0
    metrics = out / name / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    train = [r for r in rows if r.get("kind") == "train"]
    return {
        "rc": rc,
        "wall_s": wall,
        "step_s": [r["perf/step_s"] for r in train],
        "accuracy": [r["reward/accuracy"] for r in train],
        "response_len": [r["rollout/response_len_mean"] for r in train],
        "info": {
            "gen_s": [round(r["rollout/gen_s"], 1) for r in train],
            "learner_s": [round(r["perf/learner_s"], 1) for r in train],
            "wait_s": [round(r["perf/wait_s"], 1) for r in train],
            "staleness": [r["rollout/staleness_mean"] for r in train],
        },
        "log": str(out / "ours.log"),
    }


def typical_step(step_s: list[float]) -> float:
    """Median seconds per step after the first (warm-up); the first alone if that is all."""
    timed = step_s[1:] or step_s
    return statistics.median(timed) if timed else float("nan")


def setup_trl_venv(python: str) -> None:
    """Create the throwaway TRL venv (no system site-packages) with pinned packages."""
    venv = Path(python).parents[1]
    if not Path(python).exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", *TRL_REQUIREMENTS], check=True)


def check_trl_python(python: str) -> str:
    """The TRL version in ``python``'s environment; a clear error when it is not usable."""
    if not Path(python).exists():
        raise SystemExit(
            f"bench_trl: no TRL interpreter at {python}; create it with "
            f"`python {Path(__file__).relative_to(ROOT)} --setup-trl-venv` or pass --trl-python"
        )
    probe = subprocess.run([python, "-c", "import trl, transformers; print(trl.__version__)"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if probe.returncode != 0:
        raise SystemExit(f"bench_trl: {python} cannot import trl:\n{probe.stderr[-1500:]}")
    return probe.stdout.strip().splitlines()[-1]


def print_report(
    s: BenchSettings, results: dict[str, dict[str, Any]], load: dict[str, Any]
) -> None:
    """The side-by-side table, the per-step curves and the ratio."""
    print(f"\nsettings: {s.task} train split, {s.prompts} prompts x {s.group_size} samples, "
          f"<= {s.max_tokens} new tokens, lr {s.lr:g}, {s.steps} steps each")  # fmt: skip
    print(f"load average (1 min) before / between / after: "
          f"{load['before']:.1f} / {load.get('between', float('nan')):.1f} / "
          f"{load.get('after', float('nan')):.1f}")  # fmt: skip
    print(f"\n{'trainer':<12}{'s/step':>9}{'first s':>9}{'steps':>7}{'wall s':>9}{'rc':>5}"
          "  training accuracy per step")  # fmt: skip
    for side, r in results.items():
        first = r["step_s"][0] if r["step_s"] else float("nan")
        curve = " ".join(f"{a:.3f}" for a in r["accuracy"])
        print(f"{side:<12}{typical_step(r['step_s']):>9.1f}{first:>9.1f}{len(r['step_s']):>7}"
              f"{r['wall_s']:>9.0f}{r['rc']:>5}  {curve}")  # fmt: skip
    for side, r in results.items():
        print(f"\n{side}: step seconds {[round(x, 1) for x in r['step_s']]}, mean response "
              f"length {[round(x, 1) for x in r['response_len']]}, {r['info']}, log {r['log']}")  # fmt: skip
    trl_runs = {k: v for k, v in results.items() if k.startswith("trl") and v["step_s"]}
    if trl_runs and results.get("ours", {}).get("step_s"):
        best = min(trl_runs, key=lambda k: typical_step(trl_runs[k]["step_s"]))
        trl, ours = typical_step(trl_runs[best]["step_s"]), typical_step(results["ours"]["step_s"])
        ratio = ours / trl
        verdict = "met" if ratio <= 1 / 3 else "NOT met"
        print(f"\nours / TRL seconds per step: {ratio:.3f} against the fastest TRL run ({best}); "
              f"target <= 0.333: {verdict}; TRL {trl / ours:.1f}x slower")  # fmt: skip
        if len(trl_runs[best]["step_s"]) < 2 or len(results["ours"]["step_s"]) < 2:
            print("note: fewer than 2 steps on a side; its first (warm-up) step was used")


def plot_results(s: BenchSettings, results: dict[str, dict[str, Any]], path: Path) -> None:
    """Two panels, per step and per trainer: training accuracy, and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, sec) = plt.subplots(1, 2, figsize=(10, 3.6))
    for side, r in results.items():
        steps = range(1, len(r["step_s"]) + 1)
        label = f"{side} ({typical_step(r['step_s']):.0f} s/step)"
        acc.plot(steps, r["accuracy"][: len(r["step_s"])], marker="o", label=label)
        sec.plot(steps, r["step_s"], marker="o", label=side)
    acc.set(xlabel="training step", ylabel="training accuracy (batch)",
            title=f"{s.prompts} prompts x {s.group_size} samples, {s.task}")  # fmt: skip
    sec.set(xlabel="training step", ylabel="seconds", title="wall time per step", ylim=(0, None))
    for ax in (acc, sec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from trainer.precision import describe_machine

    print(describe_machine(), flush=True)  # figures depend on it (bf16 is native only on some CPUs)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = BenchSettings()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--prompts", type=int, default=d.prompts)
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--task", default=d.task)
    p.add_argument("--trl-python", default=str(TRL_VENV / "bin" / "python"),
                   help="python of the throwaway venv holding TRL (default %(default)s)")  # fmt: skip
    p.add_argument("--setup-trl-venv", action="store_true",
                   help="create --trl-python's venv with pinned TRL and exit")  # fmt: skip
    p.add_argument("--trl-threads", default="1,0",
                   help="comma-separated torch thread counts, one TRL run each (0: torch's "
                   "default, all cores); the ratio uses the fastest (default %(default)s)")  # fmt: skip
    p.add_argument("--only", choices=("trl", "ours"), default="", help="run one side only")
    p.add_argument("--order", choices=("ours-first", "trl-first"), default="ours-first")
    p.add_argument("--timeout-s", type=float, default=3600.0,
                   help="per side; a side past it is stopped and its finished steps reported")  # fmt: skip
    p.add_argument("--out-dir", default="",
                   help="results folder (default /tmp/bench-trl-<time>; kept for the logs)")  # fmt: skip
    p.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `python -m trainer.run` override (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    if args.setup_trl_venv:
        setup_trl_venv(args.trl_python)
        print(f"TRL venv ready: {args.trl_python} (trl {check_trl_python(args.trl_python)})")
        return 0
    try:
        s = BenchSettings(args.task, args.steps, args.prompts, args.group_size, args.max_tokens,
                          args.lr, args.seed)  # fmt: skip
    except ValueError as exc:
        p.error(str(exc))
    try:
        trl_threads = [int(x) for x in args.trl_threads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--trl-threads must be comma-separated integers, got {args.trl_threads!r}")
    if not trl_threads or min(trl_threads) < 0:
        p.error(f"--trl-threads needs integers >= 0, got {args.trl_threads!r}")
    trl_sides = [f"trl/{n}thr" if n else "trl/default" for n in trl_threads]
    sides = ["ours", *trl_sides] if args.order == "ours-first" else [*trl_sides, "ours"]
    if args.only:
        sides = trl_sides if args.only == "trl" else ["ours"]
    if args.only != "ours":
        print(f"TRL {check_trl_python(args.trl_python)} from {args.trl_python}", flush=True)

    from fipo_env.models import default_model_dir, offline_hub

    offline_hub()
    from server.launch import start_reward_server, stop_process, wait_reward_server

    model_dir = default_model_dir()
    out = Path(args.out_dir or f"/tmp/bench-trl-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    load = {"before": os.getloadavg()[0]}
    results: dict[str, dict[str, Any]] = {}
    server, address = start_reward_server(1, out / "reward_server.log")
    try:
        wait_reward_server(address)
        print(f"reward server {address}; results and logs in {out}", flush=True)
        for i, side in enumerate(sides):
            if i:
                load["between"] = os.getloadavg()[0]
            print(f"[{time.strftime('%H:%M:%S')}] training with {side} ...", flush=True)
            if side.startswith("trl"):
                threads = trl_threads[trl_sides.index(side)]
                results[side] = run_trl(s, args, model_dir, address, out, threads)
            else:
                results[side] = run_ours(s, args, address, out)
            r = results[side]
            print(f"[{time.strftime('%H:%M:%S')}] {side}: exit {r['rc']}, "
                  f"{len(r['step_s'])} steps, step s {[round(x, 1) for x in r['step_s']]}", flush=True)  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            stop_process(server)
    load["after"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps({"settings": asdict(s), "load": load,
                                                  "results": results}, indent=1))  # fmt: skip
    print_report(s, results, load)
    if any(r["step_s"] for r in results.values()):
        plot_results(s, results, out / "trl_vs_ours.png")
        print(f"plot: {out / 'trl_vs_ours.png'}")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
