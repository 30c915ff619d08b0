"""The server agrees with reasoning-gym's own scorer on the committed corpus (issue #14).

The corpus (``data/rgym_corpus.jsonl``, built by ``benchmarks/make_rgym_corpus.py`` from
reasoning-gym 0.1.25 generators) holds exact answers, one-integer perturbations, equivalent
rewritings and LaTeX renderings, each with reasoning-gym's verdict. Scored through a real
server on port 0 with the default answer format, agreement must be >= 0.97 and no wrong
answer may score correct. Before Python-syntax golds were read, agreement was 0.748 with 6
wrong answers scored correct.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.client import RewardClient
from server.config import PoolConfig, ServerConfig
from server.service import create_server
from server.types import ScoreItem

CORPUS = Path(__file__).parent / "data" / "rgym_corpus.jsonl"


def test_agreement_with_reasoning_gym():
    lines = [json.loads(x) for x in CORPUS.read_text().splitlines() if x.strip()]
    rows = lines[1:]
    families = {r["family"] for r in rows}
    kinds = {r["kind"] for r in rows}
    assert len(families) >= 5 and kinds == {"exact", "perturbed", "equivalent", "latex"}
    items = [ScoreItem(str(i), r["response"], (r["gold"],)) for i, r in enumerate(rows)]
    config = ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=2))
    server, port = create_server(config)
    try:
        with RewardClient(f"127.0.0.1:{port}") as client:
            results = client.score(items)
    finally:
        server.stop(grace=1.0)
    ref = [r["rg_score"] == 1.0 for r in rows]
    got = [r.correct for r in results]
    false_pos = [
        (rows[i]["gold"], rows[i]["rg_answer"]) for i in range(len(rows)) if got[i] and not ref[i]
    ]
    agree = sum(a == b for a, b in zip(got, ref, strict=True)) / len(rows)
    assert not false_pos, f"wrong answers scored correct: {false_pos[:5]}"
    assert agree >= 0.97, f"agreement {agree:.4f} with reasoning-gym's score_answer"
