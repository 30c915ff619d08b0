"""The learner: policy model, AdamW, and one update per rollout batch.

One update (``Learner.update``):

1. Flatten the batch's groups into sequences and split them into ``optim.mini_batches``
   mini-batches of whole groups (and each into micro-batches under
   ``model.micro_batch_tokens``, shared-prompt packed by default: ``trainer.packing``).
2. Recompute ``old_logp`` with the current weights before the first optimiser step: for
   the first mini-batch it is ``logp.detach()`` of its own training forward (so
   ``logp == old_logp`` exactly, Future-KL = 0, the step is DAPO's, as the spec says it
   must be); the other mini-batches get one no-grad pass on exactly their micro-batches.
3. One optimiser step per mini-batch: ``trainer.fipo.policy_loss`` (token-mean), grad
   clip, AdamW, warm-up schedule. Gradient accumulation is exact: each micro-batch
   backpropagates its loss *sum*, and the summed gradients are divided by the
   mini-batch's count after the sequence-drop rule (known only once every micro-batch
   has run), so 1 or many micro-batches give the same loss, gradient and step. Later mini-batches see a moved policy, which is where
   Future-KL acts.

A non-finite loss, gradient norm or log-prob (``loss/nonfinite_tokens`` > 0: an infinite
log-prob is clamped to a finite ratio and would not show in the loss) skips the optimiser
step (gradients are zeroed and the skip is counted in the metrics); it is never applied.
The rows of a skipped first mini-batch still get their ``old_logp`` (no-grad pass, before
any step), so ``optim.epochs > 1`` never trains a row against a moved "old" policy. A mini-batch whose advantages
are all zero is skipped too (``optim/skipped_zero_advantage``): its gradient is 0, and an
AdamW step on it would still move the weights through momentum and weight decay.

**Data parallel** (``process_group``: K ranks of one ``torch.distributed`` group, gloo on
CPU, NCCL on GPU; ``trainer.learner_group`` starts them as Ray actors). Every rank holds
the whole batch and the same generator, so every rank draws the same mini-batches; each
trains on its share of each one (``trainer.packing.shard``: whole groups, balanced by
tokens) and keeps its own ``old_logp`` for the rows it trains on. Per optimiser step one
small all-reduce sums the loss, the surviving-token and sequence counts (after the
sequence-drop rule) and the non-finite flag, and one all-reduce sums the gradients, which
are then divided by the global count: K ranks make the step one rank makes on the same
batch, up to float summation order. Every skip is decided on global figures (the
zero-advantage test reads the whole mini-batch; the non-finite test the summed flag and
the gradient norm of the identical summed gradients), so ranks never disagree on a step
and never wait on each other in a collective. Future-KL is per response: it needs no
communication. The pooled metrics are merged over the ranks at the end of the update.
Without a group nothing of this runs: the single-process update is the same code.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from fipo_env.models import offline_hub
from trainer.config import AlgorithmConfig, ConfigError, TrainConfig
from trainer.logprobs import micro_batch_logprobs
from trainer.packing import (
    MicroBatch,
    Sequences,
    flatten_batch,
    make_micro_batch,
    mini_batch_rows,
    pack,
    shard,
)
from trainer.precision import resolve as resolve_precision
from trainer.types import RolloutBatch
from trainer.update_metrics import UpdateMetrics

if TYPE_CHECKING:
    from trainer.fipo import LossConfig


def build_loss_config(algorithm: AlgorithmConfig) -> LossConfig:
    """The ``trainer.fipo.LossConfig`` preset of ``algorithm.name`` with its overrides."""
    from trainer.fipo import loss_config

    overrides: dict[str, Any] = {
        name: getattr(algorithm, name)
        for name in (
            "decay_rate",
            "influence_clip",
            "clip_high_only",
            "safety_threshold",
            "dual_clip",
            "participation_filter",
            "clip_low",
            "clip_high",
        )
        if getattr(algorithm, name) is not None
    }
    overrides["tis_cap"] = algorithm.tis_cap or None
    try:
        return loss_config(algorithm.name, **overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"algorithm: {exc}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for missing CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is available")
    return torch.device(name)


def load_policy(model_dir: str | Path, device: torch.device, gradient_checkpointing: bool):
    """Load a local HF causal LM in fp32 (master weights), offline."""
    offline_hub()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    )
    model.to(device)
    model.eval()  # no dropout in RL updates
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        # transformers checkpoints a layer only when that layer is in training mode; flag
        # the checkpointed layers alone, so their sub-modules keep dropout off.
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.training = True
    return model


class Learner:
    """Holds the policy and its optimiser; ``update`` trains on one rollout batch.

    Args:
        config: The trainer config (model, algorithm, optim sections are used).
        model_dir: Local HF model directory.
        loss_config: A ``trainer.fipo.LossConfig``.
        pad_id: Token id used for padding (masked out everywhere).
        process_group: The data-parallel group this learner is one rank of (see the
            module docstring), already initialised; every rank is built with the same
            arguments and calls ``update`` on the same batch. ``None``: one process.
            Rank 0's weights are broadcast to the others here, so replicas start equal.
    """

    def __init__(
        self,
        config: TrainConfig,
        model_dir: str | Path,
        loss_config: LossConfig,
        pad_id: int,
        process_group: dist.ProcessGroup | None = None,
    ):
        self.config = config
        self.process_group = process_group
        self.rank = dist.get_rank(process_group) if process_group is not None else 0
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        self.loss_config = loss_config
        self.pad_id = pad_id
        self.device = resolve_device(config.model.device)
        # "auto" -> bf16 only where the hardware multiplies it natively (trainer.precision).
        self.autocast_dtype = resolve_precision(
            "float32", config.model.autocast_dtype, self.device.type
        ).autocast_dtype
        self.model = load_policy(model_dir, self.device, config.model.gradient_checkpointing)
        # The shared-prompt layout (trainer.packing) runs on block attention.
        self.shared_prompt = config.model.share_prompt
        if self.shared_prompt:
            from trainer.segment_attention import use_segment_attention

            use_segment_attention(self.model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if process_group is not None:
            with torch.no_grad():
                for tensor in self.model.state_dict().values():
                    dist.broadcast(tensor, group=process_group, group_src=0)
        opt = config.optim
        self.optimizer = torch.optim.AdamW(
            self._params,
            lr=opt.lr,
            betas=(opt.beta1, opt.beta2),
            weight_decay=opt.weight_decay,
            # One fused kernel per step: 0.09 s vs 0.54 s (foreach) for the 135M default
            # on one CPU thread. Same state-dict format, so checkpoints are unaffected.
            fused=self.device.type in ("cpu", "cuda"),
        )
        warmup = opt.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
        )
        self.generator = torch.Generator().manual_seed(config.run.seed)
        # Called before each micro-batch; returns the torch threads to use (run.py switches
        # to every core while the rollout worker is idle). None: leave threads alone.
        self.thread_policy: Callable[[], int] | None = None
        self._threads_used: list[int] = []  # per forward of the current update
        self.version = 0  # policy version = rollout batches trained on
        self.optimizer_steps = 0
        self.skipped_steps = 0

    # --- forward passes -------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logprobs(self, mb: MicroBatch, with_entropy: bool = False):
        if self.thread_policy is not None:
            threads = self.thread_policy()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self._threads_used.append(torch.get_num_threads())
        with self._autocast():
            return micro_batch_logprobs(
                self.model,
                mb,
                chunk_tokens=self.config.model.logprob_chunk_tokens,
                temperature=self.config.rollout.temperature,
                with_entropy=with_entropy,
            )

    @torch.no_grad()
    def logprobs(self, seqs: Sequences) -> list[torch.Tensor]:
        """Current-policy log-probs of each response (no grad), one tensor per row."""
        out: dict[int, torch.Tensor] = {}
        shared = self.shared_prompt
        for rows in pack(seqs, range(len(seqs)), self.config.model.micro_batch_tokens, shared):
            lp = self._logprobs(make_micro_batch(seqs, rows, self.pad_id, shared)).cpu()
            for i, r in enumerate(rows):
                out[r] = lp[i, : len(seqs.responses[r])]
        return [out[r] for r in range(len(seqs))]

    def _denominator(self, seqs: Sequences, rows: list[int], kept: dict) -> float:
        """The mini-batch's aggregation denominator, counted after the sequence-drop rule.

        Each micro-batch's loss is a sum (``normaliser=1``); dividing the summed gradients
        by this gives exactly the loss of the whole mini-batch in one piece, however it
        was split (``rows``: the whole mini-batch's, every rank's share; ``kept``: the
        micro-batches' ``loss/num_tokens`` and ``loss/num_sequences``, summed over them
        and over the ranks).
        """
        aggregation = self.loss_config.aggregation
        if aggregation == "token_mean":
            return max(1.0, kept["loss/num_tokens"])
        if aggregation == "seq_mean_token_mean":
            return max(1.0, kept["loss/num_sequences"])
        # seq_mean_token_sum_norm: B * T, padded
        return float(len(rows) * max(1, max(len(seqs.responses[r]) for r in rows)))

    @torch.no_grad()
    def _fill_old_logp(
        self,
        seqs: Sequences,
        micros: list[list[int]],
        old_logp: dict[int, torch.Tensor],
        steps_taken: int,
    ) -> None:
        """``old_logp`` for the rows of a skipped mini-batch that have none yet.

        Only the first mini-batch can lack them (its come from its own training forward),
        and only before any optimiser step, so the weights are still the old policy: later
        epochs then never train a row against a moved "old" policy (nor against the
        non-finite values of the forward that made the step skip).
        """
        if steps_taken:  # every row got its old_logp before the first step
            return
        # A forward that made the step non-finite is not kept as the old policy either.
        for rows in micros:
            for r in rows:
                if r in old_logp and not bool(torch.isfinite(old_logp[r]).all()):
                    del old_logp[r]
        missing = [rows for rows in micros if any(r not in old_logp for r in rows)]
        for rows in missing:
            mb = make_micro_batch(seqs, rows, self.pad_id, self.shared_prompt)
            lp = self._logprobs(mb).cpu()
            for i, r in enumerate(rows):
                old_logp.setdefault(r, lp[i])

    def _old_logp_pass(
        self, seqs: Sequences, rows: list[int], old_logp: dict[int, torch.Tensor]
    ) -> None:
        lp = self._logprobs(make_micro_batch(seqs, rows, self.pad_id, self.shared_prompt)).cpu()
        for i, r in enumerate(rows):
            old_logp[r] = lp[i]

    # --- data parallel (only with a process group) ----------------------------------

    def _all_reduce_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.process_group)
        return t.tolist()

    def _all_reduce_step(self, loss_sum: float, kept: dict, finite: bool) -> tuple[float, bool]:
        """Sum one step's loss, counts (``kept``, in place) and gradients over the ranks.

        Returns the global loss sum and whether every rank was finite; the gradients are
        summed only then (a skipped step needs none). Why an explicit all-reduce, not
        DDP: each micro-batch backpropagates a loss *sum*, and the divisor, the global
        count after the sequence-drop rule, is known only after every rank's last
        micro-batch; summing the gradient sums and dividing once by that count is
        exactly the one-rank gradient. DDP averages over K in hooks during ``backward``
        (each micro-batch would need ``no_sync``, uneven shares ``join``) and would reduce
        before the skip decision. The cost: no overlap of the reduce with the backward,
        and one flat fp32 copy of the gradients.
        """
        has_grad = [float(p.grad is not None) for p in self._params]
        names = list(kept)
        summed = self._all_reduce_floats(
            [loss_sum, 0.0 if finite else 1.0, *(kept[k] for k in names), *has_grad]
        )
        loss_sum, nonfinite = summed[0], summed[1]
        kept.update(zip(names, summed[2 : 2 + len(names)], strict=True))
        if nonfinite > 0:
            return loss_sum, False
        # Parameters no rank has a gradient for stay without one (AdamW skips them, as
        # with one rank); a rank without one for the others contributes zeros.
        params = [p for p, n in zip(self._params, summed[2 + len(names) :], strict=True) if n > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.process_group)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        return loss_sum, True

    # --- the update -----------------------------------------------------------------

    def update(self, batch: RolloutBatch, advantages: Sequence[np.ndarray]) -> dict[str, float]:
        """Train on one rollout batch: recompute old log-probs, one step per mini-batch.

        Args:
            batch: The rollout batch (already scored).
            advantages: Per group, the advantage of each of its samples.  # groups x [G]

        Returns:
            Namespaced metrics (``loss/…``, ``fipo/…``, ``policy/…``, ``optim/…``,
            ``perf/…``), pooled over the update as ``trainer.update_metrics`` says.
        """
        from trainer.fipo import policy_loss_terms

        start = time.perf_counter()
        self._threads_used = []
        seqs = flatten_batch(batch, advantages)
        cfg = self.config
        shared = self.shared_prompt
        budget = cfg.model.micro_batch_tokens
        # Per optimiser step: the whole mini-batch's rows, and this rank's micro-batches.
        plan = [
            (mini, pack(seqs, shard(seqs, mini, self.rank, self.world_size), budget, shared))
            for _ in range(cfg.optim.epochs)
            for mini in mini_batch_rows(seqs, cfg.optim.mini_batches, self.generator)
        ]
        first_epoch = plan[: len(plan) // cfg.optim.epochs]
        # old_logp, computed before any optimiser step on this batch. The first
        # mini-batch's comes from its own training forward (logp.detach(): the step is
        # on-policy by construction, F = 0), so only the others need a no-grad pass, on
        # exactly the micro-batches they train on.
        old_logp: dict[int, torch.Tensor] = {}  # row -> [T_i]
        with torch.no_grad():
            for _, micros in first_epoch[1:]:
                for rows in micros:
                    self._old_logp_pass(seqs, rows, old_logp)
            # Data parallel with epochs > 1: a rank can draw rows in a later epoch that
            # another rank trained on in the first (never so with one rank).
            own_first = {r for rows in plan[0][1] for r in rows} if plan else set()
            later = {r for _, micros in plan for rows in micros for r in rows}
            later -= own_first | old_logp.keys()
            for rows in pack(seqs, sorted(later), budget, shared):
                self._old_logp_pass(seqs, rows, old_logp)
        old_seconds = time.perf_counter() - start

        pooled = UpdateMetrics()
        losses: list[float] = []  # per optimiser step: the mini-batch's loss
        grad_norms: list[float] = []
        skipped = skipped_zero = steps_taken = 0
        tokens_seen = 0
        for index, (mini, micros) in enumerate(plan):
            self.optimizer.zero_grad(set_to_none=True)
            if not bool(seqs.advantages[mini].any()):  # the whole mini-batch: every rank agrees
                # Zero advantage everywhere: the loss and its gradient are 0, and stepping
                # would still move the weights (Adam momentum, weight decay) on nothing.
                self._fill_old_logp(seqs, micros, old_logp, steps_taken)
                skipped_zero += 1
                continue
            loss_sum = 0.0
            step_calls: list[tuple] = []  # pooled only if the step is taken
            kept = {"loss/num_tokens": 0.0, "loss/num_sequences": 0.0}
            finite = True
            for rows in micros:
                mb = make_micro_batch(seqs, rows, self.pad_id, shared)
                tokens_seen += mb.padded_tokens
                logp, entropy_t = self._logprobs(mb, with_entropy=True)
                if all(r in old_logp for r in rows):
                    T = mb.response_mask.shape[1]
                    old = torch.stack([_pad(old_logp[r], T) for r in rows]).to(self.device)
                else:  # the first mini-batch: the policy the update starts from
                    old = logp.detach()
                    for i, r in enumerate(rows):
                        old_logp[r] = old[i].cpu()
                mask = mb.response_mask.to(self.device)
                behaviour = mb.behaviour_logp.to(self.device)
                # An engine that gave no usable log-probs gets no IS correction (metrics only).
                if not bool(torch.isfinite(torch.where(mask > 0, behaviour, 0.0)).all()):
                    behaviour = None
                adv = seqs.advantages[mb.rows].to(self.device)
                entropy = (float(torch.where(mask > 0, entropy_t, 0.0).sum()), float(mask.sum()))
                loss, metrics, terms = policy_loss_terms(
                    logp,
                    old,
                    adv,
                    mask,
                    self.loss_config,
                    behaviour_logp=behaviour,
                    normaliser=1.0,  # a sum: divided by the mini-batch's count below
                )
                # docs/fipo.md: an infinite log-prob is clamped to a finite ratio, so the
                # loss alone does not show it; nonfinite_tokens does.
                if not torch.isfinite(loss) or metrics["loss/nonfinite_tokens"] > 0:
                    finite = False
                    break
                loss.backward()
                loss_sum += float(loss.detach())
                for key in kept:
                    kept[key] += metrics[key]
                step_calls.append((metrics, terms.ratio, terms.keep, entropy))
            if self.process_group is not None:
                loss_sum, finite = self._all_reduce_step(loss_sum, kept, finite)
            grad_norm = float("nan")
            if finite:
                denominator = self._denominator(seqs, mini, kept)
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.div_(denominator)
                losses.append(loss_sum / denominator)
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
                finite = math.isfinite(grad_norm)
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                self._fill_old_logp(seqs, micros, old_logp, steps_taken)
                skipped += 1
                self.skipped_steps += 1
                continue
            self.optimizer.step()
            self.scheduler.step()
            steps_taken += 1
            for metrics, ratio, keep, entropy in step_calls:
                pooled.add(metrics, acting=index > 0, ratio=ratio, keep=keep, entropy=entropy)
            grad_norms.append(grad_norm)
            self.optimizer_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        if self.process_group is not None:
            pooled.merge_ranks(self.process_group)
            tokens_seen = int(self._all_reduce_floats([tokens_seen])[0])
        out = pooled.result()
        if losses:  # mean over the optimiser steps of what each step minimised
            out["loss/policy"] = float(np.mean(losses))
            out["optim/grad_norm"] = float(np.mean(grad_norms))
            out["optim/grad_norm_max"] = float(np.max(grad_norms))
        total_tokens = sum(len(r) for r in seqs.responses)
        elapsed = time.perf_counter() - start
        out.update(
            {
                "optim/lr": self.scheduler.get_last_lr()[0],
                "optim/steps": float(self.optimizer_steps),
                "optim/skipped_nonfinite": float(skipped),
                "optim/skipped_zero_advantage": float(skipped_zero),
                "perf/learner_s": elapsed,
                "perf/old_logp_s": old_seconds,
                "perf/learner_tokens_per_s": total_tokens / max(elapsed, 1e-9),
                "perf/learner_padded_tokens": float(tokens_seen),
                "perf/learner_threads_mean": float(np.mean(self._threads_used or [0])),
                "learner/sequences": float(len(seqs)),
                "learner/response_tokens": float(total_tokens),
            }
        )
        return out

    # --- weights and state ----------------------------------------------------------

    def hf_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Weights under HF parameter names, detached, on CPU; tied tensors cloned.

        Args:
            dtype: Cast floating-point tensors to it (on the model's device, before the
                copy to CPU): the rollout engine's dtype, so a bf16 engine is sent half the
                bytes. ``None`` keeps the training dtype.
        """
        seen: dict[int, str] = {}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.model.state_dict().items():
            t = tensor.detach()
            ptr = t.untyped_storage().data_ptr()
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)  # a new tensor: nothing shared with the model
            elif ptr in seen:
                t = t.clone()
            out[name] = t.cpu()
            seen.setdefault(ptr, name)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, schedule, RNG."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "version": self.version,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.version = int(state["version"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[0]))
