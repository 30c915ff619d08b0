"""Reward-server address lists: parsing, the gRPC target, and errors that name the address."""

from __future__ import annotations

import grpc
import pytest

from fipo_env.verifiers import make_verifier
from server.addresses import grpc_target, parse_addresses
from server.client import AsyncRewardClient, RewardClient, RewardError
from server.launch import RewardServerError, wait_reward_server
from server.types import ScoreItem


def test_one_address_is_kept_as_it_is():
    assert parse_addresses("localhost:50051") == ("localhost:50051",)
    assert grpc_target(("localhost:50051",)) == "localhost:50051"
    assert parse_addresses("unix:/tmp/reward.sock") == ("unix:/tmp/reward.sock",)


def test_a_list_becomes_one_round_robin_target_of_ips():
    assert parse_addresses(" 10.0.0.1:1, grpc://10.0.0.2:2 ") == ("10.0.0.1:1", "10.0.0.2:2")
    assert parse_addresses(["10.0.0.1:1", "10.0.0.2:2,10.0.0.3:3"])[2] == "10.0.0.3:3"
    assert grpc_target(("10.0.0.1:1", "10.0.0.2:2")) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert grpc_target(("[::1]:1", "[::1]:2")) == "ipv6:[::1]:1,[::1]:2"
    # Host names are resolved (the static resolvers take IPs only), IPv4 first.
    assert grpc_target(("localhost:7001", "127.0.0.1:7002")) == "ipv4:127.0.0.1:7001,127.0.0.1:7002"


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "no reward server address"),
        (" , ", "no reward server address"),
        ([], "no reward server address"),
        ("127.0.0.1:1,", "empty entry"),
        ("127.0.0.1:1,localhost", "'localhost'"),
        ("127.0.0.1:1,host:port", "'host:port'"),
        ("127.0.0.1:99999", "'127.0.0.1:99999'"),
        (":50051", "':50051'"),
        ("127.0.0.1:1,127.0.0.1:1", "listed twice"),
    ],
)
def test_bad_address_lists_are_refused_by_name(spec, named):
    with pytest.raises(ValueError, match=named):
        parse_addresses(spec)
    with pytest.raises(ValueError, match=named):
        RewardClient(spec)


def test_unresolvable_host_and_mixed_families_are_named():
    with pytest.raises(
        ValueError, match="cannot resolve reward server host 'no-such-host.invalid'"
    ):
        RewardClient("127.0.0.1:1,no-such-host.invalid:2")
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        grpc_target(("127.0.0.1:1", "[::1]:2"))


def test_no_replica_reachable_names_every_address(unused_ports):
    a, b = (f"127.0.0.1:{p}" for p in unused_ports)
    item = ScoreItem("q", "\\boxed{4}", ("4",))
    with RewardClient(f"{a},{b}", max_retries=1, backoff_s=0.01) as client:
        with pytest.raises(RewardError) as err:
            client.score([item], timeout_s=10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert a in str(err.value) and b in str(err.value)
        assert client.stats().failovers == 1 and client.stats().requests == 2
    with (
        AsyncRewardClient([a, b], max_retries=0) as client,
        pytest.raises(RewardError, match=f"any of {a}, {b}"),
    ):
        client.score([item], timeout_s=10)
    with pytest.raises(RewardServerError, match=a):
        wait_reward_server(f"{a},{b}", timeout_s=1)


def test_make_verifier_takes_a_list_and_names_a_bad_one():
    client, owned = make_verifier("127.0.0.1:1,127.0.0.1:2")
    assert owned and client.addresses == ("127.0.0.1:1", "127.0.0.1:2")
    client.close()
    with pytest.raises(ValueError, match="'127.0.0.1:x'"):
        make_verifier("127.0.0.1:1,127.0.0.1:x")


@pytest.fixture
def unused_ports() -> tuple[int, int]:
    """Two ports nothing listens on (bound and released by the OS's choice)."""
    import socket

    ports = []
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return tuple(ports)
