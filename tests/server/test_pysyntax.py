"""Golds and answers in Python / sympy syntax: read as what they mean, or GOLD_UNPARSABLE."""

from __future__ import annotations

import pytest

from server.pysyntax import PySyntaxError, looks_pythonic, rewrite_boxed, to_latex
from server.types import AnswerFormat, Status

from .conftest import item

POLY = "10863*y**4 + 568*y**3 - 2907*y**2 - 152*y"


@pytest.mark.parametrize(
    "text,latex",
    [
        ("10863*y**4 - 152*y", "10863 \\cdot y^{4} - 152 \\cdot y"),
        ("-34*x**8/15 - 5*x/4 + C", "\\frac{-34 \\cdot x^{8}}{15} - \\frac{5 \\cdot x}{4} + C"),
        ("sqrt(2)/2", "\\frac{\\sqrt{2}}{2}"),
        ("Rational(3, 4)*x", "\\frac{3}{4} \\cdot x"),
        ("a - (b - c)", "a - \\left(b - c\\right)"),
        ("a*-b", "a \\cdot \\left(-b\\right)"),
        ("(-2)**x", "\\left(-2\\right)^{x}"),
        ("-x**2", "-x^{2}"),
        ("exp(2*x)", "e^{2 \\cdot x}"),
        ("x1 + pi", "x_{1} + \\pi"),
        ("1, 2*x", "1, 2 \\cdot x"),
        ("y = 3*x", "y = 3 \\cdot x"),
    ],
)
def test_to_latex(text, latex):
    assert to_latex(text) == latex


@pytest.mark.parametrize(
    "text",
    [
        "foo(x)*2",  # unknown function
        "__import__('os')*2",  # never evaluated: a call of an unknown name
        "x.real*2",  # attribute
        "2*x + 'a'",  # string
        "speed*2",  # multi-letter name: s*p*e*e*d or one symbol?
        "2**3**4**5",  # tower of height 4
        "2**100000",  # exponent above the limit
        "\\frac{1}{2}**2",  # LaTeX and Python mixed
        "2*x**",  # not Python
    ],
)
def test_ambiguous_or_hostile_is_refused(text):
    assert looks_pythonic(text)
    with pytest.raises(PySyntaxError):
        to_latex(text)


@pytest.mark.parametrize("text", ["x^2+1", "\\frac{3}{4}", "42", "2 \\cdot 3", "(1,2]"])
def test_latex_is_not_taken_for_python(text):
    assert not looks_pythonic(text)


def test_rewrite_boxed_only_touches_the_last_box():
    text, changed = rewrite_boxed("first \\boxed{2*x} then \\boxed{3*x**2}.")
    assert changed
    assert text == "first \\boxed{2*x} then \\boxed{3 \\cdot x^{2}}."
    assert rewrite_boxed("\\boxed{x^2}") == ("\\boxed{x^2}", False)


@pytest.mark.parametrize(
    "response,expected",
    [
        ("\\boxed{10863y^4 + 568y^3 - 2907y^2 - 152y}", Status.OK),  # LaTeX answer
        ("\\boxed{-152y - 2907y^2 + 568y^3 + 10863y^4}", Status.OK),  # reordered
        (f"\\boxed{{{POLY}}}", Status.OK),  # the gold's own syntax
        (f"Answer: {POLY}", Status.OK),  # no box
        # The reward hack: a wrong coefficient whose last number is still 152.
        ("\\boxed{10863y^4 + 569y^3 - 2907y^2 - 152y}", Status.WRONG),
        ("\\boxed{10863*y**4 + 568*y**3 - 2907*y**2 - 153*y}", Status.WRONG),
        ("\\boxed{152}", Status.WRONG),
    ],
)
@pytest.mark.parametrize("fmt", [AnswerFormat.LATEX, AnswerFormat.EXPR])
def test_python_gold_is_read_as_what_it_means(pool, response, expected, fmt):
    (r,) = pool.score([item(response, POLY, answer_format=fmt)])
    assert r.status is expected, r
    assert "python_syntax_gold" in r.flags


def test_unreadable_python_gold_is_gold_unparsable(pool):
    (r,) = pool.score([item("\\boxed{4}", "foo(2)*2")])
    assert r.status is Status.GOLD_UNPARSABLE, r
    assert "Python/sympy syntax" in r.message and "foo()" in r.message
