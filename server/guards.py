"""Cheap checks on an item before anything parses it.

Hostile inputs -- megabyte strings, NUL bytes, broken UTF-8, thousands of nested braces,
exponent towers, huge factorials or powers -- can make sympy run for minutes or hold the GIL
in bigint arithmetic. These checks refuse them with a clear message in microseconds: they
are linear scans driven by ``str.find`` / compiled regexes and look only at the characters
that matter (brackets, ``^``, ``!``, digit runs), so a 10k-character chain of thought costs
tens of microseconds. They run in the supervisor before an item is queued, so a refused item
never reaches a worker.
"""

from __future__ import annotations

import math
import re

from server.config import Limits
from server.types import ScoreItem, Status

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}()[]")
_ONE_BRACKET_KIND = bytes.maketrans(b"{[]}", b"(())")
_DIGITS_TO_ONES = bytes(ord("1") if ord("0") <= b <= ord("9") else ord(" ") for b in range(256))
_GROUP_FACTORIAL = re.compile(r"[)}]\s*!")
_INT = re.compile(r"[+-]?\d+")
_BASE_NUM = re.compile(r"(\d+)\s*\}?\s*$")
# Carets that cannot build a large power or a tower, recognised in C so the Python scan only
# visits the others: a one-character exponent (x^2, e^{x}), or an exponent of at most three
# digits on a base that is not a number of more than 20 digits (2^{10}, x^{100}, \sum^{10}).
# (A bracketed base such as {10^{400}}^{999} is not sized here -- nor by the full scan; the
# worker's deadline covers what slips through.)
_SIMPLE_POWER = re.compile(  # starts with a literal caret, so the engine skips to carets fast
    r"\^(?:\s*\{\s*-?[A-Za-z0-9]\s*\}|\s*-?[A-Za-z0-9](?![0-9^{])"
    r"|(?<![0-9]{21}\^)(?<!\s\^)\s*(?:\{\s*-?[0-9]{1,3}\s*\}|-?[0-9]{1,3}(?![0-9^{.])))"
)
_CLOSE_FOR = {"{": "}", "(": ")", "[": "]"}

Rejection = tuple[Status, str]


def check_item(item: ScoreItem, limits: Limits) -> Rejection | None:
    """Validate an item's fields and look for hostile shapes.

    Args:
        item: The item to check.
        limits: Size and shape limits.

    Returns:
        ``None`` when the item may be verified, else ``(status, message)``: INVALID for
        malformed items, INPUT_TOO_LARGE for oversized or hostile ones.
    """
    if not isinstance(item.response, str):
        return Status.INVALID, "response must be a string"
    if not item.golds:
        return Status.INVALID, "item has no gold answer (golds is empty)"
    if len(item.golds) > limits.max_golds:
        return (
            Status.INVALID,
            f"item has {len(item.golds)} gold answers; limit is {limits.max_golds}",
        )
    if len(item.response) > limits.max_response_chars:
        return (
            Status.INPUT_TOO_LARGE,
            f"response has {len(item.response)} characters; limit is {limits.max_response_chars}",
        )
    for i, gold in enumerate(item.golds):
        if not isinstance(gold, str):
            return Status.INVALID, f"gold[{i}] must be a string"
        if len(gold) > limits.max_gold_chars:
            return (
                Status.INPUT_TOO_LARGE,
                f"gold[{i}] has {len(gold)} characters; limit is {limits.max_gold_chars}",
            )
    # Any gold matching counts, so an empty gold beside real ones is just one that never
    # matches (the verifier cannot parse it); only an item with no real gold is malformed.
    if not any(gold.strip() for gold in item.golds):
        return Status.INVALID, f"every gold answer is empty (golds={item.golds!r})"
    bad = _check_fields(item)
    if bad:
        return Status.INVALID, bad
    for name, text in (
        ("response", item.response),
        *((f"gold[{i}]", g) for i, g in enumerate(item.golds)),
    ):
        rej = check_text(text, limits, name)
        if rej:
            return rej
    return None


