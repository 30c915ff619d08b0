"""The Node.js example client (examples/node) scores a batch and a stream against a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from server.config import PoolConfig, ServerConfig
from server.service import create_server

from .certs import make_pki, secure_config

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE = shutil.which("node")
TOKEN = "node-example-token"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed: the Node example cannot run"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        reason="examples/node/node_modules is missing: run `make setup` (npm ci) first",
    ),
]


def _run_node(port: int, env: dict[str, str] | None = None) -> list[dict]:
    proc = subprocess.run(
        [NODE, "score.js", f"localhost:{port}"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("FIPO_")} | (env or {}),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _check(lines: list[dict]) -> None:
    score = {x["id"]: x for x in lines if x.get("rpc") == "Score"}
    assert score["right"]["status"] == "STATUS_OK" and score["right"]["reward"] == 1
    assert score["wrong"]["status"] == "STATUS_WRONG" and score["wrong"]["reward"] == -1
    assert score["choice"]["status"] == "STATUS_OK"
    assert score["none"]["status"] == "STATUS_NO_ANSWER"
    assert (
        score["tower"]["status"] == "STATUS_INPUT_TOO_LARGE"
        and "tower" in score["tower"]["message"]
    )
    assert score["long"]["reward"] == pytest.approx(0.5)
    streamed = sorted(x["id"] for x in lines if x.get("rpc") == "ScoreStream")
    assert streamed == ["stream-choice", "stream-right", "stream-wrong"]
    info = next(x for x in lines if x.get("rpc") == "GetServerInfo")
    assert info["math_verify"] == "0.9.0"


def test_node_client_plaintext():
    srv, port = create_server(ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=1)))
    try:
        _check(_run_node(port))
    finally:
        srv.stop(grace=1)


def test_node_client_mtls_and_token(tmp_path):
    pki = make_pki(tmp_path)
    srv, port = create_server(secure_config(pki, TOKEN))
    try:
        env = {
            "FIPO_REWARD_TOKEN": TOKEN,
            "FIPO_TLS_CA": str(pki["ca.pem"]),
            "FIPO_TLS_CERT": str(pki["client.pem"]),
            "FIPO_TLS_KEY": str(pki["client.key"]),
        }
        _check(_run_node(port, env))
    finally:
        srv.stop(grace=1)
