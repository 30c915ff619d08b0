"""Load problems from JSONL / JSON / Parquet files and Hugging Face ``datasets`` folders.

Column layouts handled (auto-detected, or named explicitly):

- MATH style: ``problem`` + ``solution`` (the gold is the last ``\\boxed{...}`` of the
  solution) or ``problem`` + ``answer``.
- GSM8K style: ``question`` + ``answer`` (the gold is what follows the last ``####``).
- DAPO-Math-17k style: ``prompt`` (a string or a list of chat messages; the last user
  message is taken) + ``answer`` or ``reward_model`` (``{"ground_truth": ...}``).

Nothing is downloaded: paths must exist locally. Heavy readers (``pyarrow``,
``datasets``) are imported only when a file of that kind is read.

Rows are numbered from 1 in every message and in ``Problem.meta["row"]``; in a JSON-lines
file a row's number is its line number (blank lines count as lines, so an editor's line
number finds it). Messages name the full path.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from fipo_env.tasks.types import ListTask, Problem, check_split, in_split
from server.pysyntax import last_boxed_span
from server.types import AnswerFormat

PROBLEM_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "ground_truth", "reward_model", "solution")

_GSM8K_NUMBER = re.compile(r"^-?[\d,]*\.?\d+$")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Returns ``None`` when there is none or its braces never close.
    """
    span = last_boxed_span(text, ("\\boxed", "\\fbox"))
    return None if span is None else text[span[0] : span[1]].strip()


def extract_gold(value: Any, column: str) -> tuple[str, ...]:
    """Turn a raw answer cell into gold strings.

    Args:
        value: The cell: a string, a number, a list of either, or a ``reward_model`` dict.
        column: The column's name (``solution`` cells are reduced to their last box).

    Returns:
        One or more non-empty gold strings; empty when nothing usable was found.
    """
    if isinstance(value, Mapping):
        value = value.get("ground_truth", value.get("answer"))
    if value is None:
        return ()
    if isinstance(value, bool):
        return ()
    if isinstance(value, int | float):
        return (repr(value) if isinstance(value, float) else str(value),)
    if isinstance(value, list | tuple):
        out: list[str] = []
        for v in value:
            out.extend(extract_gold(v, column))
        return tuple(out)
    if not isinstance(value, str):
        return ()
    text = value.strip()
    if "####" in text:  # GSM8K: reasoning, then "#### 72"
        text = text.rsplit("####", 1)[1].strip()
        if _GSM8K_NUMBER.match(text):
            text = text.replace(",", "")
    elif column == "solution" or (len(text) > 40 and "\\boxed" in text):
        boxed = last_boxed(text)
        if boxed is None:
            return ()
        text = boxed
    return (text,) if text else ()


def extract_question(value: Any) -> str | None:
    """Turn a raw problem cell (string or chat-message list) into the question text."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list | tuple):
        users = [
            m.get("content")
            for m in value
            if isinstance(m, Mapping) and m.get("role", "user") == "user"
        ]
        if users and isinstance(users[-1], str) and users[-1].strip():
            return users[-1].strip()
    return None


def canonical_question(text: str) -> str:
    """Whitespace- and case-normalised question, the split / de-duplication key."""
    return "file:" + " ".join(text.split()).lower()


class BadRow(NamedTuple):
    """A row that could not be read as an object (e.g. an invalid JSON line)."""

    reason: str


def read_rows(path: str | Path, hf_split: str | None = None) -> Iterable[Mapping[str, Any]]:
    """Yield the rows of a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.arrow`` file or a
    ``datasets.save_to_disk`` folder, as mappings.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Unknown file type or malformed JSON (the path and row are named).
    """
    for n, row in numbered_rows(path, hf_split):
        if isinstance(row, BadRow):
            raise ValueError(f"{Path(path)} row {n}: {row.reason}")
        yield row


def numbered_rows(
    path: str | Path, hf_split: str | None = None
) -> Iterator[tuple[int, Mapping[str, Any] | BadRow]]:
    """Yield ``(row number from 1, row)``; a row that is not an object comes as ``BadRow``.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: Unknown file type, a DatasetDict without ``hf_split``, or a ``.json``
            file that is neither a list of rows nor JSON lines.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"problem file not found: {p}")
    if p.is_dir():
        import datasets  # optional; only for save_to_disk folders

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if hf_split is None:
                if len(ds) != 1:
                    raise ValueError(f"{p} holds splits {sorted(ds)}; pass hf_split= to choose one")
                hf_split = next(iter(ds))
            if hf_split not in ds:
                raise ValueError(f"{p} has no split {hf_split!r}; it has {sorted(ds)}")
            ds = ds[hf_split]
        return _objects(ds)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(p)  # many ".json" dumps are really JSON lines
        if isinstance(data, Mapping):  # {"data": [...]} or column-oriented dicts
            data = data.get("data", data.get("rows", data))
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of rows or JSON lines")
        return _objects(data)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # optional

        return _objects(pq.read_table(p).to_pylist())
    if suffix == ".arrow":
        import datasets  # optional

        return _objects(datasets.Dataset.from_file(str(p)))
    raise ValueError(f"{p}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, .arrow)")


