"""Pure group assembly and filtering: engine output + env verdicts -> ``RolloutGroup``s.

No process, engine or env here: these functions take plain sequences and are tested
directly (``tests/trainer/test_rollout.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def keep_informative(groups: Sequence[RolloutGroup]) -> list[RolloutGroup]:
    """DAPO dynamic sampling: the groups whose rewards are not all equal."""
    from trainer.advantages import dynamic_sampling_mask

    if not groups:
        return []
    keep = dynamic_sampling_mask(np.stack([g.rewards for g in groups]))
    return [g for g, k in zip(groups, keep, strict=True) if k]
