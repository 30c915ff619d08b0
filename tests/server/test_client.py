"""Python clients against a real server: async client, retries, TRL reward function, Scorer."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from server.client import AsyncRewardClient, RewardClient, make_trl_reward_func
from server.config import PoolConfig, ServerConfig
from server.service import create_server
from server.types import RewardScheme, Scorer, Status

from .conftest import item


@pytest.fixture(scope="module")
def address():
    srv, port = create_server(ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=2)))
    yield f"127.0.0.1:{port}"
    srv.stop(grace=1)


def test_async_client(address):
    items = [item(f"\\boxed{{{i}}}", "3", id=str(i)) for i in range(20)]

    async def run(client: AsyncRewardClient):
        batch = await client.ascore(items)
        streamed = [r async for r in client.astream(items)]
        info = await client.aserver_info()
        return batch, streamed, info

    with AsyncRewardClient(address, batch_size=6) as client:
        batch, streamed, info = asyncio.run(run(client))
        blocking = client.score(items[:4])  # the Scorer protocol
    assert [r.id for r in batch] == [str(i) for i in range(20)]
    assert [r.correct for r in batch] == [i == 3 for i in range(20)]
    assert sorted(r.id for r in streamed) == sorted(str(i) for i in range(20))
    assert info.workers == 2
    assert [r.status for r in blocking] == [Status.WRONG] * 3 + [Status.OK]


def test_clients_and_pool_are_scorers_and_agree(address, pool):
    items = [
        item("\\boxed{\\frac{2}{4}}", "0.5"),
        item("\\boxed{1/3}", "0.3333"),
        item("nothing", "1"),
        item("\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}"),
    ]
    with RewardClient(address) as sync, AsyncRewardClient(address) as aio:
        scorers: list[Scorer] = [sync, aio, pool]
        outs = [[(r.status, r.reward) for r in s.score(items)] for s in scorers]
    assert outs[0] == outs[1] == outs[2]


def test_trl_reward_function(address):
    with RewardClient(address) as client:
        reward = make_trl_reward_func(
            client, gold_column="solution", reward_scheme=RewardScheme.SIGNED
        )
        assert reward.__name__ == "math_verify_reward"
        got = reward(
            prompts=["q1", "q2", "q3"],
            completions=[
                "so \\boxed{4}",
                [{"role": "assistant", "content": "the answer is \\boxed{5}"}],
                "no idea",
            ],
            solution=["4", "6", "1"],
            other_column=[1, 2, 3],
        )
        assert got == [1.0, -1.0, -1.0]
        with pytest.raises(KeyError, match="solution"):
            reward(prompts=["q"], completions=["x"], answer=["1"])


def test_retries_until_the_server_comes_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = {}

    def start_later():
        time.sleep(1.0)
        started["srv"] = create_server(
            ServerConfig(port=port, metrics_port=None, pool=PoolConfig(workers=1))
        )[0]

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with RewardClient(f"127.0.0.1:{port}", max_retries=50, backoff_s=0.2, timeout_s=120) as c:
            (r,) = c.score([item("\\boxed{9}", "9")])
        assert r.status is Status.OK
    finally:
        t.join()
        started["srv"].stop(grace=1)
