"""Build the reasoning-gym agreement corpus: answers scored by reasoning-gym's own scorer.

For several reasoning-gym generators with exact answers, each item yields responses of four
kinds, and each response carries the verdict of the generator's own ``score_answer``:

- ``exact``: the gold as the generator writes it (Python / sympy syntax for polynomials and
  integrals), boxed or as a plain last line;
- ``perturbed``: one integer of the gold changed (a coefficient, an exponent, a digit):
  a wrong answer that differs from the gold in one place;
- ``equivalent``: the same value written another way reasoning-gym accepts (terms in
  another order, ``\\frac{a}{b}`` for ``a/b``);
- ``latex``: the exact or perturbed answer written in LaTeX (``sympy.latex``), as a model
  trained on LaTeX writes it. reasoning-gym's scorer cannot read LaTeX, so the reference
  verdict is its verdict on the same answer in its own syntax (field ``rg_answer``).

A response is "correct" for reasoning-gym when ``score_answer`` returns 1.0; partial
credits (0.05, 0.1, length ratios) count as not correct. Rewritings that reasoning-gym
rejects by design although they are equal (an unsimplified fraction for "simplify", a
factored polynomial, ``e = 13`` for ``13``) are left out: they test the task's wording, not
the reading of answers.

Run (reasoning-gym is in requirements.lock)::

    python benchmarks/make_rgym_corpus.py          # writes tests/server/data/rgym_corpus.jsonl

The output is committed so the server's tests need no reasoning-gym; the agreement is
measured by ``benchmarks/bench_rgym_agreement.py`` and asserted by
``tests/server/test_rgym_agreement.py``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "server" / "data" / "rgym_corpus.jsonl"

#: Generator -> number of items drawn. Exact answers only (no tolerance-based scorers).
FAMILIES: dict[str, int] = {
    "polynomial_multiplication": 16,
    "simple_integration": 10,
    "fraction_simplification": 10,
    "basic_arithmetic": 8,
    "chain_sum": 8,
    "products": 8,
    "gcd": 6,
    "lcm": 6,
}
SYMBOLIC = {"polynomial_multiplication", "simple_integration"}
_INT = re.compile(r"\d+")


def boxed(answer: str) -> str:
    """A short worked response whose final answer is boxed."""
    return f"Working through it step by step.\n\nThe final answer is $\\boxed{{{answer}}}$."


def plain(answer: str) -> str:
    """A response that states the answer on its last line, without a box."""
    return f"Working through it step by step.\nAnswer: {answer}"


def perturb(gold: str, rng: random.Random) -> str:
    """``gold`` with one of its integers changed by a small non-zero amount."""
    spots = list(_INT.finditer(gold))
    m = rng.choice(spots)
    value = int(m.group())
    new = value + rng.choice([1, 2, 3, 7]) if value < 3 else value + rng.choice([-2, -1, 1, 2])
    return f"{gold[: m.start()]}{new}{gold[m.end() :]}"


def to_latex(python_expr: str, variable: str | None) -> str:
    """``python_expr`` (sympy syntax) as sympy prints it in LaTeX."""
    import sympy

    local = {"C": sympy.Symbol("C")}
    if variable:
        local[variable] = sympy.Symbol(variable)
    return sympy.latex(sympy.parse_expr(python_expr, local_dict=local))


def reordered(python_expr: str) -> str | None:
    """The same sum with its top-level terms in reverse order, or None for a single term."""
    import sympy

    terms = sympy.Add.make_args(sympy.parse_expr(python_expr, evaluate=False))
    if len(terms) < 2:
        return None
    return " + ".join(f"({sympy.sstr(t)})" for t in reversed(terms))


def rows_for(name: str, count: int, seed: int) -> list[dict[str, Any]]:
    """Corpus rows for ``count`` items of the generator ``name``."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset(name, size=count, seed=seed)
    rng = random.Random(f"{name}:{seed}")
    rows: list[dict[str, Any]] = []
    for index in range(count):
        entry = ds[index]
        gold = str(entry["answer"]).strip()
        variable = (entry.get("metadata") or {}).get("variable")

        def add(kind: str, response: str, rg_answer: str, _e=entry, _i=index, _g=gold) -> None:
            rows.append(
                {
                    "family": name,
                    "index": _i,
                    "kind": kind,
                    "gold": _g,
                    "response": response,
                    "rg_answer": rg_answer,
                    "rg_score": float(ds.score_answer(rg_answer, _e)),
                }
            )

        wrong = perturb(gold, rng)
        add("exact", boxed(gold), gold)
        add("exact", plain(gold), gold)
        add("perturbed", boxed(wrong), wrong)
        add("perturbed", plain(wrong), wrong)
        if name in SYMBOLIC:
            other = reordered(gold)
            if other is not None:
                add("equivalent", boxed(other), other)
            add("latex", boxed(to_latex(gold, variable)), gold)
            add("latex", boxed(to_latex(wrong, variable)), wrong)
        elif name == "fraction_simplification":
            # Golds come as `a/b`, `$a/b$` or `\\frac{a}{b}`; write the other spelling.
            (num, den), (wnum, wden) = _INT.findall(gold), _INT.findall(wrong)
            other = f"{num}/{den}" if "frac" in gold else f"\\frac{{{num}}}{{{den}}}"
            add("equivalent", boxed(other), other)
            add("latex", boxed(f"\\frac{{{wnum}}}{{{wden}}}"), f"\\frac{{{wnum}}}{{{wden}}}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    try:
        version = importlib.metadata.version("reasoning_gym")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("make_rgym_corpus: reasoning-gym is not installed") from None
    rows = [row for name, n in FAMILIES.items() for row in rows_for(name, n, args.seed)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        header = {"reasoning_gym": version, "seed": args.seed, "families": FAMILIES}
        f.write(json.dumps({"meta": header}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    correct = sum(r["rg_score"] == 1.0 for r in rows)
    print(f"{len(rows)} responses ({correct} correct for reasoning-gym {version}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
