"""``examples/trl_grpo.py`` takes one TRL 1.16 ``GRPOTrainer`` step, rewarded by our server.

The example runs in the TRL venv (``venvs.py``, the pins of ``benchmarks/bench_trl.py``)
against a real reward server on port 0: one prompt, two completions of at most 8 tokens.
It must finish the step, and TRL must have called the reward function, which scored the
completions through the server.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from server.config import PoolConfig, ServerConfig
from server.service import create_server

from .venvs import python_or_skip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trl_python() -> Path:
    return python_or_skip("trl")


def test_trl_grpo_example_one_step(trl_python, tmp_path, default_model_dir):
    server, port = create_server(
        ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=1))
    )
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [str(trl_python), str(ROOT / "examples" / "trl_grpo.py"),
             "--reward-address", f"127.0.0.1:{port}", "--model", str(default_model_dir),
             "--steps", "1", "--prompts", "1", "--group-size", "2", "--max-tokens", "8",
             "--out-dir", str(tmp_path / "out")],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
        )  # fmt: skip
    finally:
        server.stop(grace=1.0)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"')]
    summary = lines[-1]
    assert summary["done"] and summary["steps"] == 1 and summary["trl"] == "1.16.0"
    assert summary["reward_calls"] >= 1 and summary["items_scored"] >= 2
    assert any("reward" in x for x in lines[:-1])  # TRL logged the server's rewards