def _check_fields(item: ScoreItem) -> str | None:
    if item.deadline_s is not None and not (
        math.isfinite(item.deadline_s) and item.deadline_s >= 0
    ):
        return f"deadline_s must be a non-negative number, got {item.deadline_s!r}"
    for name in ("response_tokens", "max_response_tokens", "overlong_buffer"):
        v = getattr(item, name)
        if v is not None and (not isinstance(v, int) or v < 0):
            return f"{name} must be a non-negative integer, got {v!r}"
    if (
        item.max_response_tokens is not None
        and item.overlong_buffer is not None
        and item.overlong_buffer > item.max_response_tokens
    ):
        return (
            f"overlong_buffer ({item.overlong_buffer}) must not exceed "
            f"max_response_tokens ({item.max_response_tokens})"
        )
    return None


def check_text(text: str, limits: Limits, name: str = "text") -> Rejection | None:
    """Check one string (response or gold) for malformed or hostile content.

    Args:
        text: The string.
        limits: Shape limits.
        name: What the string is, for the message.

    Returns:
        ``None`` if acceptable, else ``(status, message)``.
    """
    if "\x00" in text:
        return Status.INVALID, f"{name} contains a NUL byte at offset {text.index(chr(0))}"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as e:
        return Status.INVALID, f"{name} is not valid UTF-8 (lone surrogate at offset {e.start})"
    # Python's regex engine costs ~20 ns per position on these patterns, too much for a 10k
    # chain of thought; bytes.translate + find run in C at ~1 ns per byte.
    if _max_depth(raw, limits.max_nesting) > limits.max_nesting:
        return (
            Status.INPUT_TOO_LARGE,
            f"{name} nests brackets deeper than {limits.max_nesting} levels",
        )
    if b"1" * (limits.max_digits + 1) in raw.translate(_DIGITS_TO_ONES):
        return (
            Status.INPUT_TOO_LARGE,
            f"{name} contains a number longer than {limits.max_digits} digits",
        )
    pos = text.find("!")
    while pos != -1:
        start = end = pos
        while end > 0 and text[end - 1] == " ":
            end -= 1
        start = end
        while start > 0 and "0" <= text[start - 1] <= "9":
            start -= 1
        if start < end and int(text[start:end]) > limits.max_factorial:
            return (
                Status.INPUT_TOO_LARGE,
                f"{name} contains {text[start:end]}!, larger than the factorial limit {limits.max_factorial}!",
            )
        pos = text.find("!", pos + 1)
    if "!" in text and _GROUP_FACTORIAL.search(text) and _nested_factorial(text):
        return Status.INPUT_TOO_LARGE, f"{name} contains a factorial of a factorial or power"
    if "**" in text:
        text = text.replace("**", "^")
    if "^" in text:
        simple = {m.start() for m in _SIMPLE_POWER.finditer(text)}
        if text.count("^") != len(simple):
            return _check_powers(text, limits, name, simple)
    return None


def _max_depth(raw: bytes, limit: int) -> int:
    """Bracket nesting depth of ``raw`` (all bracket kinds alike), capped just past ``limit``.

    Each pass of ``bytes.replace`` deletes every innermost ``()`` pair, so the number of passes
    is the depth of the balanced part; brackets left unclosed count on top. All in C.
    """
    s = raw.translate(_ONE_BRACKET_KIND, _NOT_BRACKETS)
    if len(s) <= limit:  # cannot nest deeper than the number of brackets
        return 0
    depth = 0
    while depth <= limit:
        shorter = s.replace(b"()", b"")
        if len(shorter) == len(s):
            break
        s = shorter
        depth += 1
    return depth + s.count(b"(")


def _nested_factorial(text: str) -> bool:
    """True when a bracketed group followed by ``!`` contains ``!`` or ``^`` (``(100!)!``)."""
    for m in _GROUP_FACTORIAL.finditer(text):
        close = m.start()
        group = _group_before(text, close)
        if group is not None and ("!" in group or "^" in group):
            return True
    return False


