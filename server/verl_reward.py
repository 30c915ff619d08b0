"""verl custom reward functions that score through the reward server (verl 0.9.1).

verl loads a reward function from ``reward.custom_reward_function.path`` (a file path or
``pkg://server.verl_reward``) and ``.name``, and passes
``reward.custom_reward_function.reward_kwargs`` as extra keyword arguments:

- ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)``: one
  response, for the reward loop's managers (``naive``, ``dapo``, ``remote``), the path
  verl 0.9.1's PPO trainer takes;
- ``compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos=None,
  **kwargs)``: a whole batch in one ``Score`` RPC, for verl's ``BatchRewardManager``
  (``verl.workers.reward_manager``: the legacy path and custom pipelines).

Keyword arguments (all optional): ``address`` (else ``$FIPO_REWARD_ADDRESS``, default
``127.0.0.1:50051``), ``token`` (else ``$FIPO_REWARD_TOKEN``), ``answer_format``
(``latex``, ``expr``, ``choice``; an item's ``extra_info["answer_format"]`` wins) and
``reward_scheme`` (``binary`` or ``signed``). ``ground_truth`` is one gold or a list of
golds.

Each score is a dict: ``score`` (the reward), ``acc`` (1.0 when correct), ``status`` (the
status name), ``flags`` (comma-separated), ``pred`` (the extracted answer),
``overlong_penalty`` and one ``status_<name>`` (0/1) per status, the same keys for every
response, so verl's reward-extra-info metrics show the share of each status.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import server  # noqa: F401  (installed, or already on sys.path)
except ImportError:  # verl loaded this file by path from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.env_client import parse_enum, shared_client
from server.openrlhf import STATUS_KEYS
from server.types import AnswerFormat, RewardScheme, ScoreItem, ScoreResult


def _golds(ground_truth: Any) -> tuple[str, ...]:
    if isinstance(ground_truth, str):
        return (ground_truth,)
    if isinstance(ground_truth, Sequence) or hasattr(ground_truth, "tolist"):
        values = ground_truth.tolist() if hasattr(ground_truth, "tolist") else ground_truth
        return tuple(str(g) for g in values)
    if ground_truth is None:
        raise ValueError("ground_truth is None: the dataset row has no reward_model.ground_truth")
    return (str(ground_truth),)


def _item(i: int, solution: str, ground_truth: Any, extra: Any, kwargs: dict) -> ScoreItem:
    fmt = (extra or {}).get("answer_format") if isinstance(extra, dict) else None
    return ScoreItem(
        id=str(i),
        response=solution,
        golds=_golds(ground_truth),
        answer_format=parse_enum(
            AnswerFormat, fmt or kwargs.get("answer_format", "latex"), "answer_format"
        ),
        reward_scheme=parse_enum(
            RewardScheme, kwargs.get("reward_scheme", "binary"), "reward_scheme"
        ),
    )


def score_dict(result: ScoreResult) -> dict[str, Any]:
    """A ``ScoreResult`` as verl's score dict (same keys for every result)."""
    out: dict[str, Any] = {
        "score": result.reward,
        "acc": float(result.correct),
        "status": result.status.value,
        "flags": ",".join(result.flags),
        "pred": result.extracted_prediction,
        "overlong_penalty": result.overlong_penalty,
    }
    for status, key in STATUS_KEYS.items():
        out[key] = float(result.status is status)
    return out


def _score(items: list[ScoreItem], kwargs: dict) -> list[dict[str, Any]]:
    client = shared_client(kwargs.get("address"), kwargs.get("token"))
    return [score_dict(r) for r in client.score(items)]


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Score one response (verl's per-sample reward function signature).

    Raises:
        server.client.RewardError: The server could not be reached or refused the call.
    """
    return _score([_item(0, solution_str, ground_truth, extra_info, kwargs)], kwargs)[0]


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[dict] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Score a batch in one RPC (verl's ``batch`` reward manager signature)."""
    n = len(solution_strs)
    if len(ground_truths) != n:
        raise ValueError(f"{n} solution_strs but {len(ground_truths)} ground_truths")
    extras = list(extra_infos) if extra_infos is not None else [None] * n
    items = [
        _item(i, s, g, e, kwargs)
        for i, (s, g, e) in enumerate(zip(solution_strs, ground_truths, extras, strict=True))
    ]
    return _score(items, kwargs)
