"""The HTTP listener (OpenRLHF's reward protocol) on a real server: replies, auth, errors."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server.client import RewardClient
from server.config import Limits, PoolConfig, ServerConfig
from server.service import create_server
from server.types import ScoreItem

TOKEN = "s3cret-token"
BODY = {
    "query": ["Q: 2+2? A: so \\boxed{4}", "Q: 2+2? A: \\boxed{5}", "Q: x? A: \\boxed{2x^2}"],
    "prompts": ["Q: 2+2? A:", "Q: 2+2? A:", "Q: x? A:"],
    "labels": ["4", "4", "2*x**2"],
}


@pytest.fixture(scope="module")
def server():
    limits = Limits(max_batch_items=8)
    cfg = ServerConfig(
        port=0,
        metrics_port=None,
        http_port=0,
        auth_token=TOKEN,
        pool=PoolConfig(workers=1, limits=limits, max_queue_items=64),
    )
    srv, _ = create_server(cfg)
    yield srv
    srv.stop(grace=1.0)


def post(server, body=None, data=None, token: str | None = TOKEN) -> tuple[int, dict]:
    async def go():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"http://127.0.0.1:{server.http_port}/get_reward"
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, json=body, data=data, headers=headers) as r,
        ):
            return r.status, await r.json()

    return asyncio.run(go())


def test_rewards_match_grpc(server):
    status, reply = post(server, BODY)
    assert status == 200, reply
    items = [
        ScoreItem(str(i), q[len(p) :], (g,))
        for i, (q, p, g) in enumerate(
            zip(BODY["query"], BODY["prompts"], BODY["labels"], strict=True)
        )
    ]
    with RewardClient(f"127.0.0.1:{server.port}", token=TOKEN) as client:
        want = client.score(items)
    assert reply["rewards"] == [r.reward for r in want] == [1.0, 0.0, 1.0]
    assert reply["scores"] == reply["rewards"]
    assert reply["extra_logs"]["acc"] == [1.0, 0.0, 1.0]
    assert reply["extra_logs"]["status_wrong"] == [0.0, 1.0, 0.0]


def test_signed_scheme_from_body(server):
    status, reply = post(server, {**BODY, "reward_scheme": "signed"})
    assert status == 200 and reply["rewards"] == [1.0, -1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs,code,words",
    [
        ({"body": BODY, "token": None}, 401, "missing bearer token"),
        ({"body": BODY, "token": "wrong-token"}, 401, "invalid bearer token"),
        ({"data": b"{not json"}, 400, "not JSON"),
        ({"body": [1, 2]}, 400, "JSON object"),
        ({"body": {**BODY, "labels": ["4"]}}, 400, "one length"),
        ({"body": {**BODY, "answer_format": "python"}}, 400, "answer_format"),
        ({"body": {k: v * 3 for k, v in BODY.items()}}, 413, "max_batch_items is 8"),
    ],
)
def test_bad_requests_say_what_is_wrong(server, kwargs, code, words):
    status, reply = post(server, **kwargs)
    assert status == code
    assert words in reply["error"]
