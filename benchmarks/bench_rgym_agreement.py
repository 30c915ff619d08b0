"""Agreement of the reward server with reasoning-gym's own scorer, on the committed corpus.

Every response of ``tests/server/data/rgym_corpus.jsonl`` (built by
``benchmarks/make_rgym_corpus.py``: exact golds, one-integer perturbations, equivalent
rewritings, LaTeX renderings, for several reasoning-gym generators) is scored through a
real reward server (gRPC, ``RewardClient``) with the item settings a new user would pick:
the gold as the generator writes it, the default answer format (LaTeX). The server's
``correct`` is compared with reasoning-gym's verdict (``score_answer == 1.0``).

Prints agreement overall and per family / kind, the false positives (wrong answers scored
correct: a reward that can be hacked) and the disagreements. Exit code 1 when agreement is
below ``--min-agreement`` (0.97) or any false positive exists.

Run::

    python benchmarks/bench_rgym_agreement.py                # 1 worker, the committed corpus
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: make the project's packages importable

CORPUS = ROOT / "tests" / "server" / "data" / "rgym_corpus.jsonl"


def load_corpus(path: Path = CORPUS) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The corpus header and its rows."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[0]["meta"], lines[1:]


def agreement(rows: list[dict[str, Any]], correct: list[bool]) -> dict[str, Any]:
    """Compare the server's verdicts with reasoning-gym's.

    Returns:
        ``agreement`` (share of equal verdicts), ``false_positives`` and
        ``false_negatives`` (row indices), and per ``family/kind`` counts.
    """
    ref = [r["rg_score"] == 1.0 for r in rows]
    fp = [i for i, (c, g) in enumerate(zip(correct, ref, strict=True)) if c and not g]
    fn = [i for i, (c, g) in enumerate(zip(correct, ref, strict=True)) if g and not c]
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r, c, g in zip(rows, correct, ref, strict=True):
        for key in (r["family"], f"kind:{r['kind']}"):
            groups[key][0] += c == g
            groups[key][1] += 1
    return {
        "n": len(rows),
        "agreement": sum(c == g for c, g in zip(correct, ref, strict=True)) / max(len(rows), 1),
        "false_positives": fp,
        "false_negatives": fn,
        "groups": dict(groups),
    }


def main(argv: list[str] | None = None) -> int:
    from trainer.precision import describe_machine

    print(describe_machine(), flush=True)  # figures depend on it (bf16 is native only on some CPUs)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--min-agreement", type=float, default=0.97)
    args = p.parse_args(argv)

    from server.client import RewardClient
    from server.config import PoolConfig, ServerConfig
    from server.service import create_server
    from server.types import ScoreItem

    meta, rows = load_corpus(args.corpus)
    items = [ScoreItem(str(i), r["response"], (r["gold"],)) for i, r in enumerate(rows)]
    config = ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=args.workers))
    server, port = create_server(config)
    try:
        with RewardClient(f"127.0.0.1:{port}") as client:
            t0 = time.perf_counter()
            results = client.score(items)
            seconds = time.perf_counter() - t0
    finally:
        server.stop(grace=1.0)
    report = agreement(rows, [r.correct for r in results])
    print(f"corpus {args.corpus.name}: {report['n']} responses from reasoning-gym "
          f"{meta['reasoning_gym']} (seed {meta['seed']}); scored in {seconds:.1f} s")  # fmt: skip
    print(f"\n{'group':<34}{'agree':>7}{'of':>5}")
    for key, (ok, n) in sorted(report["groups"].items()):
        print(f"{key:<34}{ok:>7}{n:>5}")
    print(f"\nagreement {report['agreement']:.4f} (target >= {args.min_agreement}); "
          f"false positives (wrong scored correct) {len(report['false_positives'])}; "
          f"false negatives {len(report['false_negatives'])}")  # fmt: skip
    statuses = collections.Counter(r.status.value for r in results)
    print(f"statuses: {dict(statuses)}")
    for label, idx in (("FALSE POSITIVE", report["false_positives"]),
                       ("false negative", report["false_negatives"])):  # fmt: skip
        for i in idx:
            r, res = rows[i], results[i]
            print(f"{label}: {r['family']}/{r['kind']} gold {r['gold']!r} answer "
                  f"{r['rg_answer']!r} -> {res.status.value} pred {res.extracted_prediction!r}")  # fmt: skip
    ok = report["agreement"] >= args.min_agreement and not report["false_positives"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
