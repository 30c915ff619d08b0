"""Problem records, the ``Task`` protocol and the hash-based train / eval split.

Every problem source (the built-in arithmetic generator, ``reasoning-gym`` generators,
JSONL / Parquet / ``datasets`` files) produces the same frozen ``Problem`` record, so the
environments never care where a problem came from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from server.types import AnswerFormat

Split = Literal["train", "eval", "all"]
SPLITS: tuple[str, ...] = ("train", "eval", "all")


@dataclass(frozen=True)
class Problem:
    """One math problem with its exact reference answer(s).

    Attributes:
        question: The text shown to the model (inserted into the prompt template).
        golds: One or more acceptable reference answers; any match counts as correct.
        canonical: A normalised key that identifies the problem independently of its
            wording; the train / eval split and de-duplication hash this string.
        answer_format: How the gold (and the expected final answer) is written.
        source: Where the problem came from, e.g. ``"arithmetic/level2"``.
        meta: Free-form extra fields (difficulty level, dataset row, ...).
    """

    question: str
    golds: tuple[str, ...]
    canonical: str
    answer_format: AnswerFormat = AnswerFormat.LATEX
    source: str = ""
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"Problem.question must be a non-empty string, got {self.question!r}")
        if isinstance(self.golds, str) or not self.golds:
            raise ValueError(
                f"Problem.golds must be a non-empty tuple of strings, got {self.golds!r}"
            )
        if not all(isinstance(g, str) and g.strip() for g in self.golds):
            raise ValueError(f"Problem.golds must hold non-empty strings, got {self.golds!r}")
        if not isinstance(self.canonical, str) or not self.canonical:
            raise ValueError("Problem.canonical must be a non-empty string")

    @property
    def gold(self) -> str:
        """The first (preferred) gold answer."""
        return self.golds[0]


@runtime_checkable
class Task(Protocol):
    """A source of problems. ``sample`` must be a pure function of the generator state."""

    name: str

    def sample(self, rng: np.random.Generator) -> Problem:
        """Draw one problem using ``rng`` (and nothing else) for randomness."""
        ...


def hash_unit(canonical: str) -> float:
    """Map a canonical problem key to a uniform number in ``[0, 1)``, stable across runs.

    Python's ``hash`` is salted per process, so a keyed cryptographic digest is used.
    """
    digest = hashlib.blake2b(
        canonical.encode("utf-8"), digest_size=8, person=b"fipo-split"
    ).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of(canonical: str, eval_fraction: float) -> Literal["train", "eval"]:
    """The split a problem belongs to: a fixed ``eval_fraction`` of the hash space is eval.

    Because the split is a function of the canonical problem alone, a problem can never be
    in both splits, however it is worded or whichever seed drew it.
    """
    return "eval" if hash_unit(canonical) < eval_fraction else "train"


def check_split(split: str, eval_fraction: float) -> None:
    """Validate a split name and eval fraction, with a message naming the bad value."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction!r}")


def in_split(canonical: str, split: str, eval_fraction: float) -> bool:
    """Whether the problem with this canonical key belongs to ``split``."""
    return split == "all" or split_of(canonical, eval_fraction) == split


class ListTask:
    """A finite task over a fixed list of problems, sampled uniformly with replacement.

    Args:
        problems: The problems; must be non-empty.
        name: A name for logs and ``Problem.source`` of derived records.
    """

    def __init__(self, problems: Sequence[Problem], name: str = "list") -> None:
        if len(problems) == 0:
            raise ValueError(f"task {name!r} has no problems (empty file or empty split?)")
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.name = name

    def __len__(self) -> int:
        return len(self.problems)

    def sample(self, rng: np.random.Generator) -> Problem:
        return self.problems[int(rng.integers(len(self.problems)))]


def sample_problems(
    task: Task, n: int, seed: int, *, distinct: bool = True, max_attempts: int | None = None
) -> list[Problem]:
    """Draw ``n`` problems from ``task`` deterministically (e.g. a fixed eval set).

    Args:
        task: The problem source.
        n: How many problems to return.
        seed: Seed of the generator used for the draws.
        distinct: Keep only the first occurrence of each canonical problem.
        max_attempts: Give up after this many draws (default ``50 * n + 1000``) with an
            error saying how many distinct problems were found, rather than loop forever
            on a task that has fewer than ``n``.

    Returns:
        ``n`` problems in draw order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    limit = max_attempts if max_attempts is not None else 50 * n + 1000
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        if attempts >= limit:
            raise ValueError(
                f"task {task.name!r} gave only {len(out)} distinct problems in {attempts} draws "
                f"(asked for {n}); use a larger level range, eval_fraction or dataset"
            )
        attempts += 1
        p = task.sample(rng)
        if distinct:
            if p.canonical in seen:
                continue
            seen.add(p.canonical)
        out.append(p)
    return out
