"""OpenRLHF's remote-reward protocol (``--remote_rm_url``, OpenRLHF 0.11.2), both ways.

OpenRLHF's single-turn agent executor (``openrlhf/utils/agent.py``) asks for rewards with
three parallel lists -- ``query`` (the decoded prompt + response, special tokens kept),
``prompts`` (the prompt text) and ``labels`` (the dataset's label column, here the gold) --
either as a JSON POST to each URL or as a call ``reward_func(queries, prompts, labels)`` of
a Python file. It reads ``rewards``, ``scores`` and ``extra_logs`` (each a list with one
value per query) from the reply. This module turns such a request into ``ScoreItem`` s and
results into that reply; ``server.http`` serves it over HTTP and
``server/openrlhf_reward.py`` is the Python file.

Extra logs are numbers with a fixed set of keys (OpenRLHF turns each into a tensor and
averages it per step): ``acc`` (1 when correct), ``overlong_penalty`` and one
``status_<name>`` per status (1 for the item's status, else 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.types import AnswerFormat, RewardScheme, ScoreItem, ScoreResult, Status

STATUS_KEYS = {s: f"status_{s.value.lower()}" for s in Status}


class ProtocolError(ValueError):
    """A request that does not follow the protocol; the message says what is wrong."""


def response_of(query: str, prompt: str) -> str:
    """The response part of an OpenRLHF query (prompt + response).

    The query is the prompt's tokens decoded together with the response, so it usually
    starts with the prompt text; when detokenisation changed the prompt slightly, the text
    after the prompt's last occurrence is used, and failing that the whole query (the
    verifier takes the *last* final answer, which is the response's).
    """
    if prompt and query.startswith(prompt):
        return query[len(prompt) :]
    cut = query.rfind(prompt) if prompt else -1
    return query[cut + len(prompt) :] if cut >= 0 else query


def _golds(label: Any, i: int) -> tuple[str, ...]:
    if isinstance(label, str):
        return (label,)
    if isinstance(label, list | tuple) and all(isinstance(g, str) for g in label):
        return tuple(label)
    if isinstance(label, int | float) and not isinstance(label, bool):
        return (str(label),)
    raise ProtocolError(f"labels[{i}] must be a gold answer string or a list of them")


def items_from_request(
    queries: Sequence[Any],
    prompts: Sequence[Any],
    labels: Sequence[Any],
    *,
    answer_format: AnswerFormat = AnswerFormat.LATEX,
    reward_scheme: RewardScheme = RewardScheme.BINARY,
) -> list[ScoreItem]:
    """Score items for one OpenRLHF request.

    Raises:
        ProtocolError: The lists are not lists of strings of one length.
    """
    for name, value in (("query", queries), ("prompts", prompts), ("labels", labels)):
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{name!r} must be a list, got {type(value).__name__}")
    if not len(queries) == len(prompts) == len(labels):
        raise ProtocolError(
            f"'query', 'prompts' and 'labels' must have one length; got {len(queries)}, "
            f"{len(prompts)}, {len(labels)}"
        )
    items = []
    for i, (q, p, g) in enumerate(zip(queries, prompts, labels, strict=True)):
        if not isinstance(q, str) or not isinstance(p, str):
            raise ProtocolError(f"query[{i}] and prompts[{i}] must be strings")
        items.append(
            ScoreItem(
                id=str(i),
                response=response_of(q, p),
                golds=_golds(g, i),
                answer_format=answer_format,
                reward_scheme=reward_scheme,
            )
        )
    return items


def reply(results: Sequence[ScoreResult]) -> dict[str, Any]:
    """The reply OpenRLHF reads: ``rewards``, ``scores`` and numeric ``extra_logs``."""
    rewards = [r.reward for r in results]
    logs: dict[str, list[float]] = {
        "acc": [float(r.correct) for r in results],
        "overlong_penalty": [r.overlong_penalty for r in results],
    }
    for status, key in STATUS_KEYS.items():
        logs[key] = [float(r.status is status) for r in results]
    return {"rewards": rewards, "scores": list(rewards), "extra_logs": logs}
