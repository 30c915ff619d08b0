"""The math-verify adapter that runs inside worker processes (the only module importing it).

``Verifier.check(item)`` turns one ``ScoreItem`` into a ``Verdict``: the status, the extracted
prediction and gold as strings, flags and per-stage timings. It never computes rewards (the
supervisor does, so cached verdicts serve any reward scheme) and never runs in the server
process: sympy can spin for minutes in bigint code that holds the GIL.

Timeouts: math-verify's own timeouts use ``signal.alarm`` (whole seconds; fractional values
silently turn verification off) and raise a ``BaseException`` subclass. We switch them off and
arm one ``setitimer`` for the whole item instead, with sub-second resolution, raising our own
``BaseException`` subclass so no ``except Exception`` in sympy or math-verify swallows it.
That soft timeout handles the common case cheaply (the worker survives); C code that ignores
signals is handled by the supervisor's hard deadline, which kills the worker.

Strings: ``str()`` of a parsed sympy object can hang outside any timeout, so the extracted
prediction / gold we report are the raw matched strings math-verify returns next to the sympy
object, never ``str(expr)``.

Known wrong verdicts of math-verify 0.9.0 and what we do about them (see docs/server.md):
``1/2004!`` vs ``1/2006!`` and ``1/2^{99}`` vs ``1/2^{98}`` compare "equal" because numbers are
rounded to ``float_rounding`` decimal places; when math-verify says "equal" and both sides
are numeric constants, we re-check exactly (rationals) or with a relative tolerance and
overturn the verdict (flag ``exact_recheck_overturned``). ``1-\\frac{1}{e}`` vs
``1+\\frac{1}{e}`` comes out "equal" when a gold without math delimiters is parsed as a plain
expression and only its leading ``1`` is extracted; LaTeX golds are therefore wrapped in
``$...$`` before parsing, which gives the whole expression.

Restating the question: math-verify finds ``79 + 89`` equal to ``168``. When every gold is a
plain number and the extracted answer is arithmetic on numbers still to be done, the verdict
is WRONG with the flag ``unevaluated_expression`` (``VerifierConfig.require_evaluated_answer``).
"""

from __future__ import annotations

import logging
import re
import signal
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from server import pysyntax
from server.config import VerifierConfig
from server.types import AnswerFormat, ScoreItem, Status, Verdict

if TYPE_CHECKING:
    from types import FrameType

MAX_REPORTED_CHARS = 1_000
_CHOICES = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CHOICE_GOLD = re.compile(r"^\(?([A-Za-z])\)?$")  # a choice gold: "b", "B", "(b)"
_CHOICE_FALLBACK = re.compile(r"\\boxed\{\s*\(?([A-Z])\)?\s*\}|\(([A-Z])\)|\*\*([A-Z])\*\*")
_TAIL_CONTEXT = 1_000  # characters kept before the last \\boxed when parsing the tail first
_DELIMITERS = ("$", "\\(", "\\[", "\\boxed", "\\begin")
# A number as a final answer: 168, -3, 1,000, 0.25, 50%, 3/4, \frac{3}{4}.
_LITERAL = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|[+-]?\d+/\d+|[+-]?\\d?frac\{[+-]?\d+\}\{\d+\}"
)
# Only numbers, brackets and arithmetic: what "79 + 89" or "2^{3}" is made of.
_NUMERIC_EXPR = re.compile(
    r"(?:[\d.,()+\-*/^{}\[\]]|×|÷|·|\\times|\\cdot|\\div|\\d?frac|\\left|\\right)+"
)
_OPERATOR = re.compile(r"[+*/^×÷·]|\\times|\\cdot|\\div|\\d?frac|(?<=[\d)}])-")
_WRAPPERS = re.compile(r"\\boxed\{(.*)\}|\\\(|\\\)|\\\[|\\\]|\\[,!; ]|\s+|\$")


def _normal(answer: str) -> str:
    """An answer string without math delimiters, ``\\boxed{}``, spacing commands or blanks."""
    previous = None
    text = answer.strip()
    while text != previous:
        previous = text
        text = _WRAPPERS.sub(lambda m: m.group(1) or "", text).rstrip(".").replace("\\%", "%")
    return text


