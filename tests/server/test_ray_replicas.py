"""Reward-server replicas on a local Ray instance: score, lose a replica, clean up.

After each test no reward server and no Ray process started here is left (psutil).
"""

from __future__ import annotations

import time

import psutil
import pytest

from server.client import RewardClient
from server.types import ScoreItem, Status

ray = pytest.importorskip("ray")

from server.ray_replicas import RewardReplicas  # noqa: E402


def _items(n: int, start: int = 0) -> list[ScoreItem]:
    return [
        ScoreItem(f"q{i}", f"\\boxed{{{i + 1}}}", (str(i + 1),)) for i in range(start, start + n)
    ]


def _all_ok(results) -> bool:
    return all(r.status == Status.OK and r.reward == 1.0 for r in results)


def _gone(pids: set[int], timeout_s: float = 30.0) -> list[str]:
    """Those of ``pids`` still running after ``timeout_s`` (name and command line)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                cmd = " ".join(p.cmdline())
                # multiprocessing's resource tracker and forkserver live as long as this
                # interpreter, by design: not something a test left behind.
                helper = "resource_tracker" in cmd or "forkserver import main" in cmd
                if p.status() != psutil.STATUS_ZOMBIE and not helper:
                    left.append(f"{pid} {cmd[:120]}")
            except psutil.NoSuchProcess:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture
def local_ray():
    """A local Ray instance with 2 CPUs; yields the pids of every process it and the
    replicas start (Ray's own, its workers and the reward servers), checked gone after."""
    # "local": a new instance of our own, never a cluster another process started here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    me = psutil.Process()
    earlier = {p.pid for p in me.children(recursive=True)}  # another module's, or helpers
    seen: set[int] = set()

    def track(extra=()) -> None:
        seen.update(p.pid for p in me.children(recursive=True) if p.pid not in earlier)
        seen.update(extra)

    try:
        yield track
    finally:
        track()
        ray.shutdown()
    left = _gone(seen)
    assert not left, f"left running after ray.shutdown(): {left}"  # zombies count as gone


def test_replicas_score_and_survive_a_dead_one(local_ray):
    with RewardReplicas(2, cpus_per_replica=1, strategy="SPREAD", grace_s=2) as replicas:
        local_ray(replicas.server_pids())
        assert len(replicas.addresses) == 2 and len(set(replicas.addresses)) == 2
        with RewardClient(replicas.address, batch_size=4, backoff_s=0.05) as client:
            items = _items(40)
            assert _all_ok(client.score(items, timeout_s=60))
            replicas.kill(1)
            items = _items(40, start=100)
            assert _all_ok(client.score(items, timeout_s=60))
            assert replicas.live_addresses() == replicas.addresses[:1]
            assert client.stats().requests >= 20


def test_a_restarted_replica_comes_back_on_its_fixed_port(local_ray):
    import socket

    with socket.socket() as s:  # a base port with room for two replicas, free now
        s.bind(("", 0))
        port = s.getsockname()[1]
    if port > 65000:
        port -= 1000
    replicas = RewardReplicas(2, port=port, max_restarts=1, grace_s=1)
    try:
        local_ray(replicas.server_pids())
        first = replicas.addresses
        assert [int(a.rsplit(":", 1)[1]) for a in first] == [port, port + 1]
        with RewardClient(replicas.address, batch_size=4, backoff_s=0.05) as client:
            replicas.kill(0, restart=True)
            assert _all_ok(client.score(_items(20), timeout_s=60))
            deadline = time.monotonic() + 60
            while replicas.live_addresses(timeout_s=30) != first:
                assert time.monotonic() < deadline, replicas.live_addresses()
                time.sleep(0.5)
            local_ray(replicas.server_pids())
            # The old channel reconnects to the restarted server on its own.
            before = client.stats().requests
            assert _all_ok(client.score(_items(40, start=50), timeout_s=60))
            assert client.stats().requests > before
    finally:
        replicas.close()


@pytest.mark.slow  # two raylets: ~25 s on 2 shared cores
def test_spread_over_two_simulated_nodes():
    from ray.cluster_utils import Cluster
    from ray.util import placement_group_table

    me = psutil.Process()
    earlier = {p.pid for p in me.children(recursive=True)}
    cluster = Cluster(initialize_head=False)
    seen: set[int] = set()
    try:
        cluster.add_node(num_cpus=1)  # the head: started inside try, so always shut down
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        with RewardReplicas(2, strategy="STRICT_SPREAD", grace_s=1) as replicas:
            seen.update(replicas.server_pids())
            nodes = placement_group_table(replicas.placement_group)["bundles_to_node_id"]
            assert len(set(nodes.values())) == 2  # one replica per node
            with RewardClient(replicas.address, batch_size=2) as client:
                assert _all_ok(client.score(_items(8), timeout_s=60))
                replicas.kill(0)
                assert _all_ok(client.score(_items(8, start=10), timeout_s=60))
            seen.update(p.pid for p in me.children(recursive=True))
    finally:
        seen.update(p.pid for p in me.children(recursive=True))
        seen -= earlier
        ray.shutdown()
        cluster.shutdown()
    left = _gone(seen)
    assert not left, f"left running after the cluster's shutdown: {left}"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        RewardReplicas(0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        RewardReplicas(2, strategy="RANDOM")
    if not ray.is_initialized():
        with pytest.raises(RuntimeError, match=r"call ray.init"):
            RewardReplicas(1)
