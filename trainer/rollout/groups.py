"""Pure group assembly and filtering: engine output + env verdicts -> ``RolloutGroup``s.

No process, engine or env here: these functions take plain sequences and are tested
directly (``tests/trainer/test_rollout.py``).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np

from trainer.config import FilterMetricName
from trainer.types import Generation, RolloutGroup


def build_groups(
    prompts: Sequence[Sequence[int]],
    generations: Sequence[Sequence[Generation]],
    consumed: Sequence[int],
    rewards: Sequence[float],
    correct: Sequence[bool],
    truncated: Sequence[bool],
    version: int,
    problems: Sequence[str] = (),
    answers: Sequence[str] = (),
) -> list[RolloutGroup]:
    """Assemble one ``RolloutGroup`` per prompt from engine output and env verdicts.

    Args:
        prompts: Prompt token ids, one per group.  # P x [P_i]
        generations: ``generations[g][j]``, sample j of prompt g.  # P x G
        consumed: Tokens the env accepted per sample (flattened row-major).  # [P*G]
        rewards: Env reward per sample.  # [P*G]
        correct: Verifier verdict per sample.  # [P*G]
        truncated: Whether the env truncated the sample at the length limit.  # [P*G]
        version: Policy version that generated the samples.
        problems: Problem text per group (for logs).
        answers: Gold answer per group (for logs).
    """
    groups = []
    for g, (prompt, gens) in enumerate(zip(prompts, generations, strict=True)):
        rows = range(g * len(gens), (g + 1) * len(gens))
        resp, logp = [], []
        for gen, i in zip(gens, rows, strict=True):
            n = int(consumed[i])
            if not 0 < n <= len(gen.token_ids):
                raise RuntimeError(
                    f"env consumed {n} tokens of a {len(gen.token_ids)}-token response"
                )
            resp.append(tuple(gen.token_ids[:n]))
            logp.append(tuple(gen.logprobs[:n]))
        groups.append(
            RolloutGroup(
                prompt_ids=tuple(int(t) for t in prompt),
                response_ids=tuple(resp),
                behaviour_logp=tuple(logp),
                rewards=np.asarray([rewards[i] for i in rows], dtype=np.float64),
                correct=np.asarray([bool(correct[i]) for i in rows], dtype=bool),
                truncated=np.asarray([bool(truncated[i]) for i in rows], dtype=bool),
                policy_version=version,
                problem=str(problems[g]) if g < len(problems) else "",
                answer=str(answers[g]) if g < len(answers) else "",
            )
        )
    return groups


def informative_mask(
    groups: Sequence[RolloutGroup], metric: FilterMetricName = "acc"
) -> np.ndarray:
    """DAPO dynamic sampling: True for the groups whose ``metric`` differs across samples.

    Args:
        groups: Scored groups.
        metric: ``"acc"`` (DAPO's default, verl's ``filter_groups.metric=acc``): a group
            counts when its verdicts differ. ``"reward"``: when its final rewards (verdict
            + soft overlong penalty) differ, which also keeps an all-correct group whose
            only spread is a small length penalty; group normalisation then blows that
            penalty up to a unit-scale advantage (G = 16: A = -3.75 for the long one).

    Returns:
        Boolean mask.  # [len(groups)]
    """
    from trainer.advantages import dynamic_sampling_mask

    names = typing.get_args(FilterMetricName)
    if metric not in names:
        raise ValueError(f"metric must be one of {names}, got {metric!r}")
    if not groups:
        return np.zeros(0, dtype=bool)
    values = [g.correct.astype(np.float64) if metric == "acc" else g.rewards for g in groups]
    return np.asarray(dynamic_sampling_mask(np.stack(values)), dtype=bool)


def keep_informative(
    groups: Sequence[RolloutGroup], metric: FilterMetricName = "acc"
) -> list[RolloutGroup]:
    """The groups :func:`informative_mask` keeps, in order."""
    keep = informative_mask(groups, metric)
    return [g for g, k in zip(groups, keep, strict=True) if k]
