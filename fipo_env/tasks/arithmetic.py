"""Built-in procedural arithmetic / algebra problems with exact gold answers.

Levels (pick one or several; each draw picks a level uniformly among those given):

===== ============================================================ ==================
level what                                                         distinct problems
===== ============================================================ ==================
0     one-digit addition ``a + b``                                  100
1     one-digit ``a + b``, ``a - b``, ``a * b``                      300
2     two-digit addition / subtraction                              16,200
3     two-digit times one-digit; three-term expressions             9,360
4     fractions ``p/q (+|-|*) r/s`` -> reduced fraction             15,552
5     linear equations ``a*x + b = c`` -> integer or fraction x     40,016
6     multi-step: ``(p/q + a) * b - c`` and ``expand (x+a)(x+b)``   104,041
===== ============================================================ ==================

Every answer is computed exactly (``fractions.Fraction``, integer polynomial
coefficients); golds are written in LaTeX (``8``, ``-\\frac{3}{4}``, ``x^{2}+5x+6``).
Level 0 is the trainer's default: SmolLM2-135M-Instruct solves about 29 % of it when
sampling, which leaves room to learn. The hash split gives a fixed share of every level's
problems to ``eval`` (about ``eval_fraction`` of them), never the same problem to both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

from fipo_env.tasks.types import Problem, check_split, in_split
from server.types import AnswerFormat

MAX_LEVEL = 6

_PHRASES = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "Evaluate {e}.")


def latex_number(x: Fraction | int) -> str:
    """Write an exact rational in LaTeX: ``7``, ``-3``, ``\\frac{3}{4}``, ``-\\frac{5}{2}``."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def plain_number(x: Fraction | int) -> str:
    """Write an exact rational as plain text: ``7``, ``-3``, ``3/4``."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def latex_quadratic(b: int, c: int) -> str:
    """LaTeX of the monic polynomial ``x^2 + b x + c`` with zero terms dropped."""
    out = "x^{2}"
    if b:
        coef = "" if abs(b) == 1 else str(abs(b))
        out += f"{'+' if b > 0 else '-'}{coef}x"
    if c:
        out += f"{'+' if c > 0 else '-'}{abs(c)}"
    return out


def _signed_term(v: int) -> str:
    """``+ 3`` / ``- 3`` for writing ``x + 3`` / ``x - 3``."""
    return f"+ {v}" if v >= 0 else f"- {-v}"


def _ri(rng: np.random.Generator, lo: int, hi: int) -> int:
    """A uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(rng.integers(lo, hi + 1))


# Each level generator returns (expression or question text, exact answer, canonical key,
# whether the text is an expression to wrap in a phrase).
_Gen = tuple[str, "Fraction | str", str, bool]


def _level0(rng: np.random.Generator) -> _Gen:
    a, b = _ri(rng, 0, 9), _ri(rng, 0, 9)
    return f"{a} + {b}", Fraction(a + b), f"{a}+{b}", True


def _level1(rng: np.random.Generator) -> _Gen:
    a, b = _ri(rng, 0, 9), _ri(rng, 0, 9)
    op = ("+", "-", "*")[_ri(rng, 0, 2)]
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b}", Fraction(val), f"{a}{op}{b}", True


def _level2(rng: np.random.Generator) -> _Gen:
    a, b = _ri(rng, 10, 99), _ri(rng, 10, 99)
    op = "+" if rng.integers(2) == 0 else "-"
    val = a + b if op == "+" else a - b
    return f"{a} {op} {b}", Fraction(val), f"{a}{op}{b}", True


def _level3(rng: np.random.Generator) -> _Gen:
    if rng.integers(2) == 0:
        a, b = _ri(rng, 10, 99), _ri(rng, 2, 9)
        return f"{a} * {b}", Fraction(a * b), f"{a}*{b}", True
    a, b, c = _ri(rng, 1, 20), _ri(rng, 1, 12), _ri(rng, 1, 12)
    form = _ri(rng, 0, 2)
    if form == 0:
        return f"{a} + {b} * {c}", Fraction(a + b * c), f"{a}+{b}*{c}", True
    if form == 1:
        return f"({a} + {b}) * {c}", Fraction((a + b) * c), f"({a}+{b})*{c}", True
    return f"{a} * {b} - {c}", Fraction(a * b - c), f"{a}*{b}-{c}", True


def _level4(rng: np.random.Generator) -> _Gen:
    p, q = _ri(rng, 1, 9), _ri(rng, 2, 9)
    r, s = _ri(rng, 1, 9), _ri(rng, 2, 9)
    op = ("+", "-", "*")[_ri(rng, 0, 2)]
    x, y = Fraction(p, q), Fraction(r, s)
    val = {"+": x + y, "-": x - y, "*": x * y}[op]
    expr = f"{p}/{q} {op} {r}/{s}"
    return expr, val, f"{p}/{q}{op}{r}/{s}", True


