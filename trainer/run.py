"""``python -m trainer.run`` / ``fipo-train``: decoupled FIPO training, end to end.

With no arguments it trains the embedded default (SmolLM2-135M-Instruct on the built-in
arithmetic problems) on this machine's CPU; ``--help`` lists the options.

How this departs from a textbook GRPO loop:

- The rollout side is a separate process (vLLM, or HF ``generate`` where vLLM is absent)
  that runs up to ``rollout.max_staleness`` policy versions ahead through a bounded queue;
  every group records the version that generated it. ``max_staleness=0`` is synchronous.
- Rewards come from the gRPC reward server (started here as a subprocess unless
  ``rollout.reward_address`` names a running one), via the token-level env.
- Where the processes run is the placement's business (``trainer.placement``): this
  machine by default, or Ray actors on a cluster (``cluster.address``, ``trainer.cluster``:
  N rollout workers, M reward replicas, K learner ranks). The loop below is the same.
- Each rollout batch gets ``optim.mini_batches`` optimiser steps, with ``old_logp``
  recomputed by the learner first, so Future-KL (FIPO) acts from the second step on.
- Optional truncated importance sampling corrects for the engine's (stale) policy.

Per step: rollout -> reward (both in the worker) -> advantage -> loss + optimiser steps ->
publish weights -> log. Everything a run produces goes to its run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fipo_env.models import offline_hub
from server.launch import RewardServerError, wait_reward_server
from trainer.config import (
    USAGE,
    ConfigError,
    TrainConfig,
    help_text,
    parse_args,
    parse_cpus,
    save_yaml,
)

if TYPE_CHECKING:
    from types import FrameType

    from trainer.types import RolloutBatch

offline_hub()  # never reach for a model hub
# vLLM's per-weight load warnings and INFO lines would bury the progress bar.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
# transformers' per-load progress bars and advisory warnings are not the user's to act on.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# --------------------------------------------------------------------------------------
# Setup helpers (small, each with one job)
# --------------------------------------------------------------------------------------


class _Stopper:
    """Turns SIGTERM / Ctrl-C into a clean stop.

    The signal raises ``KeyboardInterrupt`` at once only while the loop waits (for a batch,
    for eval); during an update it just sets ``requested`` and the loop stops after the
    step, so a checkpoint never holds a half-applied update.
    """

    def __init__(self) -> None:
        self.requested: str = ""
        self.forced = False  # a second signal: stop now, without a final checkpoint
        self._waiting = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and not self._waiting:
            self.forced = True  # asked twice during an update: abort it
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._waiting:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.requested:
            raise KeyboardInterrupt
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


def make_run_dir(cfg: TrainConfig, resume: str) -> Path:
    """The run folder: the resumed one, or a new ``out_dir/name`` (timestamp by default)."""
    if resume:
        return Path(resume)
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.out_dir) / name
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run.name: run folder {str(run_dir)!r} already holds a run; pick another "
            "run.name or pass --resume to continue it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(cfg: TrainConfig):
    """Replace ``auto`` dtypes by this machine's choice; return ``(config, Precision)``."""
    import dataclasses

    from trainer.precision import resolve

    p = resolve(cfg.rollout.dtype, cfg.model.autocast_dtype, cfg.model.device)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, autocast_dtype=p.autocast_dtype),
        rollout=dataclasses.replace(cfg.rollout, dtype=p.engine_dtype),
    )
    return cfg, p


