"""Pre-parse guards: hostile shapes are refused with a clear message, legitimate maths passes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import Limits
from server.guards import check_item, check_text
from server.types import ScoreItem, Status

L = Limits()

HOSTILE = [
    ("a\x00b", Status.INVALID, "NUL"),
    ("bad \ud800 utf8", Status.INVALID, "UTF-8"),
    ("{" * 5000 + "}" * 5000, Status.INPUT_TOO_LARGE, "nests"),
    ("\\boxed{" * 300 + "1" + "}" * 300, Status.INPUT_TOO_LARGE, "nests"),
    ("\\boxed{2^{2^{2^{2^{2}}}}}", Status.INPUT_TOO_LARGE, "tower"),
    ("\\boxed{9^{9^{9}}}", Status.INPUT_TOO_LARGE, "exponent"),
    ("9^9^9", Status.INPUT_TOO_LARGE, "exponent"),
    ("\\boxed{10^{10^{10}}}", Status.INPUT_TOO_LARGE, "exponent"),
    ("\\boxed{2^{-10^{10}}}", Status.INPUT_TOO_LARGE, "exponent"),
    ("x^{1000000}", Status.INPUT_TOO_LARGE, "exponent"),
    ("\\boxed{10^{100000}}", Status.INPUT_TOO_LARGE, "digits"),
    ("2**99999999", Status.INPUT_TOO_LARGE, "exponent"),
    ("\\boxed{100000!}", Status.INPUT_TOO_LARGE, "factorial"),
    ("\\boxed{(100!)!}", Status.INPUT_TOO_LARGE, "factorial"),
    ("1" * 1000, Status.INPUT_TOO_LARGE, "digits"),
]

BENIGN = [
    "so \\boxed{\\frac{1}{2004!}}",
    "\\boxed{2^{99}}",
    "$e^{x^2}$ and $x^2 + y^2 = r^2$ and $2^{10} = 1024$",
    "\\boxed{(1+x)^{5}}",
    "2**3**4",
    "Wow! That is 5! = 120, and 12 ! is fine",
    "\\left(\\frac{a}{b}\\right)^{2}",
]


@pytest.mark.parametrize("text,status,word", HOSTILE)
def test_hostile_refused(text, status, word):
    rej = check_text(text, L, "response")
    assert rej is not None, text[:40]
    assert rej[0] is status
    assert word in rej[1] and rej[1].startswith("response")


@pytest.mark.parametrize("text", BENIGN)
def test_benign_passes(text):
    assert check_text(text, L) is None


def test_item_fields():
    ok = ScoreItem("a", "x", ("1",))
    assert check_item(ok, L) is None
    cases = {
        "no gold": ScoreItem("a", "x", ()),
        "empty gold": ScoreItem("a", "x", ("  ",)),
        "only empty golds": ScoreItem("a", "x", ("", " ")),
        "negative deadline": ScoreItem("a", "x", ("1",), deadline_s=-1.0),
        "buffer > max": ScoreItem("a", "x", ("1",), max_response_tokens=5, overlong_buffer=9),
        "too many golds": ScoreItem("a", "x", tuple("1" * 17)),
    }
    for what, it in cases.items():
        rej = check_item(it, L)
        assert rej is not None and rej[0] is Status.INVALID, what
    # Any gold matching counts: an empty one beside a real one is not an error.
    assert check_item(ScoreItem("a", "x", ("4", "")), L) is None
    big = check_item(ScoreItem("a", "x" * (L.max_response_chars + 1), ("1",)), L)
    assert big is not None and big[0] is Status.INPUT_TOO_LARGE and "limit" in big[1]
    big_gold = check_item(ScoreItem("a", "x", ("1" * (L.max_gold_chars + 1),)), L)
    assert big_gold is not None and big_gold[0] is Status.INPUT_TOO_LARGE


# Any text at all gets an answer from the guards, never an exception.
_MATHY = st.text(
    alphabet=st.sampled_from(list("0123456789^{}()[]!*+-x \\boxedfrac$")), max_size=400
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), _MATHY))
def test_guards_never_raise(text):
    rej = check_text(text, L)
    assert rej is None or (rej[0] in (Status.INVALID, Status.INPUT_TOO_LARGE) and rej[1])
