"""Any gRPC client: a client that knows nothing but the server's address scores items.

Like ``grpcurl`` (docs/server.md), the client script below learns the service, its methods
and its message types from the server's reflection service, builds the request from JSON
with ``google.protobuf``'s dynamic message classes and prints the reply as JSON. It runs in
a fresh interpreter and checks that no module of this project (``server``, whose
``server.gen`` holds the generated code) was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.config import PoolConfig, ServerConfig
from server.service import create_server

TOKEN = "reflect-token"

CLIENT = r"""
import collections, json, sys
import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

address, token, request_json = sys.argv[1], sys.argv[2], sys.argv[3]


class Details(collections.namedtuple(
        "Details", "method timeout metadata credentials wait_for_ready compression"),
        grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    # grpcurl's -H 'authorization: Bearer ...': on every call, reflection included.
    def _with_token(self, d):
        metadata = [*(d.metadata or ()), ("authorization", f"Bearer {token}")]
        return Details(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready,
                       d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


channel = grpc.intercept_channel(grpc.insecure_channel(address), BearerToken())
reflection = ProtoReflectionDescriptorDatabase(channel)
services = reflection.get_services()
pool = descriptor_pool.DescriptorPool(reflection)
service = pool.FindServiceByName("fipo.v1.RewardService")
out = {"services": sorted(services), "methods": sorted(m.name for m in service.methods)}
for name, body in (("GetServerInfo", "{}"), ("Score", request_json)):
    method = service.FindMethodByName(name)
    request_cls = message_factory.GetMessageClass(method.input_type)
    reply_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{service.full_name}/{name}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=reply_cls.FromString,
    )
    reply = call(json_format.Parse(body, request_cls()), timeout=60)
    out[name] = json_format.MessageToDict(reply)
out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("server", "trainer", "fipo_env"))
print(json.dumps(out))
"""

REQUEST = {
    "items": [
        {"id": "a", "response": "so \\boxed{4}", "golds": ["4"]},
        {
            "id": "b",
            "response": "\\boxed{5}",
            "golds": ["4"],
            "rewardScheme": "REWARD_SCHEME_SIGNED",
        },
        {"id": "c", "response": "\\boxed{x^2}", "golds": ["x**2"]},
    ]
}


@pytest.fixture(scope="module")
def address():
    cfg = ServerConfig(port=0, metrics_port=None, auth_token=TOKEN, pool=PoolConfig(workers=1))
    server, port = create_server(cfg)
    yield f"127.0.0.1:{port}"
    server.stop(grace=1.0)


def test_scoring_through_reflection_alone(address, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, address, TOKEN, json.dumps(REQUEST)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["project_modules"] == []  # no generated code, no project client
    assert "fipo.v1.RewardService" in out["services"]
    assert out["methods"] == ["GetServerInfo", "Score", "ScoreStream"]
    assert out["GetServerInfo"]["authRequired"] is True
    results = out["Score"]["results"]
    assert [r["id"] for r in results] == ["a", "b", "c"]
    assert [r["status"] for r in results] == ["STATUS_OK", "STATUS_WRONG", "STATUS_OK"]
    assert [r.get("reward", 0.0) for r in results] == [1.0, -1.0, 1.0]
