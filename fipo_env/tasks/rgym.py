"""Adapter for ``reasoning-gym`` procedural generators (``pip install reasoning-gym``).

reasoning-gym datasets are indexable and deterministic for a ``(seed, index)`` pair, so a
draw is: pick an index with the caller's generator, read the entry, keep it if its
canonical question falls in the requested hash split. Rewards go through our math
verifier, so only generators with mathematical answers fit (``basic_arithmetic``,
``chain_sum``, ``simple_equations``, ``fraction_simplification``, ``decimal_arithmetic``,
``polynomial_equations``, ...); the dataset's own ``score_answer`` is not used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fipo_env.tasks.types import Problem, check_split, in_split
from server.types import AnswerFormat


class ReasoningGymTask:
    """Problems from one ``reasoning_gym.create_dataset(name, ...)`` generator.

    Args:
        dataset: The generator's registered name, e.g. ``"basic_arithmetic"``.
        size: Number of indices to draw from (the dataset's ``size``).
        seed: The dataset's seed; with ``size`` it fixes the problem pool.
        split: ``"train"``, ``"eval"`` or ``"all"`` (hash split on the question text).
        eval_fraction: Share of the hash space that is ``eval``.
        answer_format: Answer format recorded on the problems.
        max_attempts: Draws tried to find a problem of the split before failing.
        **config: Extra generator settings passed to ``create_dataset`` (e.g.
            ``min_terms=2``).
    """

    def __init__(
        self,
        dataset: str,
        *,
        size: int = 10_000,
        seed: int = 0,
        split: str = "train",
        eval_fraction: float = 0.1,
        answer_format: AnswerFormat = AnswerFormat.LATEX,
        max_attempts: int = 1_000,
        **config: Any,
    ) -> None:
        check_split(split, eval_fraction)
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        import reasoning_gym  # optional dependency, imported only by this adapter

        try:
            self._ds = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)
        except Exception as e:  # unknown name or bad config: say which
            raise ValueError(f"reasoning-gym could not create {dataset!r}: {e}") from e
        self.dataset = dataset
        self.size = size
        self.split = split
        self.eval_fraction = float(eval_fraction)
        self.answer_format = answer_format
        self.max_attempts = max_attempts
        self.name = f"reasoning_gym/{dataset}/{split}"

    def sample(self, rng: np.random.Generator) -> Problem:
        """Draw one problem of this task's split."""
        for _ in range(self.max_attempts):
            idx = int(rng.integers(self.size))
            entry = self._ds[idx]
            question = str(entry["question"]).strip()
            canonical = f"rg:{self.dataset}:" + " ".join(question.split()).lower()
            if not in_split(canonical, self.split, self.eval_fraction):
                continue
            answer = entry.get("answer")
            if answer is None or not str(answer).strip():
                continue  # a generator may emit entries without a checkable answer
            return Problem(
                question=question,
                golds=(str(answer).strip(),),
                canonical=canonical,
                answer_format=self.answer_format,
                source=f"reasoning_gym/{self.dataset}",
                meta={"index": idx},
            )
        raise ValueError(
            f"no {self.split!r} problem with an answer found in {self.max_attempts} draws from "
            f"reasoning-gym {self.dataset!r} (size={self.size}, eval_fraction={self.eval_fraction})"
        )
