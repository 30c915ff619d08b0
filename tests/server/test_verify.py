"""Verdicts of the worker-side verifier (through a real pool, as in production)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.types import AnswerFormat, RewardScheme, Status

from .conftest import item

CASES = [
    # (response, gold, format, expected status)
    ("so the answer is \\boxed{42}", "42", AnswerFormat.LATEX, Status.OK),
    ("\\boxed{41}", "42", AnswerFormat.LATEX, Status.WRONG),
    ("\\boxed{\\frac{3}{4}}", "0.75", AnswerFormat.LATEX, Status.OK),
    ("\\boxed{\\dfrac{6}{8}}", "\\frac{3}{4}", AnswerFormat.LATEX, Status.OK),
    ("\\boxed{(1,2]}", "(1,2]", AnswerFormat.LATEX, Status.OK),
    ("\\boxed{[1,2]}", "(1,2]", AnswerFormat.LATEX, Status.WRONG),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", AnswerFormat.LATEX, Status.OK),
    ("I have no idea.", "42", AnswerFormat.LATEX, Status.NO_ANSWER),
    ("\\boxed{2}", "\\frac{", AnswerFormat.LATEX, Status.GOLD_UNPARSABLE),
    ("x = 3/4", "0.75", AnswerFormat.EXPR, Status.OK),
    ("The answer is (C).", "C", AnswerFormat.CHOICE, Status.OK),
    ("Answer: B", "C", AnswerFormat.CHOICE, Status.WRONG),
    ("The answer is 0.333333", "\\frac13", AnswerFormat.LATEX, Status.OK),
]


@pytest.mark.parametrize("response,gold,fmt,expected", CASES)
def test_verdicts(pool, response, gold, fmt, expected):
    (r,) = pool.score([item(response, gold, answer_format=fmt)])
    assert r.status is expected, r
    assert r.correct is (expected is Status.OK)


def test_any_gold_matches(pool):
    (r,) = pool.score([item("\\boxed{7}", ("6", "7"))])
    assert r.status is Status.OK


def test_an_empty_gold_beside_real_ones_is_ignored(pool):
    right, wrong, all_empty = pool.score(
        [
            item("\\boxed{4}", ("4", ""), id="right"),
            item("\\boxed{5}", ("", "4"), id="wrong"),
            item("\\boxed{4}", ("", "  "), id="all-empty"),
        ]
    )
    assert right.status is Status.OK, right
    assert wrong.status is Status.WRONG, wrong
    assert all_empty.status is Status.INVALID and "every gold answer is empty" in all_empty.message


@pytest.mark.parametrize("gold", ["b", "B", "(b)", "(B)", " b "])
def test_a_choice_gold_may_be_lower_case(pool, gold):
    ok, wrong = pool.score(
        [
            item("The answer is (B).", gold, answer_format=AnswerFormat.CHOICE, id="ok"),
            item("Answer: C", gold, answer_format=AnswerFormat.CHOICE, id="wrong"),
        ]
    )
    assert ok.status is Status.OK, ok
    assert wrong.status is Status.WRONG, wrong


# The known wrong verdicts of math-verify 0.9.0 (docs/server.md, "Known wrong verdicts").
@pytest.mark.parametrize(
    "response,gold",
    [
        ("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}"),
        ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}"),
        ("\\boxed{1+\\frac{1}{e}}", "1-\\frac{1}{e}"),
    ],
)
def test_known_wrong_verdicts_are_avoided(pool, response, gold):
    (r,) = pool.score([item(response, gold)])
    assert r.status is Status.WRONG, r
    (same,) = pool.score([item(f"\\boxed{{{gold}}}", gold)])
    assert same.status is Status.OK, same


def test_recheck_flag_and_switch():
    """The exact re-check overturns math-verify's rounding verdict; turning it off restores it."""
    from server.config import PoolConfig, VerifierConfig
    from server.pool import WorkerPool

    it = item("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}")
    with WorkerPool(
        PoolConfig(workers=1, verifier=VerifierConfig(exact_numeric_recheck=False))
    ) as raw:
        (r,) = raw.score([it])
    assert r.status is Status.OK  # math-verify 0.9.0's own (wrong) verdict


# Restating the question is not answering it (a trained policy learnt to write the sum and
# an empty \\boxed{}; math-verify's fallback took the sum, which equals the gold).
@pytest.mark.parametrize(
    "response",
    [
        "79 + 89 equals \\boxed{}.",
        "\\boxed{79+89}",
        "$79 + 89$",
        "\\boxed{2 \\times 84}",
        "\\boxed{168^{1}}",
    ],
)
def test_an_unevaluated_sum_does_not_answer_a_number_gold(pool, response):
    (r,) = pool.score([item(response, "168")])
    assert r.status is Status.WRONG and "unevaluated_expression" in r.flags, r


@pytest.mark.parametrize(
    "response,gold",
    [
        ("\\boxed{168}", "168"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),  # a single fraction is an evaluated number
        ("\\boxed{-5}", "-5"),
        ("\\boxed{2x+2}", "2(x+1)"),  # not a number gold: expressions are the answer
        ("\\boxed{1+\\sqrt{2}}", "\\sqrt{2}+1"),
    ],
)
def test_evaluated_answers_and_expression_golds_are_unaffected(pool, response, gold):
    (r,) = pool.score([item(response, gold)])
    assert r.status is Status.OK and "unevaluated_expression" not in r.flags, r


def test_unevaluated_answers_can_be_allowed():
    from server.config import PoolConfig, VerifierConfig
    from server.pool import WorkerPool

    with WorkerPool(
        PoolConfig(workers=1, verifier=VerifierConfig(require_evaluated_answer=False))
    ) as raw:
        (r,) = raw.score([item("\\boxed{79+89}", "168")])
    assert r.status is Status.OK, r


def test_recheck_flag(pool):
    (r,) = pool.score([item("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}")])
    assert "exact_recheck_overturned" in r.flags


def test_rewards_and_overlong_penalty(pool):
    ok, bad, long_ok = pool.score(
        [
            item("\\boxed{1}", "1", reward_scheme=RewardScheme.SIGNED),
            item("\\boxed{2}", "1", reward_scheme=RewardScheme.SIGNED),
            item(
                "\\boxed{1}",
                "1",
                response_tokens=90,
                max_response_tokens=100,
                overlong_buffer=20,
            ),
        ]
    )
    assert (ok.reward, bad.reward) == (1.0, -1.0)
    assert long_ok.overlong_penalty == pytest.approx(-0.5)
    assert long_ok.reward == pytest.approx(0.5)


def test_extracted_strings(pool):
    (r,) = pool.score([item("work... \\boxed{\\frac{1}{2}}", "0.5")])
    assert r.extracted_prediction == "\\frac{1}{2}"
    assert r.extracted_gold == "0.5"


# Arbitrary text through real workers: every item comes back, in order, with a status.
_TEXT = st.text(
    alphabet=st.sampled_from(list("0123456789^{}()[]!/*+-=.,xye \\boxedfracsqrt$")), max_size=120
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=6))
def test_any_text_gets_a_result(pool, pairs):
    items = [item(r, g or "1", id=str(i), deadline_s=3.0) for i, (r, g) in enumerate(pairs)]
    results = pool.score(items)
    assert [r.id for r in results] == [it.id for it in items]
    assert all(isinstance(r.status, Status) for r in results)
    assert all(r.correct is (r.status is Status.OK) for r in results)
