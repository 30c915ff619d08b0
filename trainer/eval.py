"""Held-out evaluation: greedy answers to problems never used for training.

The problems come from the task's ``eval`` split (``fipo_env.tasks``: a hash of the
canonical problem decides the split, so no eval problem is ever a training problem).
Each problem is posed through the same token-level env the rollouts use
(``reset(options={"problem": p})`` then ``step_tokens``), so prompts, stop tokens,
answer extraction and the verifier are exactly those of training.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from fipo_env.envs.math_reasoning import MathReasoningEnv
    from fipo_env.tasks import Problem
    from trainer.rollout import ProcessRolloutSource, RolloutWorkerConfig


class GreedyGenerator(Protocol):
    """Anything that decodes greedily from token-id prompts (an engine or the learner)."""

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """Greedy response token ids for each prompt (stop token included if emitted)."""
        ...


class SourceGreedyGenerator:
    """Greedy decoding through the rollout worker's engine (vLLM), with its current weights.

    Args:
        source: The rollout worker's source (its ``generate``).
        stop_ids: The env's stop token ids.
    """

    def __init__(self, source: ProcessRolloutSource, stop_ids: Sequence[int]):
        self.source = source
        self.stop_ids = tuple(int(t) for t in stop_ids)

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        from trainer.engines.base import SamplingConfig

        sampling = SamplingConfig(max_tokens=max_tokens, temperature=0.0,
                                  stop_token_ids=self.stop_ids)  # fmt: skip
        generations, _ = self.source.generate(prompts, 1, sampling, phase="eval")
        return [list(g[0].token_ids) for g in generations]


# The env's train / eval split share (``fipo_env.tasks.make_task`` default), which the
# rollout worker's training split uses too: eval problems are never training problems.
EVAL_FRACTION = 0.1


def held_out_problems(task_spec: str, n: int, seed: int) -> list[Problem]:
    """``n`` distinct problems of the task's eval split (deterministic for ``seed``)."""
    from fipo_env.tasks import make_task, sample_problems

    if n == 0:
        return []
    task = make_task(task_spec, split="eval", eval_fraction=EVAL_FRACTION)
    return sample_problems(task, n, seed)


def make_eval_env(worker: RolloutWorkerConfig, max_response_tokens: int) -> MathReasoningEnv:
    """The single token-level env used to pose and score held-out problems: the rollout
    worker's env settings (task, verifier, prompt limit, reward scheme) with eval's
    response limit and no overlong penalty."""
    from fipo_env.envs.math_reasoning import MathReasoningEnv

    return MathReasoningEnv(**worker.env_kwargs(max_response_tokens=max_response_tokens))


def evaluate(
    generator: GreedyGenerator, env: MathReasoningEnv, problems: Sequence[Problem], max_tokens: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy accuracy and response length on ``problems``.

    Args:
        generator: Greedy decoder.
        env: A ``fipo_env`` math env (unwrapped) whose verifier scores the answers.
        problems: Held-out ``fipo_env.tasks.Problem`` records.
        max_tokens: Response-length limit.

    Returns:
        ``(metrics, samples)``: ``eval/…`` metrics and one record per problem.
    """
    start = time.perf_counter()
    prompts = []
    for problem in problems:
        obs, _ = env.reset(options={"problem": problem})
        prompts.append(obs["prompt_ids"][: int(obs["prompt_len"])].tolist())
    gen_start = time.perf_counter()
    responses = generator.generate_greedy(prompts, max_tokens) if prompts else []
    gen_seconds = time.perf_counter() - gen_start
    correct, lengths, truncated, samples = [], [], [], []
    for problem, response in zip(problems, responses, strict=True):
        env.reset(options={"problem": problem})
        _, _, terminated, trunc, info = env.step_tokens(response)
        if not (terminated or trunc):
            # The engine stopped early without a stop token: the response is over.
            info = _finish_without_stop(env, info)
            trunc = True
        correct.append(bool(info.get("correct", False)))
        lengths.append(int(info.get("response_tokens", len(response))))
        truncated.append(bool(trunc))
        samples.append(
            {
                "question": problem.question,
                "gold": problem.gold,
                "response": info.get("response", ""),
                "prediction": info.get("extracted_prediction", ""),
                "correct": correct[-1],
            }
        )
    n = max(1, len(problems))
    metrics = {
        "eval/accuracy": float(np.sum(correct) / n),
        "eval/response_len_mean": float(np.mean(lengths)) if lengths else 0.0,
        "eval/truncated_frac": float(np.sum(truncated) / n),
        "eval/num_problems": float(len(problems)),
        "eval/boxed_frac": float(np.mean(["\\boxed" in s["response"] for s in samples]))
        if samples
        else 0.0,
        "perf/eval_s": time.perf_counter() - start,
        "perf/eval_gen_s": gen_seconds,
    }
    return metrics, samples


def _finish_without_stop(env: MathReasoningEnv, info: dict[str, Any]) -> dict[str, Any]:
    """Feed single filler steps until the env's length limit ends the episode.

    Only reached when a generator returns fewer tokens than the limit without a stop token
    (it should not); keeps scoring defined rather than leaving the episode open.
    """
    pad = int(getattr(env, "pad_id", 0))
    while True:
        _, _, terminated, truncated, info = env.step(pad)
        if terminated or truncated:
            return info
