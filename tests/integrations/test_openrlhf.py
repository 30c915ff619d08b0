"""OpenRLHF 0.11.2's own executor gets the gRPC client's rewards from our server, both ways.

Two reward-server replicas run here (gRPC + the HTTP listener, port 0). In the OpenRLHF
venv (``venvs.py``), ``openrlhf.utils.agent.SingleTurnAgentExecutor`` -- imported from the
installed package -- scores the cases through ``--remote_rm_url``'s two forms: the replicas'
``/get_reward`` URLs, and ``server/openrlhf_reward.py`` as a ``reward_func`` file (address
from ``FIPO_REWARD_ADDRESS``). The rewards must equal what ``RewardClient`` gets for the
same responses and golds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from server.client import RewardClient
from server.config import PoolConfig, ServerConfig
from server.openrlhf import STATUS_KEYS
from server.service import create_server
from server.types import ScoreItem, Status

from .venvs import python_or_skip

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Question: {q}\nPut the final answer in \\boxed{{}}.\nAnswer:"
CASES = [
    ("What is 2 + 2?", " 2 + 2 = 4, so \\boxed{4}.", "4"),
    ("What is 3 * 5?", " I think it is \\boxed{16}.", "15"),
    ("What is 7 - 9?", " No idea.", "-2"),
    ("Expand (x+1)*(x-1).", " It is \\boxed{x^2 - 1}.", "x**2 - 1"),
    ("Expand (y+2)**2.", " \\boxed{y^2 + 4y + 5}", "y**2 + 4*y + 4"),
    ("Simplify 6/8.", " \\boxed{\\frac{3}{4}}", "3/4"),
]


@pytest.fixture(scope="module")
def openrlhf_python() -> Path:
    return python_or_skip("openrlhf")


@pytest.fixture(scope="module")
def replicas():
    servers = []
    try:
        for _ in range(2):
            cfg = ServerConfig(port=0, metrics_port=None, http_port=0, pool=PoolConfig(workers=1))
            servers.append(create_server(cfg)[0])
        yield servers
    finally:
        for s in servers:
            s.stop(grace=1.0)


def test_openrlhf_executor_gets_grpc_rewards(
    openrlhf_python, replicas, tmp_path, default_model_dir
):
    cases = [{"prompt": PROMPT.format(q=q), "response": r, "label": g} for q, r, g in CASES]
    spec = {
        "tokenizer_dir": str(default_model_dir),
        "urls": [f"http://127.0.0.1:{s.http_port}/get_reward" for s in replicas],
        "reward_file": str(ROOT / "server" / "openrlhf_reward.py"),
        "cases": cases,
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FIPO_REWARD_ADDRESS=f"127.0.0.1:{replicas[0].port}", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(openrlhf_python), str(Path(__file__).with_name("openrlhf_driver.py")), str(spec_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    items = [ScoreItem(str(i), c["response"], (c["label"],)) for i, c in enumerate(cases)]
    with RewardClient(f"127.0.0.1:{replicas[1].port}") as client:
        want = client.score(items)
    rewards = [r.reward for r in want]
    assert [r.status for r in want] == [
        Status.OK, Status.WRONG, Status.NO_ANSWER, Status.OK, Status.WRONG, Status.OK,
    ]  # fmt: skip
    for way in ("http", "reward_func"):
        result = got["ways"][way]
        # The executor keeps the server's per-query lists (one query per execute call).
        assert [c["reward"] for c in result["per_case"]] == [[x] for x in rewards], way
        assert [c["scores"] for c in result["per_case"]] == [[x] for x in rewards], way
        for c, r in zip(result["per_case"], want, strict=True):
            assert c["extra_logs"]["acc"] == [float(r.correct)]
            assert c["extra_logs"][STATUS_KEYS[r.status]] == [1.0]
        assert result["batch"] == rewards, way
    assert got["ways"]["http"]["shards"] == 2  # the batch was split across both replicas