def _level5(rng: np.random.Generator) -> _Gen:
    a = _ri(rng, 2, 9) * (1 if rng.integers(2) == 0 else -1)
    b = _ri(rng, -20, 20)
    c = _ri(rng, -30, 30)
    x = Fraction(c - b, a)
    lhs = f"{a}x" if b == 0 else f"{a}x {_signed_term(b)}"
    text = f"Solve for x: {lhs} = {c}."
    return text, x, f"{a}x+{b}={c}", False


def _level6(rng: np.random.Generator) -> _Gen:
    if rng.integers(2) == 0:
        p, q = _ri(rng, 1, 9), _ri(rng, 2, 9)
        a, b, c = _ri(rng, 1, 9), _ri(rng, 2, 9), _ri(rng, 1, 20)
        val = (Fraction(p, q) + a) * b - c
        return f"({p}/{q} + {a}) * {b} - {c}", val, f"({p}/{q}+{a})*{b}-{c}", True
    a, b = _ri(rng, -9, 9), _ri(rng, -9, 9)
    text = f"Expand (x {_signed_term(a)})(x {_signed_term(b)})."
    # (x + a)(x + b) = x^2 + (a + b) x + a b, kept as a LaTeX expression gold.
    return text, latex_quadratic(a + b, a * b), f"expand(x+{a})(x+{b})", False


_LEVELS: tuple[Callable[[np.random.Generator], _Gen], ...] = (
    _level0,
    _level1,
    _level2,
    _level3,
    _level4,
    _level5,
    _level6,
)


class ArithmeticTask:
    """Procedural arithmetic / algebra problems, deterministic for a given generator.

    Args:
        levels: Difficulty levels to draw from (see the module docstring), uniformly.
        split: ``"train"``, ``"eval"`` or ``"all"``; train and eval never share a problem.
        eval_fraction: Share of each level's problems (by canonical hash) held out for eval.
        phrased: Wrap expressions in varied wording ("What is 3 + 5?", "Compute 3 + 5.");
            with ``False`` always "What is 3 + 5?".
        max_attempts: Draws tried to find a problem of the requested split before failing
            with a clear error (a split can be empty, e.g. eval with ``eval_fraction=0``).
    """

    def __init__(
        self,
        levels: int | Sequence[int] = (0,),
        split: str = "train",
        eval_fraction: float = 0.1,
        phrased: bool = True,
        max_attempts: int = 10_000,
    ) -> None:
        levels_t = (levels,) if isinstance(levels, int) else tuple(levels)
        if not levels_t:
            raise ValueError("levels must name at least one level")
        for lv in levels_t:
            if not isinstance(lv, int | np.integer) or not 0 <= lv <= MAX_LEVEL:
                raise ValueError(f"arithmetic level must be an int in [0, {MAX_LEVEL}], got {lv!r}")
        check_split(split, eval_fraction)
        self.levels = tuple(int(lv) for lv in levels_t)
        self.split = split
        self.eval_fraction = float(eval_fraction)
        self.phrased = phrased
        self.max_attempts = max_attempts
        self.name = f"arithmetic/levels{'-'.join(map(str, self.levels))}/{split}"

    def sample(self, rng: np.random.Generator) -> Problem:
        """Draw one problem of this task's split."""
        for _ in range(self.max_attempts):
            level = self.levels[int(rng.integers(len(self.levels)))]
            text, answer, key, is_expr = _LEVELS[level](rng)
            # The key is the expression, not the level: "3 + 5" drawn at level 0 or level 1
            # is one problem and must land in one split.
            canonical = f"arith:{key}"
            if is_expr:
                phrase = _PHRASES[int(rng.integers(len(_PHRASES)))] if self.phrased else _PHRASES[0]
                text = phrase.format(e=text)
            if not in_split(canonical, self.split, self.eval_fraction):
                continue
            if isinstance(answer, Fraction):
                golds: tuple[str, ...] = (latex_number(answer),)
                meta = {"level": level, "value": plain_number(answer)}
            else:
                golds = (answer,)
                meta = {"level": level, "value": answer}
            return Problem(
                question=text,
                golds=golds,
                canonical=canonical,
                answer_format=AnswerFormat.LATEX,
                source=f"arithmetic/level{level}",
                meta=meta,
            )
        raise ValueError(
            f"no {self.split!r} problem found in {self.max_attempts} draws for levels "
            f"{self.levels} with eval_fraction={self.eval_fraction}; the split is empty or "
            "tiny -- use more levels or a different eval_fraction"
        )