def _group_before(text: str, close: int) -> str | None:
    """The content of the bracket group that ends at ``text[close]``."""
    closer = text[close]
    opener = "(" if closer == ")" else "{"
    depth = 0
    for i in range(close, max(-1, close - 10_000), -1):
        c = text[i]
        if c == closer:
            depth += 1
        elif c == opener:
            depth -= 1
            if depth == 0:
                return text[i + 1 : close]
    return None


def _exponent_at(text: str, caret: int) -> tuple[str, int]:
    """The exponent after the ``^`` at ``caret`` and the index just past it."""
    i = caret + 1
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return "", i
    c = text[i]
    if c in _CLOSE_FOR:
        depth = 0
        for j in range(i, min(n, i + 10_000)):
            if text[j] == c:
                depth += 1
            elif text[j] == _CLOSE_FOR[c]:
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j], j + 1
        return text[i + 1 :], n
    m = _INT.match(text, i)
    if m:
        # Unbraced numeric exponent; in plain expressions `9^9^9` chains to the right.
        end = m.end()
        while end < n and text[end] == " ":
            end += 1
        if end < n and text[end] == "^":
            inner, stop = _exponent_at(text, end)
            return text[i:end] + "^{" + inner + "}", stop
        return m.group(), m.end()
    return c, i + 1


def _height(expr: str, budget: list[int]) -> int:
    """Height of the tallest power tower in ``expr`` (0 when it has no ``^``)."""
    best = 0
    pos = expr.find("^")
    while pos != -1 and budget[0] > 0:
        budget[0] -= 1
        exp, stop = _exponent_at(expr, pos)
        best = max(best, 1 + _height(exp, budget))
        pos = expr.find("^", max(stop, pos + 1))
    return best


def _numeric_log10(expr: str) -> float | None:
    """log10 of |value| when ``expr`` is an integer or an integer power tower, else None."""
    s = expr.strip().lstrip("+-").strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    m = re.fullmatch(r"(\d+)\s*(?:\^\s*(.*))?", s, re.DOTALL)
    if not m:
        return None
    base = int(m.group(1)) if len(m.group(1)) < 30 else 10**29
    if m.group(2) is None:
        return math.log10(base) if base > 0 else 0.0
    exp_text = m.group(2).strip()
    if exp_text.startswith("{") and exp_text.endswith("}"):
        exp_text = exp_text[1:-1]
    exp_log = _numeric_log10(exp_text)
    if exp_log is None or base <= 1:
        return None if exp_log is None else 0.0
    if exp_log > 300:
        return math.inf
    return (10**exp_log) * math.log10(base)


def _check_powers(text: str, limits: Limits, name: str, simple: set[int]) -> Rejection | None:
    budget = [10_000]  # bounds the work on texts with very many carets
    pos = text.find("^")
    while pos != -1:
        if pos in simple:
            pos = text.find("^", pos + 1)
            continue
        exp, stop = _exponent_at(text, pos)
        height = 1 + _height(exp, budget)
        if height > limits.max_tower_height:
            return (
                Status.INPUT_TOO_LARGE,
                f"{name} contains an exponent tower of height {height} (limit {limits.max_tower_height})",
            )
        exp_log = _numeric_log10(exp)
        if exp_log is not None:
            if exp_log > math.log10(limits.max_exponent):
                return (
                    Status.INPUT_TOO_LARGE,
                    f"{name} contains an exponent larger than {limits.max_exponent}",
                )
            m = _BASE_NUM.search(text, max(0, pos - 40), pos)
            if m:
                base = int(m.group(1)) if len(m.group(1)) < 30 else 10**29
                if base > 1 and (10**exp_log) * math.log10(base) > limits.max_power_digits:
                    return (
                        Status.INPUT_TOO_LARGE,
                        f"{name} contains a power with more than {limits.max_power_digits} digits",
                    )
        if budget[0] <= 0:
            return Status.INPUT_TOO_LARGE, f"{name} contains too many exponents to check"
        pos = text.find("^", max(stop, pos + 1))
    return None
