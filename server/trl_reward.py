"""A ready-made reward function with TRL's ``reward_funcs`` signature.

TRL's ``GRPOTrainer`` calls each reward function as ``f(prompts, completions, **kwargs)``,
where ``kwargs`` holds the batch's other dataset columns (one value per completion), and
expects one float per completion. Works with any ``Scorer``: a ``RewardClient`` talking to
a server, or an in-process ``WorkerPool``.

Example:
    >>> client = RewardClient("127.0.0.1:50051")               # doctest: +SKIP
    >>> reward = make_trl_reward_func(client, gold_column="answer")
    >>> GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=ds)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.types import AnswerFormat, RewardScheme, ScoreItem, Scorer


def _text(completion: Any) -> str:
    """A completion as text: plain strings, or TRL's conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"unsupported completion type {type(completion).__name__}")


def _golds(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return (str(value),)


def make_trl_reward_func(
    scorer: Scorer,
    *,
    gold_column: str = "answer",
    answer_format: AnswerFormat = AnswerFormat.LATEX,
    reward_scheme: RewardScheme = RewardScheme.BINARY,
    name: str = "math_verify_reward",
) -> Callable[..., list[float]]:
    """Build ``reward(prompts, completions, **kwargs) -> list[float]`` for TRL.

    Args:
        scorer: Any ``Scorer`` (``RewardClient``, ``AsyncRewardClient``, ``WorkerPool``).
        gold_column: Dataset column with the gold answer (a string or a list of strings).
        answer_format: How answers are written.
        reward_scheme: Binary 0/1 or signed +-1.
        name: The function's ``__name__`` (TRL logs rewards under it).

    Returns:
        The reward function.
    """

    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        if gold_column not in kwargs:
            raise KeyError(
                f"reward function needs the dataset column {gold_column!r}; "
                f"columns passed: {sorted(kwargs)}"
            )
        golds = kwargs[gold_column]
        if len(golds) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        items = [
            ScoreItem(
                id=str(i),
                response=_text(c),
                golds=_golds(g),
                answer_format=answer_format,
                reward_scheme=reward_scheme,
            )
            for i, (c, g) in enumerate(zip(completions, golds, strict=True))
        ]
        return [r.reward for r in scorer.score(items)]

    reward.__name__ = name
    reward.__qualname__ = name
    return reward
