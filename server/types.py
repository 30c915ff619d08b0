"""Plain records that flow between the reward service, its clients and its workers.

These are the project-wide, protobuf-free form of a scoring request and its result.
The gRPC client (``server.client``), the in-process worker pool (``server.pool``) and
every consumer (``fipo_env``, ``trainer``) speak these types, so a caller can swap a
remote reward server for an in-process one without touching its own code.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class AnswerFormat(enum.Enum):
    """How the final answer is written in the response and in the gold."""

    LATEX = "latex"
    """LaTeX, typically ``\\boxed{...}``; the last boxed / final answer is taken."""
    EXPR = "expr"
    """A plain expression or number (``3/4``, ``x^2+1``, ``0.5``)."""
    CHOICE = "choice"
    """A multiple-choice letter (``A``-``Z``)."""


class RewardScheme(enum.Enum):
    """How a verdict maps to a scalar reward."""

    BINARY = "binary"
    """1 for correct, 0 otherwise."""
    SIGNED = "signed"
    """+1 for correct, -1 otherwise (DAPO / FIPO)."""


class Status(enum.Enum):
    """Outcome of scoring one item. Mirrors ``fipo.v1.Status`` in the proto."""

    OK = "OK"
    """Verified correct."""
    WRONG = "WRONG"
    """An answer was extracted and it does not match any gold."""
    NO_ANSWER = "NO_ANSWER"
    """No answer could be extracted from the response."""
    GOLD_UNPARSABLE = "GOLD_UNPARSABLE"
    """None of the gold answers could be parsed; the item cannot be judged."""
    TIMEOUT = "TIMEOUT"
    """Verification did not finish within the item's deadline."""
    INPUT_TOO_LARGE = "INPUT_TOO_LARGE"
    """Response or gold exceeded a configured size limit."""
    INVALID = "INVALID"
    """The item is malformed (empty gold, NUL bytes, unknown enum, ...)."""
    INTERNAL = "INTERNAL"
    """An unexpected failure in the verifier (worker crash twice, bug)."""


@dataclass(frozen=True)
class ScoreItem:
    """One rollout to score.

    Attributes:
        id: Caller's identifier, echoed back unchanged in the result.
        response: The model's full response text.
        golds: One or more acceptable reference answers; any match counts as correct.
        answer_format: How answers are written (see ``AnswerFormat``).
        reward_scheme: Binary 0/1 or signed +-1.
        response_tokens: Number of tokens in the response, for the soft overlong
            penalty; ``None`` disables the penalty.
        max_response_tokens: ``L_max`` of DAPO's soft overlong penalty.
        overlong_buffer: ``L_buf`` of DAPO's soft overlong penalty; the penalty is
            0 up to ``L_max - L_buf`` tokens, then falls linearly to -1 at ``L_max``.
        deadline_s: Per-item verification deadline in seconds; ``None`` uses the
            server default.
    """

    id: str
    response: str
    golds: tuple[str, ...]
    answer_format: AnswerFormat = AnswerFormat.LATEX
    reward_scheme: RewardScheme = RewardScheme.BINARY
    response_tokens: int | None = None
    max_response_tokens: int | None = None
    overlong_buffer: int | None = None
    deadline_s: float | None = None


@dataclass(frozen=True)
class ScoreResult:
    """The verdict on one ``ScoreItem``.

    Attributes:
        id: The item's ``id``.
        reward: Final reward: verdict reward (per scheme) plus ``overlong_penalty``.
        correct: Whether the response matched a gold answer.
        status: Outcome category (see ``Status``).
        extracted_prediction: The answer extracted from the response, as a string.
        extracted_gold: The parsed gold answer, as a string.
        overlong_penalty: The soft overlong penalty added to the reward (<= 0).
        latency_ms: Time spent scoring the item, queueing included.
        message: Human-readable detail for non-OK/WRONG statuses.
        flags: Extra notes, e.g. ``("known_verifier_issue",)``.
    """

    id: str
    reward: float
    correct: bool
    status: Status
    extracted_prediction: str = ""
    extracted_gold: str = ""
    overlong_penalty: float = 0.0
    latency_ms: float = 0.0
    message: str = ""
    flags: tuple[str, ...] = field(default_factory=tuple)


class Scorer(Protocol):
    """Anything that scores a batch of items, in order: the gRPC client or a local pool."""

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Score ``items`` and return one result per item, in the same order."""
        ...


@dataclass(frozen=True)
class Verdict:
    """A worker's judgement of one item, before rewards.

    Attributes:
        status: OK, WRONG, NO_ANSWER, GOLD_UNPARSABLE, TIMEOUT or INTERNAL.
        prediction: Extracted answer string (truncated).
        gold: Parsed gold answer string (truncated).
        message: Detail for non-OK/WRONG statuses.
        flags: Notes such as ``exact_recheck_overturned``.
        stages_ms: Milliseconds per stage: ``gold_parse``, ``pred_parse``, ``compare``.
        gold_cache_hit: Whether every gold came from the gold cache.
    """

    status: Status
    prediction: str = ""
    gold: str = ""
    message: str = ""
    flags: tuple[str, ...] = ()
    stages_ms: dict[str, float] = field(default_factory=dict)
    gold_cache_hit: bool = False