def batch_metrics(batch: RolloutBatch, learner_version: int) -> dict[str, float]:
    """``reward/…`` and ``rollout/…`` statistics of one rollout batch."""
    rewards = np.concatenate([g.rewards for g in batch.groups])
    correct = np.concatenate([g.correct for g in batch.groups])
    truncated = np.concatenate([g.truncated for g in batch.groups])
    lengths = np.array([len(r) for g in batch.groups for r in g.response_ids])
    stale = np.array([learner_version - g.policy_version for g in batch.groups])
    return {
        "reward/mean": float(rewards.mean()),
        "reward/accuracy": float(correct.mean()),
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        # The paper reads the whole length distribution per step, not only its mean.
        **{f"rollout/response_len_p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90)},
        "rollout/truncated_frac": float(truncated.mean()),
        "rollout/staleness_mean": float(stale.mean()),
        "rollout/staleness_max": float(stale.max()),
        "rollout/groups": float(len(batch.groups)),
        "rollout/kept_frac": len(batch.groups) / max(1, batch.num_generated_groups),
        "rollout/gen_s": float(batch.gen_seconds),
        "rollout/gen_tokens_per_s": batch.gen_tokens / max(batch.gen_seconds, 1e-9),
    }


def rollout_record(batch: RolloutBatch, decode: Callable[[Sequence[int]], str]) -> dict[str, Any]:
    """One ``rollouts.jsonl`` record: every response's length, verdict and reward, per group,
    and the text of each group's first response (what the paper reads from its runs:
    accuracy against length, the length distribution, sampled responses)."""
    return {
        "groups": [
            {
                "problem": g.problem,
                "answer": g.answer,
                "version": int(g.policy_version),
                "lengths": [len(r) for r in g.response_ids],
                "correct": [bool(c) for c in g.correct],
                "truncated": [bool(t) for t in g.truncated],
                "rewards": [round(float(r), 4) for r in g.rewards],
                "sample": decode(g.response_ids[0]) if g.response_ids else "",
            }
            for g in batch.groups
        ]
    }


def batch_advantages(
    batch: RolloutBatch, cfg: TrainConfig
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Group-normalised advantages of ``batch`` and its dynamic-sampling statistics.

    With ``rollout.dynamic_sampling`` a group that the filter (``rollout.filter_metric``)
    calls uninformative gets advantage 0: the worker only hands such groups over when a
    batch stays short after ``rollout.max_sampling_rounds`` (``rollout/short_batch``).

    Returns:
        ``(advantages, metrics)``: per group its samples' advantages (groups x [G]) and
        ``rollout/informative_groups`` / ``rollout/short_batch``.
    """
    from trainer.advantages import group_advantages
    from trainer.rollout import informative_mask

    rewards = np.stack([g.rewards for g in batch.groups])  # [groups, G]
    advantages = group_advantages(rewards, scale_by_std=cfg.algorithm.normalize_std)
    informative = informative_mask(batch.groups, cfg.rollout.filter_metric)
    if cfg.rollout.dynamic_sampling:
        advantages = np.where(informative[:, None], advantages, 0.0)
    n = int(informative.sum())
    return list(advantages), {
        "rollout/informative_groups": float(n),
        "rollout/short_batch": float(
            cfg.rollout.dynamic_sampling and n < cfg.rollout.prompts_per_step
        ),
    }


def summary_line(step: int, steps: int, m: dict[str, float]) -> str:
    """The one-line per-step summary."""
    parts = [
        f"step {step}/{steps}",
        f"reward {m['reward/mean']:+.3f}",
        f"acc {m['reward/accuracy']:.3f}",
        f"len {m['rollout/response_len_mean']:.1f}",
        f"stale {m['rollout/staleness_mean']:.1f}",
        f"loss {m.get('loss/policy', float('nan')):+.4f}",
        f"|F| {m.get('fipo/future_kl_abs_mean', 0.0):.4f}",
        f"kl {m.get('loss/approx_kl', 0.0):.2e}",
        f"gen {m['rollout/gen_s']:.1f}s wait {m['perf/wait_s']:.1f}s "
        f"learn {m['perf/learner_s']:.1f}s sync {m['perf/publish_s']:.1f}s",
    ]
    if m.get("optim/skipped_nonfinite"):
        parts.append(f"SKIPPED {int(m['optim/skipped_nonfinite'])} non-finite step(s)")
    return " | ".join(parts)


def reward_client_metrics(totals: dict[str, int], eval_verifier: object) -> dict[str, float]:
    """``reward/client_requests|retries|failovers`` so far: the rollout side's (summed
    from its batches) plus the eval env's own client; empty without a reward client."""
    stats = getattr(eval_verifier, "stats", None)
    own = vars(stats()) if callable(stats) else {}
    keys = totals.keys() | own.keys()
    return {f"reward/client_{k}": float(totals.get(k, 0) + own.get(k, 0)) for k in sorted(keys)}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: str = "") -> int:
    """Train per ``cfg`` (resuming from ``resume`` when given); returns an exit code."""
    import torch
    from tqdm import tqdm

    from fipo_env.models import load_tokenizer, resolve_model_dir
    from trainer.checkpoint import load_checkpoint, resume_hint, save_checkpoint, set_rng_state
    from trainer.eval import SourceGreedyGenerator, evaluate, held_out_problems, make_eval_env
    from trainer.learner import build_loss_config
    from trainer.learner_group import LearnerRankError
    from trainer.loggers import check_installed, make_sinks, parse_loggers
    from trainer.placement import make_placement
    from trainer.plots import MetricsLog, carried_totals, eval_missing, read_metrics, write_plots
    from trainer.rollout import rollout_worker_config

    stopper = _Stopper()
    stopper.install()
    model_dir = resolve_model_dir(cfg.model.path)  # before the run folder: none left on error
    check_installed(parse_loggers(cfg.run.loggers))  # a missing wandb/mlflow: before anything
    cfg, precision = resolve_precision(cfg)
    run_dir = make_run_dir(cfg, resume)
    save_yaml(cfg, run_dir / "config.yaml", comment=f"precision: {precision.reason}")
    learner_cpus = parse_cpus(cfg.rollout.learner_cpus)
    if learner_cpus:
        os.sched_setaffinity(0, learner_cpus)
    if cfg.model.num_threads:
        torch.set_num_threads(cfg.model.num_threads)
    elif learner_cpus:
        torch.set_num_threads(len(learner_cpus))
    seed_everything(cfg.run.seed)
    print(f"[fipo] run folder {run_dir}  model {model_dir}  algorithm {cfg.algorithm.name}",
          flush=True)  # fmt: skip
    print(f"[fipo] precision: rollout engine {cfg.rollout.dtype}, learner "
          f"{cfg.model.autocast_dtype} ({precision.reason})", flush=True)  # fmt: skip

    with contextlib.ExitStack() as stack:
        # Who starts the processes, and where: this machine, or Ray (cluster.address).
        placement = make_placement(cfg, run_dir)
        stack.callback(placement.close)
        # Reward server: an existing address, or our own (subprocess / Ray replicas).
        address = placement.reward_address()
        wait_reward_server(address, cfg.rollout.reward_connect_timeout_s)

        # Learner (one process, or K ranks) and the state to resume from.
        tokenizer = load_tokenizer(model_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        learner = placement.learner(model_dir, build_loss_config(cfg.algorithm), pad_id)
        start_step = 0
        if resume:
            state = load_checkpoint(resume)
            learner.load_state_dict(state["learner"])
            set_rng_state(state["rng"])
            start_step = int(state["step"])
            print(f"[fipo] resumed at step {start_step} (policy version {learner.version})",
                  flush=True)  # fmt: skip

        # Rollout worker(s) (engine + env + verifier in their own processes), publisher.
        worker_cfg = rollout_worker_config(
            cfg, model_dir, address, log_file=run_dir / "rollout_worker.log"
        )
        source = placement.rollout_source(
            worker_cfg, learner.version, learner.hf_state_dict() if learner.version else None
        )
        t_engine = time.perf_counter()
        with stopper.interruptible():
            source.wait_ready()
        engine_start_s = time.perf_counter() - t_engine
        if source.engine_note:
            print(f"[fipo] warning: {source.engine_note}", flush=True)
        worker_log = "rollout_worker.<i>.log" if cfg.cluster.enabled else "rollout_worker.log"
        print(f"[fipo] rollout engine {source.engine_kind} ready in {engine_start_s:.0f} s (its log: "
              f"{run_dir / worker_log})", flush=True)  # fmt: skip
        busy_threads = torch.get_num_threads()
        idle_threads = cfg.model.idle_threads or len(os.sched_getaffinity(0))
        if idle_threads != busy_threads and not cfg.cluster.enabled:  # all cores while it waits
            learner.thread_policy = lambda: busy_threads if source.worker_busy() else idle_threads

        # Held-out eval: same env, verifier and engine, greedy.
        eval_env = make_eval_env(worker_cfg, cfg.eval_max_tokens)
        stack.callback(eval_env.close)
        problems = held_out_problems(cfg.task.spec, cfg.eval.num_problems, cfg.task.eval_seed)
        generator = SourceGreedyGenerator(source, eval_env.stop_ids)
        sinks = make_sinks(parse_loggers(cfg.run.loggers), run_dir, cfg.to_dict(),
                           resume_step=start_step if resume else None)  # fmt: skip
        # What the interrupted process logged: its run totals (this process counts from 0
        # again) and whether the evaluation due at the checkpoint step was made.
        metrics_path = run_dir / "metrics.jsonl"
        before = read_metrics(metrics_path) if resume and metrics_path.is_file() else []
        carried = carried_totals(before, start_step)
        owed_eval = (
            bool(resume)
            and start_step < cfg.run.steps
            and eval_missing(before, start_step, cfg.eval.every)
        )
        log = MetricsLog(run_dir / "metrics.jsonl", sinks=sinks,
                         truncate_after_step=start_step if resume else None)  # fmt: skip
        stack.callback(log.close)
        rollouts = MetricsLog(run_dir / "rollouts.jsonl",
                              truncate_after_step=start_step if resume else None)  # fmt: skip
        stack.callback(rollouts.close)
        log.write("setup", start_step, {"perf/engine_start_s": engine_start_s,
                                        "setup/engine_vllm": float(source.engine_kind == "vllm")})  # fmt: skip

        evaluated_at: list[int] = []
        client_totals: dict[str, int] = {}  # the rollout side's reward-client counters

        def run_eval(step: int) -> dict[str, float]:
            if not problems or step in evaluated_at:
                return {}
            evaluated_at.append(step)
            with stopper.interruptible():
                metrics, samples = evaluate(generator, eval_env, problems, cfg.eval_max_tokens)
            log.write("eval", step, metrics)
            with open(run_dir / "eval_samples.jsonl", "a") as f:
                for s in samples[:20]:
                    f.write(json.dumps({"step": step, **s}) + "\n")
            tqdm.write(
                f"[eval] step {step}: accuracy {metrics['eval/accuracy']:.3f} on "
                f"{len(problems)} held-out problems, mean length "
                f"{metrics['eval/response_len_mean']:.1f} tokens ({metrics['perf/eval_s']:.0f} s)"
            )
            return metrics

        def checkpoint(step: int) -> None:
            save_checkpoint(run_dir, step, learner.state_dict(), {"policy_version": learner.version},
                            keep=cfg.run.keep_checkpoints)  # fmt: skip

        steps = cfg.run.steps
        step = start_step
        exit_code = 0
        rank_failure: LearnerRankError | None = None
        bar = tqdm(total=steps, initial=start_step, disable=not cfg.run.progress,
                   unit="step", dynamic_ncols=True, file=sys.stderr)  # fmt: skip
        stack.callback(bar.close)
        try:
            if (cfg.eval.at_start and start_step == 0) or owed_eval:
                run_eval(start_step)
            while step < steps and not stopper.requested:
                t0 = time.perf_counter()
                # 1-2. Rollout + reward: made (and scored by the env) in the worker process.
                with stopper.interruptible():
                    batch = source.next_batch(timeout_s=cfg.rollout.batch_timeout_s)
                wait_s = time.perf_counter() - t0
                metrics = batch_metrics(batch, learner.version)
                # 3. Advantage: group-normalised outcome reward; 0 for the groups dynamic
                # sampling would drop (a batch left short holds some).
                advantages, sampling = batch_advantages(batch, cfg)
                metrics.update(sampling)
                if sampling["rollout/short_batch"]:
                    tqdm.write(f"[fipo] warning: step {step + 1}: only "
                               f"{int(sampling['rollout/informative_groups'])} informative "
                               f"group(s) of {cfg.rollout.prompts_per_step} after "
                               f"{cfg.rollout.max_sampling_rounds} sampling round(s)")  # fmt: skip
                # 4-5. Loss and optimiser steps (several mini-batches per rollout batch).
                metrics.update(learner.update(batch, advantages))
                # Publish the new policy to the engine (the rollout side may run ahead).
                t1 = time.perf_counter()
                placement.publish(learner, source)  # a file, the object store or a broadcast
                step += 1
                metrics.update({"perf/wait_s": wait_s, "perf/publish_s": time.perf_counter() - t1,
                                "perf/step_s": time.perf_counter() - t0})  # fmt: skip
                # Nothing is lost silently: re-issued prompts, failed-over reward requests.
                for k, v in batch.reward_client.items():
                    client_totals[k] = client_totals.get(k, 0) + v
                metrics.update(reward_client_metrics(client_totals, eval_env.verifier))
                metrics.update(placement.metrics())
                for k, v in carried.items():
                    metrics[k] = metrics.get(k, 0.0) + v
                # 6. Log.
                log.write("train", step, metrics)
                rollouts.write("rollouts", step, rollout_record(batch, tokenizer.decode))
                bar.set_postfix(reward=f"{metrics['reward/mean']:+.2f}",
                                acc=f"{metrics['reward/accuracy']:.2f}",
                                len=f"{metrics['rollout/response_len_mean']:.0f}",
                                stale=f"{metrics['rollout/staleness_mean']:.1f}")  # fmt: skip
                bar.update(1)
                tqdm.write(summary_line(step, steps, metrics))
                if cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                    run_eval(step)
                if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
                    checkpoint(step)
            if not stopper.requested:
                run_eval(step)
        except KeyboardInterrupt:
            stopper.requested = stopper.requested or "SIGINT"
        except LearnerRankError as exc:  # a dead rank: the group cannot save or go on
            rank_failure = exc
            tqdm.write(f"[fipo] {exc}")
            exit_code = 5
        if stopper.requested and not rank_failure:
            tqdm.write(f"[fipo] {stopper.requested}: saving a checkpoint at step {step} and "
                       "stopping the workers and the reward server (a second signal aborts "
                       "a running update)")  # fmt: skip
            exit_code = 0 if stopper.requested == "SIGTERM" else 130
        # Ignore further signals while saving and shutting down (a second Ctrl-C would
        # otherwise leave a half-written checkpoint or orphaned workers).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Neither a half-applied update nor a group with a dead rank is saved: the last
        # periodic checkpoint is the one to resume from.
        can_save = not (stopper.forced or rank_failure)
        if stopper.forced:
            tqdm.write("[fipo] second signal: the update in progress was abandoned; the last "
                       "periodic checkpoint is the one to resume from")  # fmt: skip
        if can_save and (step > start_step or not (run_dir / "checkpoints").exists()):
            checkpoint(step)
        write_plots(run_dir / "metrics.jsonl", run_dir / "plots")
        if can_save and not stopper.requested:
            final = run_dir / "final_model"
            placement.save_model(learner, final)
            tokenizer.save_pretrained(final)
        bar.close()
    if rank_failure:
        print(f"[fipo] stopped: learner rank {rank_failure.rank} failed after {step} steps; "
              f"{resume_hint(run_dir)}", flush=True)  # fmt: skip
    else:
        print(f"[fipo] done: {step} steps; run folder {run_dir}", flush=True)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``fipo-train``); returns the exit code."""
    from trainer.learner_group import LearnerRankError
    from trainer.rollout import RolloutWorkerError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(help_text())
        return 0
    try:
        parsed = parse_args(args)
        return train(parsed.config, parsed.resume)
    except ConfigError as exc:
        print(f"fipo-train: config error: {exc}\n\n{USAGE}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a logger's package (run.loggers=wandb, ...)
        print(f"fipo-train: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # model dir, resume folder
        print(f"fipo-train: {exc}", file=sys.stderr)
        return 2
    except RewardServerError as exc:
        print(f"fipo-train: {exc}", file=sys.stderr)
        return 3
    except RolloutWorkerError as exc:
        print(f"fipo-train: {exc}", file=sys.stderr)
        return 4
    except LearnerRankError as exc:  # a rank failed while starting
        print(f"fipo-train: {exc}", file=sys.stderr)
        return 5
    except (ConnectionError, TimeoutError) as exc:  # Ray: not joined, bundles not placed
        print(f"fipo-train: cluster: {exc}", file=sys.stderr)
        return 6
    except KeyboardInterrupt:  # a signal during set-up, before there is anything to save
        print("fipo-train: interrupted during set-up; nothing to checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
