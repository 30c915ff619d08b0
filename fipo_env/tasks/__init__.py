"""Problem sources for the environments: built-in arithmetic, reasoning-gym, files.

``make_task(spec)`` turns a short string into a task, so configs and the command line can
name one: ``"arithmetic"``, ``"arithmetic:0,1"``, ``"reasoning_gym:basic_arithmetic"``,
``"file:/data/gsm8k.jsonl"``.
"""

from __future__ import annotations

from typing import Any

from fipo_env.tasks.arithmetic import ArithmeticTask
from fipo_env.tasks.files import file_task, load_problems
from fipo_env.tasks.rgym import ReasoningGymTask
from fipo_env.tasks.types import (
    ListTask,
    Problem,
    Task,
    hash_unit,
    sample_problems,
    split_of,
)

__all__ = [
    "ArithmeticTask",
    "ListTask",
    "Problem",
    "ReasoningGymTask",
    "Task",
    "file_task",
    "hash_unit",
    "load_problems",
    "make_task",
    "sample_problems",
    "split_of",
]


def make_task(
    spec: str | Task, *, split: str = "train", eval_fraction: float = 0.1, **kwargs: Any
) -> Task:
    """Build a task from a spec string (or return a task object unchanged).

    Args:
        spec: ``"arithmetic"`` (level 0), ``"arithmetic:<levels>"`` with comma-separated
            levels, ``"reasoning_gym:<dataset>"`` or ``"file:<path>"``.
        split: ``"train"``, ``"eval"`` or ``"all"``.
        eval_fraction: Share of problems (by canonical hash) reserved for eval.
        **kwargs: Passed to the task's constructor.

    Raises:
        ValueError: Unknown spec kind or bad levels.
    """
    if not isinstance(spec, str):
        if not isinstance(spec, Task):
            raise TypeError(
                f"task must be a spec string or have .sample(rng) and .name, got {spec!r}"
            )
        return spec
    kind, _, arg = spec.partition(":")
    if kind == "arithmetic":
        try:
            levels = tuple(int(x) for x in arg.split(",")) if arg else (0,)
        except ValueError:
            raise ValueError(
                f"bad arithmetic levels in task spec {spec!r}; e.g. 'arithmetic:0,1'"
            ) from None
        return ArithmeticTask(levels, split=split, eval_fraction=eval_fraction, **kwargs)
    if kind == "reasoning_gym" and arg:
        return ReasoningGymTask(arg, split=split, eval_fraction=eval_fraction, **kwargs)
    if kind == "file" and arg:
        return file_task(arg, split=split, eval_fraction=eval_fraction, **kwargs)
    raise ValueError(
        f"unknown task spec {spec!r}: use 'arithmetic[:levels]', 'reasoning_gym:<name>' or 'file:<path>'"
    )
