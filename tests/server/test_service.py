"""A real gRPC server on port 0: API, hostile corpus, limits, health, reflection, metrics."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from server.client import RewardClient, RewardError
from server.config import Limits, PoolConfig, ServerConfig
from server.convert import item_to_pb
from server.gen.fipo.v1 import reward_pb2 as pb
from server.service import create_server
from server.types import AnswerFormat, ScoreItem, Status

from .conftest import item


def _wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server():
    srv, port = create_server(
        ServerConfig(port=0, metrics_port=0, pool=PoolConfig(workers=2, default_deadline_s=10.0))
    )
    yield srv, f"127.0.0.1:{port}"
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def client(server):
    with RewardClient(server[1], batch_size=16) as c:
        yield c


def test_score_batch_in_order(client):
    items = [item(f"\\boxed{{{i}}}", "7", id=f"q{i}") for i in range(40)]
    results = client.score(items)
    assert [r.id for r in results] == [f"q{i}" for i in range(40)]
    assert [r.status for r in results] == [Status.OK if i == 7 else Status.WRONG for i in range(40)]
    assert results[7].reward == 1.0 and results[7].extracted_prediction == "7"


def test_stream_results_match_by_id(client):
    items = [item(f"\\boxed{{{i % 4}}}", "2", id=f"s{i}") for i in range(30)]
    got = {r.id: r for r in client.score_stream(iter(items))}
    assert set(got) == {f"s{i}" for i in range(30)}
    assert all(got[f"s{i}"].correct is (i % 4 == 2) for i in range(30))


def test_server_info(client):
    info = client.server_info()
    assert info.workers == 2 and info.live_workers == 2
    assert info.math_verify_version == "0.9.0"
    assert info.limits.max_batch_items == Limits().max_batch_items
    assert info.verifier.exact_numeric_recheck and not info.auth_required


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server[1]) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "fipo.v1.RewardService" in db.get_services()


def test_health_serving(client):
    assert client.health() == "SERVING"
    assert client.health("fipo.v1.RewardService") == "SERVING"


HOSTILE_RESPONSES = {
    "empty": ("", Status.NO_ANSWER),
    "nul": ("\\boxed{1}\x00", Status.INVALID),
    "megabyte": ("x" * 1_000_000, Status.INPUT_TOO_LARGE),
    "tower": ("\\boxed{2^{2^{2^{2^{2}}}}}", Status.INPUT_TOO_LARGE),
    "braces": ("{" * 5000 + "}" * 5000, Status.INPUT_TOO_LARGE),
    "factorial": ("\\boxed{99999!}", Status.INPUT_TOO_LARGE),
    "malformed1": ("\\boxed{\\frac{1}{", Status.NO_ANSWER),
    "malformed2": ("$$ \\left( \\right $$ \\boxed{}", Status.NO_ANSWER),
    "malformed3": ("\\boxed{\\sqrt[}{}}", Status.NO_ANSWER),
}


def test_hostile_corpus_gets_statuses(client):
    items = [item(resp, "1", id=name) for name, (resp, _) in HOSTILE_RESPONSES.items()]
    items.append(ScoreItem("no-gold", "\\boxed{1}", ()))
    items.append(item("\\boxed{1}", "\\frac{", id="bad-gold"))
    results = {r.id: r for r in client.score(items)}
    for name, (_, expected) in HOSTILE_RESPONSES.items():
        r = results[name]
        # Malformed LaTeX may legitimately be read as some other (wrong) answer.
        allowed = {expected, Status.WRONG} if name.startswith("malformed") else {expected}
        assert r.status in allowed, (name, r)
        if r.status in (Status.INVALID, Status.INPUT_TOO_LARGE):
            assert r.message, name
    assert results["no-gold"].status is Status.INVALID and "gold" in results["no-gold"].message
    assert results["bad-gold"].status is Status.GOLD_UNPARSABLE
    assert client.health() == "SERVING"


def test_invalid_utf8_is_reported_per_item(server):
    good = pb.ScoreItem(id="good", response="\\boxed{1}", golds=["1"])
    bad = pb.ScoreItem(id="bad", response="XX", golds=["1"])
    raw = pb.ScoreRequest(items=[good, bad]).SerializeToString().replace(b"XX", b"\xff\xfe")
    with grpc.insecure_channel(server[1]) as ch:
        call = ch.unary_unary(
            "/fipo.v1.RewardService/Score",
            request_serializer=lambda b: b,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        resp = call(raw, timeout=30)
    assert [r.id for r in resp.results] == ["good", "bad"]
    assert resp.results[0].status == pb.STATUS_OK
    assert resp.results[1].status == pb.STATUS_INVALID and "UTF-8" in resp.results[1].message


def test_unknown_enum_is_invalid(server):
    msg = pb.ScoreItem(id="e", response="\\boxed{1}", golds=["1"], answer_format=42)
    with grpc.insecure_channel(server[1]) as ch:
        stub_call = ch.unary_unary(
            "/fipo.v1.RewardService/Score",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        (r,) = stub_call(pb.ScoreRequest(items=[msg]), timeout=30).results
    assert r.status == pb.STATUS_INVALID and "answer_format" in r.message


def test_formats_and_schemes(client):
    from server.types import RewardScheme

    rs = client.score(
        [
            item("The answer is (B).", "B", answer_format=AnswerFormat.CHOICE),
            item("x = 3/4", "0.75", answer_format=AnswerFormat.EXPR),
            item("\\boxed{5}", "4", reward_scheme=RewardScheme.SIGNED),
            item(
                "\\boxed{4}", "4", response_tokens=95, max_response_tokens=100, overlong_buffer=10
            ),
        ]
    )
    assert [r.status for r in rs[:2]] == [Status.OK, Status.OK]
    assert rs[2].reward == -1.0
    assert rs[3].reward == pytest.approx(0.5) and rs[3].overlong_penalty == pytest.approx(-0.5)


def test_metrics_endpoint(server, client):
    client.score([item("\\boxed{3}", "3", id="m")])
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server[0].metrics_port}/metrics").read().decode()
    )
    for name in (
        "fipo_reward_items_total",
        "fipo_reward_stage_seconds_bucket",
        "fipo_reward_queue_depth",
        "fipo_reward_live_workers 2.0",
        "fipo_reward_cache_hit_ratio",
        "fipo_reward_worker_events_total",
        'fipo_reward_rpcs_total{code="OK",method="Score"}',
    ):
        assert name in text, name


# -------------------------------------------------------------------- a small, strict server


@pytest.fixture(scope="module")
def small():
    limits = Limits(
        max_batch_items=8,
        max_message_bytes=256 * 1024,
        max_power_digits=10**12,
        max_exponent=10**12,
        max_tower_height=5,
    )
    cfg = ServerConfig(
        port=0,
        metrics_port=None,
        retry_after_ms=50,
        pool=PoolConfig(
            workers=1,
            max_queue_items=8,
            max_extra_workers=0,
            default_deadline_s=2.0,
            result_cache_size=0,
            limits=limits,
        ),
    )
    srv, port = create_server(cfg)
    yield srv, f"127.0.0.1:{port}"
    srv.stop(grace=1)


def test_batch_limit_is_invalid_argument(small):
    with (
        RewardClient(small[1], batch_size=100, max_retries=0) as c,
        pytest.raises(RewardError) as e,
    ):
        c.score([item("\\boxed{1}", "1")] * 9)
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT and "max_batch_items" in e.value.details


def test_message_size_limit(small):
    with RewardClient(small[1], max_retries=0) as c, pytest.raises(RewardError) as e:
        c.score([item("y" * 300_000, "1")])
    assert e.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_overload_then_recovery(small):
    srv, address = small
    slow = [item("\\boxed{7^{7^{8}}}", "1", id=f"slow{i}", deadline_s=0.5) for i in range(8)]
    with grpc.insecure_channel(address) as ch:
        stub_score = ch.unary_unary(
            "/fipo.v1.RewardService/Score",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        busy = stub_score.future(pb.ScoreRequest(items=[item_to_pb(i) for i in slow]), timeout=120)
        assert _wait_for(lambda: srv.pool.queue_depth() == 8)
        with pytest.raises(grpc.RpcError) as e:
            stub_score(pb.ScoreRequest(items=[item_to_pb(item("\\boxed{1}", "1"))]), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = dict(e.value.trailing_metadata())
        assert int(hint["retry-after-ms"]) >= 50 and "retry after" in e.value.details()
        # The retrying client gets through once the queue drains; nothing was dropped.
        with RewardClient(address, max_retries=100, backoff_s=0.05) as c:
            (r,) = c.score([item("\\boxed{1}", "1", id="after")])
        assert r.status is Status.OK
        assert [x.id for x in busy.result().results] == [f"slow{i}" for i in range(8)]


def test_kill_9_worker_mid_batch_then_serving_again(small):
    srv, address = small
    with RewardClient(address, batch_size=8) as c:
        items = [
            item(f"\\boxed{{(x+{i})^{{3}}}}", f"(x+{i % 2})^{{3}}", id=str(i)) for i in range(8)
        ]
        fut = c._stub.Score.future(
            pb.ScoreRequest(items=[item_to_pb(i) for i in items]), timeout=120
        )
        assert _wait_for(lambda: srv.pool.queue_depth() <= 7)  # mid-batch: some done, some not
        for pid in srv.pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        results = fut.result().results
        assert [r.id for r in results] == [str(i) for i in range(8)]
        assert all(r.status in (pb.STATUS_OK, pb.STATUS_WRONG) for r in results)
        assert [r.correct for r in results] == [i in (0, 1) for i in range(8)]
        assert _wait_for(lambda: c.health() == "SERVING" and srv.pool.live_workers() == 1)


def test_rpc_deadline_caps_item_work(small):
    """Items of a timed-out RPC stop costing workers: queued ones are dropped, the running
    one is cut at the RPC deadline (without that: 8 x 30 s of work)."""
    srv, address = small
    slow = [item("\\boxed{7^{7^{8}}}", "1", id=f"d{i}", deadline_s=30.0) for i in range(8)]
    with RewardClient(address, max_retries=0) as c:
        t0 = time.monotonic()
        try:
            results = c.score(slow, timeout_s=1.0)
        except RewardError as e:
            assert e.code is grpc.StatusCode.DEADLINE_EXCEEDED
        else:  # the server cut the items at the deadline and its answer won the race
            assert [r.status for r in results] == [Status.TIMEOUT] * len(slow)
        assert time.monotonic() - t0 < 10  # not 30 s of work for the first item
        assert _wait_for(lambda: srv.pool.queue_depth() == 0, timeout=60)
        (r,) = c.score([item("\\boxed{1}", "1", id="next")])
        assert r.status is Status.OK


def test_stream_reports_bad_items_without_breaking(server):
    good = pb.ScoreItem(id="good", response="\\boxed{1}", golds=["1"]).SerializeToString()
    bad = (
        pb.ScoreItem(id="bad", response="XX", golds=["1"])
        .SerializeToString()
        .replace(b"XX", b"\xc3\x28")
    )
    tower = pb.ScoreItem(id="tower", response="\\boxed{9^{9^{9^{9}}}}", golds=["1"])
    with grpc.insecure_channel(server[1]) as ch:
        call = ch.stream_stream(
            "/fipo.v1.RewardService/ScoreStream",
            request_serializer=lambda b: b,
            response_deserializer=pb.ScoreResult.FromString,
        )
        got = {r.id: r for r in call(iter([good, bad, tower.SerializeToString()]), timeout=60)}
    assert got["good"].status == pb.STATUS_OK
    assert got["bad"].status == pb.STATUS_INVALID and "UTF-8" in got["bad"].message
    assert got["tower"].status == pb.STATUS_INPUT_TOO_LARGE


def test_health_watch_sees_not_serving_when_draining():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv, port = create_server(ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=1)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="fipo.v1.RewardService"), timeout=60
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopper = threading.Thread(target=srv.stop, kwargs={"grace": 2.0})
            stopper.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stopper.join(timeout=60)
    finally:
        srv.stop(grace=0)
