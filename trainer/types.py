"""Records and interfaces at the rollout / learner boundary.

The learner never talks to an inference engine directly: it pulls ``RolloutBatch``es
from a ``RolloutSource`` (a bounded queue fed by rollout workers) and hands new weights
to a ``WeightPublisher``. Both are Protocols so that a multi-machine implementation
(Ray actors, a parameter server) can replace the local multiprocessing one later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Generation:
    """One sampled response, exactly as the engine produced it.

    Attributes:
        token_ids: Response token ids, EOS included when the engine stopped on it.  # [T]
        logprobs: Behaviour-policy log-prob of each sampled token.  # [T]
        finish_reason: ``"stop"`` (EOS / stop token) or ``"length"``.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str


@dataclass(frozen=True)
class RolloutGroup:
    """G responses to one prompt, scored, with the policy version that produced them.

    Attributes:
        prompt_ids: Chat-templated prompt token ids.  # [P]
        response_ids: The env-accepted response tokens of each sample (what
            ``step_tokens`` consumed; EOS included when it terminated).  # G x [T_i]
        behaviour_logp: Engine log-probs aligned with ``response_ids``.  # G x [T_i]
        rewards: Final reward per sample (verifier + overlong penalty).  # [G]
        correct: Verifier verdict per sample.  # [G]
        truncated: Whether the sample hit the response-length limit.  # [G]
        policy_version: Learner version whose weights generated the group.
        problem: The problem text (for logs).
        answer: The gold answer (for logs).
    """

    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    behaviour_logp: tuple[tuple[float, ...], ...]
    rewards: np.ndarray
    correct: np.ndarray
    truncated: np.ndarray
    policy_version: int
    problem: str = ""
    answer: str = ""


@dataclass(frozen=True)
class RolloutBatch:
    """The groups one learner step trains on, plus rollout-side statistics.

    Attributes:
        groups: Kept groups (after dynamic sampling when it is on).
        num_generated_groups: Groups generated to fill this batch (>= len(groups)).
        gen_seconds: Wall time the rollout side spent producing the batch.
        gen_tokens: Response tokens generated for the batch, dropped groups included.
        reward_client: What the rollout side's reward client did while making the batch
            (``server.client.ClientStats`` fields: ``requests``, ``retries``,
            ``failovers``); summed over workers. Empty when the verifier is not a client.
    """

    groups: tuple[RolloutGroup, ...]
    num_generated_groups: int
    gen_seconds: float
    gen_tokens: int
    reward_client: Mapping[str, int] = field(default_factory=dict)

    @property
    def min_policy_version(self) -> int:
        """Oldest policy version among the batch's groups."""
        return min(g.policy_version for g in self.groups)


class RolloutSource(Protocol):
    """Where the learner gets training data from (bounded; blocks when empty)."""

    def next_batch(self, timeout_s: float | None = None) -> RolloutBatch:
        """Return the next batch; raise ``TimeoutError`` when none arrives in time."""
        ...

    def close(self) -> None:
        """Stop the producers and release their resources (no orphan processes)."""
        ...


class WeightPublisher(Protocol):
    """How the learner hands new weights to the rollout side."""

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Make ``state_dict`` (HF parameter names) the rollout engines' policy ``version``.

        Returns once every engine serves the new weights (the sync is synchronous so a
        sample's recorded ``policy_version`` is exact).
        """
        ...
