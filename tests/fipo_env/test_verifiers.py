"""Both verifier implementations give the same rewards: local pool vs real gRPC server."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import fipo_env
from fipo_env.verifiers import LocalVerifier, make_verifier
from server.config import PoolConfig, ServerConfig
from server.types import AnswerFormat, RewardScheme, ScoreItem


@pytest.fixture(scope="module")
def grpc_address():
    from server.service import create_server

    srv, port = create_server(ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=1)))
    yield f"127.0.0.1:{port}"
    srv.stop(grace=1.0)


ITEMS = [
    ScoreItem("boxed", "so \\boxed{14}", ("14",)),
    ScoreItem("plain", "The answer is 14", ("14",)),
    ScoreItem("wrong", "It is 15.", ("14",)),
    ScoreItem("none", "no idea", ("14",)),
    ScoreItem("frac", "\\boxed{\\frac{6}{8}}", ("\\frac{3}{4}",)),
    ScoreItem("poly", "\\boxed{x^2 + 5x + 6}", ("x^{2}+5x+6",)),
    ScoreItem("signed", "\\boxed{2}", ("3",), reward_scheme=RewardScheme.SIGNED),
    ScoreItem("expr", "x = 3/4", ("3/4",), answer_format=AnswerFormat.EXPR),
    ScoreItem(
        "overlong",
        "\\boxed{7}",
        ("7",),
        response_tokens=18,
        max_response_tokens=20,
        overlong_buffer=4,
    ),
    ScoreItem("empty-gold-ish", "\\boxed{1}", ("\\frac{",)),
]


def _key(r):
    return (r.id, r.reward, r.correct, r.status, r.overlong_penalty, r.extracted_prediction)


def test_make_verifier_specs(grpc_address, local_verifier):
    from server.client import RewardClient

    client, owned = make_verifier(grpc_address)
    assert isinstance(client, RewardClient) and owned
    client.close()
    client, _ = make_verifier("grpc://" + grpc_address)
    client.close()
    assert make_verifier(local_verifier) == (local_verifier, False)
    v, owned = make_verifier("local", workers=1)
    assert isinstance(v, LocalVerifier) and owned and v._pool is None  # started lazily
    with pytest.raises(TypeError, match="score"):
        make_verifier(object())


def test_same_items_same_results_local_and_grpc(grpc_address, local_verifier):
    client, _ = make_verifier(grpc_address)
    try:
        remote = client.score(ITEMS)
    finally:
        client.close()
    local = local_verifier.score(ITEMS)
    assert [_key(r) for r in local] == [_key(r) for r in remote]
    by_id = {r.id: r for r in local}
    assert by_id["boxed"].correct and by_id["plain"].correct and by_id["frac"].correct
    assert by_id["poly"].correct and by_id["expr"].correct
    assert by_id["wrong"].status.value == "WRONG" and by_id["none"].status.value == "NO_ANSWER"
    assert by_id["signed"].reward == -1.0
    assert by_id["overlong"].overlong_penalty == pytest.approx(-0.5)
    assert by_id["empty-gold-ish"].status.value == "GOLD_UNPARSABLE"


def test_vector_env_rewards_equal_through_either_verifier(
    tiny_tokenizer, grpc_address, local_verifier
):
    n = 8
    eos = tiny_tokenizer.eos_token_id
    outs = []
    for verifier in (local_verifier, grpc_address):
        venv = gym.make_vec(
            fipo_env.ENV_ID,
            num_envs=n,
            tokenizer=tiny_tokenizer,
            verifier=verifier,
            max_prompt_tokens=64,
            max_response_tokens=32,
            overlong_buffer=16,
        )
        _, infos = venv.reset(seed=21)
        filler = tiny_tokenizer(" a", add_special_tokens=False)["input_ids"][0]
        rows = []
        for i in range(n):
            gold = int(infos["gold"][i])
            boxed = tiny_tokenizer(f"\\boxed{{{gold + (i % 2)}}}", add_special_tokens=False)
            # 0 / 8 / 16 / 24 filler tokens: i % 4 == 2 ends at 20-24 tokens, inside the
            # overlong buffer (16..32), so its reward lies strictly between 0 and 1.
            rows.append(boxed["input_ids"] + [filler] * ((i % 4) * 8) + [eos])
        _, rewards, term, trunc, infos = venv.step_tokens(rows)
        outs.append((rewards, term, list(infos["final_info"]["status"])))
        venv.close()  # closes the gRPC client it created; the shared local pool stays
    (r_local, t_local, s_local), (r_grpc, t_grpc, s_grpc) = outs
    assert np.array_equal(r_local, r_grpc) and np.array_equal(t_local, t_grpc)
    assert s_local == s_grpc
    assert (r_local == 1).any() and (r_local == 0).any()
    assert ((r_local > 0) & (r_local < 1)).any()  # correct but soft-overlong-penalised
