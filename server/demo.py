"""``python -m server.demo``: start a reward server, score a built-in sample, print a table.

The sample mixes right, wrong and unanswered responses with hostile inputs (exponent towers,
nested braces, NUL bytes, a megabyte string) and one of math-verify's known wrong verdicts,
so the table shows every status the server produces. It talks to the server through the
Python client over a real gRPC port, exactly as a trainer would.
"""

from __future__ import annotations

import argparse
import sys
import time

from server.client import RewardClient
from server.config import PoolConfig, ServerConfig
from server.pool import default_workers
from server.service import create_server
from server.types import AnswerFormat, RewardScheme, ScoreItem

SAMPLE: list[tuple[str, str, str, AnswerFormat]] = [
    # (label, response, gold, format)
    ("right: boxed integer", "3 + 4 = 7, so the answer is \\boxed{7}.", "7", AnswerFormat.LATEX),
    (
        "right: equivalent fraction",
        "Simplify: \\boxed{\\frac{6}{8}}",
        "\\frac{3}{4}",
        AnswerFormat.LATEX,
    ),
    ("right: interval", "So $x \\in \\boxed{(1, 2]}$", "(1,2]", AnswerFormat.LATEX),
    ("right: expression", "Expanding gives \\boxed{x^2+2x+1}", "(x+1)^2", AnswerFormat.LATEX),
    (
        "right: multiple choice",
        "Comparing the options, the answer is (C).",
        "C",
        AnswerFormat.CHOICE,
    ),
    ("right: plain expression", "x = 0.75", "3/4", AnswerFormat.EXPR),
    ("wrong: integer", "I think it is \\boxed{8}.", "7", AnswerFormat.LATEX),
    ("wrong: sign", "\\boxed{1+\\frac{1}{e}}", "1-\\frac{1}{e}", AnswerFormat.LATEX),
    (
        "wrong: known math-verify issue",
        "\\boxed{\\frac{1}{2006!}}",
        "\\frac{1}{2004!}",
        AnswerFormat.LATEX,
    ),
    ("no answer", "Let me think about this step by step...", "7", AnswerFormat.LATEX),
    ("hostile: exponent tower", "\\boxed{9^{9^{9^{9}}}}", "1", AnswerFormat.LATEX),
    ("hostile: 5000 nested braces", "{" * 5000 + "}" * 5000, "1", AnswerFormat.LATEX),
    ("hostile: NUL byte", "\\boxed{1}\x00", "1", AnswerFormat.LATEX),
    ("hostile: 1 MB response", "9" * 1_000_000, "1", AnswerFormat.LATEX),
    ("bad gold", "\\boxed{1}", "\\frac{", AnswerFormat.LATEX),
]


def _cut(s: str, n: int) -> str:
    s = s.replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code (0 when every item got a result)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(2, default_workers()))
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    server, port = create_server(
        ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=args.workers))
    )
    print(
        f"reward server up on 127.0.0.1:{port} with {args.workers} workers ({time.monotonic() - t0:.1f} s)"
    )
    try:
        items = [
            ScoreItem(
                id=label,
                response=resp,
                golds=(gold,),
                answer_format=fmt,
                reward_scheme=RewardScheme.SIGNED,
            )
            for label, resp, gold, fmt in SAMPLE
        ]
        with RewardClient(f"127.0.0.1:{port}") as client:
            t1 = time.monotonic()
            results = client.score(items)
            elapsed = time.monotonic() - t1
        header = f"{'item':<32} {'status':<16} {'reward':>6} {'ms':>7}  {'prediction':<18} {'gold':<16} detail"
        print(header)
        print("-" * len(header))
        for r in results:
            detail = r.message or ",".join(r.flags)
            print(
                f"{_cut(r.id, 32):<32} {r.status.value:<16} {r.reward:>+6.1f} {r.latency_ms:>7.1f}  "
                f"{_cut(r.extracted_prediction, 18):<18} {_cut(r.extracted_gold, 16):<16} {_cut(detail, 60)}"
            )
        print(
            f"\n{len(results)} items scored in {elapsed * 1e3:.0f} ms through gRPC (signed rewards: +1 / -1)"
        )
        return 0 if len(results) == len(items) else 1
    finally:
        server.stop(grace=1)


if __name__ == "__main__":
    sys.exit(main())