def _objects(rows: Iterable[Any]) -> Iterator[tuple[int, Mapping[str, Any] | BadRow]]:
    for n, row in enumerate(rows, 1):
        if isinstance(row, Mapping):
            yield n, row
        else:
            yield n, BadRow(f"expected an object, got {type(row).__name__}")


def _read_jsonl(p: Path) -> Iterator[tuple[int, Mapping[str, Any] | BadRow]]:
    with p.open("rb") as f:  # decoded line by line: one undecodable line is one bad row
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadRow(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, BadRow(f"invalid JSON ({e.msg})")
                continue
            if not isinstance(row, Mapping):
                yield lineno, BadRow("each line must be a JSON object")
                continue
            yield lineno, row


def _pick(row: Mapping[str, Any], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit if explicit in row else None
    return next((k for k in candidates if k in row), None)


def load_problems(
    path: str | Path,
    *,
    problem_key: str | None = None,
    answer_key: str | None = None,
    answer_format: AnswerFormat = AnswerFormat.LATEX,
    split: str = "all",
    eval_fraction: float = 0.1,
    hf_split: str | None = None,
    on_bad_row: str = "error",
    deduplicate: bool = True,
) -> list[Problem]:
    """Read problems from a file or ``datasets`` folder.

    Args:
        path: ``.jsonl``, ``.json``, ``.parquet``, ``.arrow`` or a ``save_to_disk`` folder.
        problem_key: Column with the question; default: first of ``problem``,
            ``question``, ``prompt`` present in the row.
        answer_key: Column with the gold; default: first of ``answer``,
            ``ground_truth``, ``reward_model``, ``solution`` present.
        answer_format: Answer format recorded on every problem.
        split: ``"all"``, or the hash split ``"train"`` / ``"eval"`` of the problems.
        eval_fraction: Share of the hash space that is ``eval``.
        hf_split: Which split of a ``DatasetDict`` folder to read.
        on_bad_row: ``"error"`` (default) raises naming the file, row and column;
            ``"skip"`` drops rows that are not valid JSON objects or have no usable
            question or answer, and warns once with how many were skipped.
        deduplicate: Keep one problem per canonical question.

    Returns:
        The problems, in file order.

    Raises:
        ValueError: A bad row (with ``on_bad_row="error"``), or an unreadable file.
    """
    check_split(split, eval_fraction)
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    name = Path(path).name
    out: list[Problem] = []
    seen: set[str] = set()
    skipped: list[str] = []
    for n, row in numbered_rows(path, hf_split):
        problem = None if isinstance(row, BadRow) else _problem(row, problem_key, answer_key)
        if isinstance(problem, str) or isinstance(row, BadRow):
            reason = row.reason if isinstance(row, BadRow) else problem
            if on_bad_row == "error":
                raise ValueError(f"{Path(path)} row {n}: {reason}")
            skipped.append(f"row {n}: {reason}")
            continue
        question, golds = problem
        canonical = canonical_question(question)
        if deduplicate:
            if canonical in seen:
                continue
            seen.add(canonical)
        if not in_split(canonical, split, eval_fraction):
            continue
        out.append(
            Problem(
                question=question,
                golds=golds,
                canonical=canonical,
                answer_format=answer_format,
                source=f"file/{name}",
                meta={"row": n},
            )
        )
    if skipped:
        warnings.warn(
            f"{Path(path)}: skipped {len(skipped)} bad row(s) (on_bad_row='skip'); first: "
            f"{skipped[0]}",
            stacklevel=2,
        )
    return out


def _problem(
    row: Mapping[str, Any], problem_key: str | None, answer_key: str | None
) -> tuple[str, tuple[str, ...]] | str:
    """``(question, golds)`` of a row, or what is wrong with it."""
    pk = _pick(row, problem_key, PROBLEM_KEYS)
    ak = _pick(row, answer_key, ANSWER_KEYS)
    question = extract_question(row[pk]) if pk else None
    golds = extract_gold(row[ak], ak) if ak else ()
    if question is not None and golds:
        return question, golds
    what = (
        f"no question column (looked for {problem_key or PROBLEM_KEYS})"
        if pk is None
        else f"no answer column (looked for {answer_key or ANSWER_KEYS})"
        if ak is None
        else f"empty or unusable question in column {pk!r}"
        if question is None
        else f"no usable gold answer in column {ak!r}"
    )
    return f"{what}; columns are {sorted(row)}"


def file_task(path: str | Path, **kwargs: Any) -> ListTask:
    """A ``ListTask`` over ``load_problems(path, **kwargs)``; errors if the split is empty."""
    problems = load_problems(path, **kwargs)
    return ListTask(problems, name=f"file/{Path(path).name}/{kwargs.get('split', 'all')}")