def is_number_literal(answer: str) -> bool:
    """Whether ``answer`` is one number (integer, decimal, percentage or simple fraction)."""
    return bool(_LITERAL.fullmatch(_normal(answer)))


def is_unevaluated_expression(answer: str) -> bool:
    """Whether ``answer`` is arithmetic on numbers still to be done (``79 + 89``, ``2^3``)."""
    text = _normal(answer)
    return (
        not _LITERAL.fullmatch(text)
        and bool(_NUMERIC_EXPR.fullmatch(text))
        and any(c.isdigit() for c in text)
        and bool(_OPERATOR.search(text))
    )


class SoftTimeout(BaseException):
    """Raised by the worker's interval timer; a BaseException so library code cannot swallow it."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeout()


class Verifier:
    """math-verify with gold caching, an exact numeric re-check and a soft timeout.

    Must be used from a process's main thread (it installs a SIGALRM handler).

    Args:
        config: Verifier settings.
    """

    def __init__(self, config: VerifierConfig) -> None:
        import math_verify  # the one place this heavy dependency is imported
        import sympy

        # We run math-verify with its own timeouts off (see module docstring); silence the
        # warning it logs about that once per process.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        self._mv = math_verify
        self._sympy = sympy
        self.config = config
        self._gold_cache: OrderedDict[tuple[str, AnswerFormat], list] = OrderedDict()
        self._verdict_cache: OrderedDict[tuple[str, AnswerFormat, str], tuple[bool, bool]] = (
            OrderedDict()
        )
        self._targets = {
            AnswerFormat.LATEX: (
                [math_verify.LatexExtractionConfig()],
                [
                    math_verify.LatexExtractionConfig(boxed_match_priority=0),
                    math_verify.ExprExtractionConfig(),
                ],
            ),
            AnswerFormat.EXPR: (
                [math_verify.ExprExtractionConfig(), math_verify.LatexExtractionConfig()],
                [math_verify.ExprExtractionConfig(), math_verify.LatexExtractionConfig()],
            ),
            AnswerFormat.CHOICE: (
                [math_verify.StringExtractionConfig(strings=_CHOICES)],
                [math_verify.StringExtractionConfig(strings=_CHOICES)],
            ),
        }
        signal.signal(signal.SIGALRM, _on_alarm)

    def clear_caches(self) -> None:
        """Forget cached gold parses."""
        self._gold_cache.clear()
        self._verdict_cache.clear()

    def check(self, item: ScoreItem, budget_s: float) -> Verdict:
        """Judge one item within ``budget_s`` seconds (soft timeout -> TIMEOUT verdict).

        Args:
            item: The item; it must already have passed ``server.guards.check_item``.
            budget_s: Seconds the item may take in total.

        Returns:
            The verdict.
        """
        stages: dict[str, float] = {}
        signal.setitimer(signal.ITIMER_REAL, max(budget_s, 0.001))
        try:
            return self._check(item, stages)
        except SoftTimeout:
            return Verdict(
                Status.TIMEOUT,
                message=f"verification did not finish within {budget_s:.3f} s",
                stages_ms=stages,
            )
        except MemoryError:
            return Verdict(
                Status.INPUT_TOO_LARGE,
                message="verification exceeded the worker memory limit",
                stages_ms=stages,
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _check(self, item: ScoreItem, stages: dict[str, float]) -> Verdict:
        fmt = item.answer_format
        gold_targets, pred_targets = self._targets[fmt]
        t0 = time.perf_counter()
        golds: list[tuple[str, list]] = []
        shown_gold = ""
        all_hits = True
        for g in item.golds:
            parsed, hit = self._parse_gold(g, fmt, gold_targets)
            all_hits &= hit
            if parsed:
                golds.append((g, parsed))
                shown_gold = shown_gold or _shown(parsed) or g.strip()[:MAX_REPORTED_CHARS]
        t1 = time.perf_counter()
        stages["gold_parse"] = (t1 - t0) * 1e3
        if not golds:
            return Verdict(
                Status.GOLD_UNPARSABLE,
                message=f"none of the {len(item.golds)} gold answer(s) could be parsed as "
                f"{fmt.value}{_python_syntax_note(item.golds, fmt)}",
                stages_ms=stages,
                gold_cache_hit=all_hits,
            )
        flags: list[str] = []
        if fmt is not AnswerFormat.CHOICE and any(pysyntax.looks_pythonic(g) for g, _ in golds):
            flags.append("python_syntax_gold")
        response, rewritten = self._python_answer(item.response, fmt)
        if rewritten:
            flags.append("python_syntax_answer")
            pred_targets = self._targets[AnswerFormat.LATEX][1]
        pred = self._parse_response(response, pred_targets)
        if not pred and fmt is AnswerFormat.CHOICE:
            pred = self._choice_fallback(item.response, pred_targets)
        t2 = time.perf_counter()
        stages["pred_parse"] = (t2 - t1) * 1e3
        if not pred:
            return Verdict(
                Status.NO_ANSWER,
                gold=shown_gold,
                message="no final answer could be extracted from the response",
                stages_ms=stages,
                gold_cache_hit=all_hits,
            )
        status = Status.WRONG
        shown_pred = _shown(pred)
        for gold_text, gold in golds:
            equal, overturned = self._compare(gold_text, fmt, gold, pred, shown_pred)
            if overturned:
                flags.append("exact_recheck_overturned")
            if equal:
                status = Status.OK
                break
        if (
            status is Status.OK
            and self.config.require_evaluated_answer
            and all(is_number_literal(g) for g, _ in golds)
            and is_unevaluated_expression(shown_pred)
        ):
            status = Status.WRONG
            flags.append("unevaluated_expression")
        stages["compare"] = (time.perf_counter() - t2) * 1e3
        return Verdict(
            status,
            prediction=shown_pred,
            gold=shown_gold,
            flags=tuple(dict.fromkeys(flags)),
            stages_ms=stages,
            gold_cache_hit=all_hits,
        )

    def _compare(
        self, gold_text: str, fmt: AnswerFormat, gold: list, pred: list, shown_pred: str
    ) -> tuple[bool, bool]:
        """(equal, overturned by the exact re-check), cached per (gold, extracted answer).

        In a group of G samples the same few answers recur, and sympy's comparison is the
        costliest stage; the verdict depends only on the gold text and the extracted answer
        string (the sympy objects are parsed from exactly those strings).
        """
        key = (gold_text, fmt, shown_pred) if shown_pred and self.config.gold_cache_size else None
        if key is not None:
            hit = self._verdict_cache.get(key)
            if hit is not None:
                self._verdict_cache.move_to_end(key)
                return hit
        equal = bool(
            self._mv.verify(
                gold,
                pred,
                float_rounding=self.config.float_rounding,
                numeric_precision=self.config.numeric_precision,
                strict=self.config.strict,
                timeout_seconds=None,
            )
        )
        overturned = False
        if equal and self.config.exact_numeric_recheck and self._numbers_differ(gold[0], pred[0]):
            equal, overturned = False, True
        if key is not None:
            self._verdict_cache[key] = (equal, overturned)
            if len(self._verdict_cache) > self.config.gold_cache_size:
                self._verdict_cache.popitem(last=False)
        return equal, overturned

    @staticmethod
    def _python_answer(response: str, fmt: AnswerFormat) -> tuple[str, bool]:
        """The response with a final answer in Python / sympy syntax rewritten as LaTeX."""
        if fmt is AnswerFormat.CHOICE:
            return response, False
        response, rewritten = pysyntax.rewrite_boxed(response)
        if not rewritten:
            response, rewritten = pysyntax.rewrite_final_line(response)
        return response, rewritten

    def _parse_response(self, response: str, targets: list) -> list:
        """Parse a response, looking first at the text around its last ``\\boxed``.

        math-verify tries matches right to left and stops at the first that parses, so when
        the tail holds a parsable last boxed answer, parsing only the tail gives the same
        result at a fraction of the cost of running every pattern over a 10k-character chain
        of thought. Otherwise (no boxed answer, or it does not parse) the full text is parsed.
        """
        cut = response.rfind("\\boxed") - _TAIL_CONTEXT
        if cut > 0:
            pred = self._parse(response[cut:], targets, "first_match")
            if pred and not isinstance(pred[0], str):
                return pred
        return self._parse(response, targets, "first_match")

    def _parse(self, text: str, targets: list, fallback: str) -> list:
        return self._mv.parse(text, targets, fallback_mode=fallback, parsing_timeout=None)

    def _choice_fallback(self, response: str, targets: list) -> list:
        """Letters math-verify's string patterns miss: ``(C)``, ``\\boxed{C}``, ``**C**``."""
        found = _CHOICE_FALLBACK.findall(response[-2_000:])
        if not found:
            return []
        letter = next(g for g in found[-1] if g)
        return self._parse(f"Answer: {letter}", targets, "first_match")

    def _parse_gold(self, gold: str, fmt: AnswerFormat, targets: list) -> tuple[list, bool]:
        key = (gold, fmt)
        cached = self._gold_cache.get(key)
        if cached is not None:
            self._gold_cache.move_to_end(key)
            return cached, True
        text = gold.strip()
        choice = _CHOICE_GOLD.match(text) if fmt is AnswerFormat.CHOICE else None
        if choice:  # math-verify's string patterns match only the bare capitals it was given
            text = choice[1].upper()
        elif fmt is not AnswerFormat.CHOICE and pysyntax.looks_pythonic(text):
            # Python / sympy syntax (`3*x**2 - 152*y`): read as what it means, or not at all;
            # math-verify's own fallback would keep only the last number.
            try:
                latex = pysyntax.to_latex(text)
            except pysyntax.PySyntaxError:
                parsed = []
            else:
                parsed = self._parse(
                    f"${latex}$", self._targets[AnswerFormat.LATEX][0], "no_fallback"
                )
            return self._cache_gold(key, parsed), False
        if fmt is AnswerFormat.LATEX and not any(d in text for d in _DELIMITERS):
            # A bare gold such as `1-\frac{1}{e}` is one math expression; without delimiters the
            # LaTeX extractor finds nothing and the fallback keeps only the leading `1`.
            text = f"${text}$"
        # no_fallback: a gold that does not parse must not turn into a raw-string "answer"
        # that only string-equal responses could match; it is GOLD_UNPARSABLE instead.
        parsed = self._parse(text, targets, "no_fallback")
        if fmt is AnswerFormat.LATEX and not parsed:
            parsed = self._parse(gold, self._targets[AnswerFormat.EXPR][0], "no_fallback")
        return self._cache_gold(key, parsed), False

    def _cache_gold(self, key: tuple[str, AnswerFormat], parsed: list) -> list:
        if self.config.gold_cache_size:
            self._gold_cache[key] = parsed
            if len(self._gold_cache) > self.config.gold_cache_size:
                self._gold_cache.popitem(last=False)
        return parsed

    def _numbers_differ(self, gold: Any, pred: Any) -> bool:
        """Exact re-check of an "equal" verdict between two numeric constants."""
        sp = self._sympy
        if not (isinstance(gold, sp.Expr) and isinstance(pred, sp.Expr)):
            return False
        if not (gold.is_number and pred.is_number):
            return False
        if gold.is_Rational and pred.is_Rational:
            return gold != pred
        a = sp.N(gold, 30)
        b = sp.N(pred, 30)
        if not (a.is_number and b.is_number) or a.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
            return False
        scale = max(abs(a), abs(b))
        if scale == 0:
            return False
        return bool(abs(a - b) > self.config.recheck_rel_tol * scale)


def _python_syntax_note(golds: tuple[str, ...], fmt: AnswerFormat) -> str:
    """Why a gold in Python / sympy syntax could not be read, for the GOLD_UNPARSABLE message."""
    if fmt is AnswerFormat.CHOICE:
        return ""
    for g in golds:
        if pysyntax.looks_pythonic(g):
            try:
                pysyntax.to_latex(g)
            except pysyntax.PySyntaxError as e:
                return f"; gold written in Python/sympy syntax cannot be read unambiguously: {e}"
    return ""


def _shown(parsed: list) -> str:
    """The raw matched string of a math-verify parse result (never ``str`` of sympy)."""
    if len(parsed) > 1 and isinstance(parsed[1], str):
        s = parsed[1]
    elif isinstance(parsed[0], str):
        s = parsed[0]
    else:
        s = ""
    return s[:MAX_REPORTED_CHARS]
