"""Reward-server replicas on a Ray cluster: M ``python -m server`` processes, one per actor.

Each replica is a Ray actor that owns one reward-server child process started by
``server.launch.start_reward_server`` (the existing server, its command line and its log
line), bound to its node's IP. The actors sit in one placement group (one bundle of
``cpus_per_replica`` CPUs each, ``PACK`` or ``SPREAD`` over the nodes), so the CPUs the
server's math-verify workers use are reserved. Clients reach the replicas directly over
gRPC: ``RewardClient(replicas.address)`` spreads requests over all of them with gRPC's
``round_robin`` balancer and re-sends a request whose replica died (``server.client``);
Ray carries no reward traffic.

What happens when a replica dies:

* Its actor process is gone; the server child gets SIGTERM (``PR_SET_PDEATHSIG``) and
  drains for at most ``grace_s``: it refuses new RPCs (UNAVAILABLE, so the client re-sends
  them to another replica and counts a failover) and finishes the ones it holds. A server
  killed outright (a lost node) fails its in-flight RPCs with UNAVAILABLE instead; they
  are re-sent the same way. Scoring goes on with the replicas left.
* With ``max_restarts > 0`` Ray restarts the actor in the same placement-group bundle,
  which starts a new server. With a fixed ``port``, replica ``i`` always binds
  ``port + i`` on its node (retrying while the old server still holds it), so an
  existing client's channel reconnects to it by itself. With ``port=0`` (the default)
  the new server has a new free port: clients created before do not see it and go on
  with the others; ``live_addresses()`` returns the current ones for a new client. If
  the bundle's node is lost, the bundle (and the replica) moves to another node, whose
  IP no existing client knows: make a new client from ``live_addresses()``.

Ray is imported when a ``RewardReplicas`` is created, never at ``import server``.

Example:
    >>> import ray                                                    # doctest: +SKIP
    >>> ray.init(num_cpus=2)
    >>> with RewardReplicas(2) as replicas, RewardClient(replicas.address) as client:
    ...     client.score(items)
    >>> ray.shutdown()
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from server.launch import RewardServerError, start_reward_server, stop_process, wait_reward_server

if TYPE_CHECKING:
    import ray.actor
    from ray.util.placement_group import PlacementGroup

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class _Replica:
    """Ray actor body: one reward server child process on this node.

    Args:
        index: Replica number (names the log file; offsets a fixed port).
        workers: math-verify worker processes of the server.
        port: Fixed base port (``port + index`` is bound) or 0 for a free one.
        log_dir: Folder for the server's log on this node; empty: the system temp dir.
        grace_s: The server's drain time on SIGTERM.
        start_timeout_s: How long to wait for the server (and for a fixed port to free).
    """

    def __init__(
        self,
        index: int,
        workers: int,
        port: int,
        log_dir: str,
        grace_s: float,
        start_timeout_s: float,
    ) -> None:
        import ray

        host = ray.util.get_node_ip_address()
        folder = Path(log_dir or tempfile.gettempdir()) / "fipo-reward-replicas"
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"replica-{index}-{os.getpid()}.log"
        args = ("--no-metrics", "--grace", str(grace_s))
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                self._proc, self._address = start_reward_server(
                    workers,
                    log,
                    max(1.0, deadline - time.monotonic()),
                    host=host,
                    port=port + index if port else 0,
                    extra_args=args,
                )
                break
            except RewardServerError:
                # A restarted replica's fixed port may still be held by the old server,
                # which drains for up to grace_s after its actor died.
                if not port or time.monotonic() + 1.0 > deadline:
                    raise
                time.sleep(1.0)
        wait_reward_server(self._address, timeout_s=max(1.0, deadline - time.monotonic()))

    def address(self) -> str:
        """``node_ip:port`` of this replica's server."""
        return self._address

    def server_pid(self) -> int:
        """Process id of the server (on this replica's node)."""
        return self._proc.pid

    def stop(self) -> None:
        """Drain and stop the server (SIGTERM, then SIGKILL after 20 s)."""
        stop_process(self._proc)


class RewardReplicas:
    """M reward-server replicas as Ray actors in one placement group.

    Needs a running Ray (``ray.init(...)`` or a cluster address) in this process.

    Args:
        num_replicas: How many replicas (M >= 1).
        workers_per_replica: math-verify worker processes per server.
        cpus_per_replica: CPUs reserved per replica (its placement-group bundle and
            the actor's ``num_cpus``); give the server's workers a CPU each.
        strategy: Placement-group strategy: ``PACK`` (as few nodes as possible),
            ``SPREAD`` (over nodes, best effort), ``STRICT_PACK`` or ``STRICT_SPREAD``.
        port: 0: each server binds a free port. Otherwise replica ``i`` binds
            ``port + i`` on its node, also after a restart (see the module docstring).
        max_restarts: How often Ray restarts a dead replica actor (0 = never).
        grace_s: A server's drain time when its actor dies or on ``close()``.
        start_timeout_s: How long to wait for the placement group and the servers.
        log_dir: Folder (on every node) for the servers' logs; empty: the node's temp
            dir, ``<tmp>/fipo-reward-replicas/replica-<i>-<actor pid>.log``.

    Raises:
        ValueError: A bad argument (the message names it).
        RuntimeError: Ray is not initialised.
        RewardServerError: The placement group or a server did not come up in
            ``start_timeout_s``; nothing started is left running.

    Attributes:
        addresses: ``node_ip:port`` of each replica, as started.
        address: The same, comma-joined: a ``RewardClient`` address or a trainer's
            ``rollout.reward_address``.
    """

    def __init__(
        self,
        num_replicas: int,
        *,
        workers_per_replica: int = 1,
        cpus_per_replica: float = 1.0,
        strategy: Strategy = "PACK",
        port: int = 0,
        max_restarts: int = 0,
        grace_s: float = 5.0,
        start_timeout_s: float = 180.0,
        log_dir: str = "",
    ) -> None:
        def need(ok: bool, name: str, rule: str, value: object) -> None:
            if not ok:
                raise ValueError(f"RewardReplicas {name} {rule} (got {value!r})")

        need(num_replicas >= 1, "num_replicas", "must be >= 1", num_replicas)
        need(workers_per_replica >= 1, "workers_per_replica", "must be >= 1", workers_per_replica)
        need(cpus_per_replica > 0, "cpus_per_replica", "must be > 0", cpus_per_replica)
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        need(strategy in strategies, "strategy", f"must be one of {strategies}", strategy)
        need(
            port == 0 or (port >= 1024 and port + num_replicas <= 65536),
            "port",
            "must be 0 (free ports) or a base port with port + num_replicas <= 65536",
            port,
        )
        need(max_restarts >= 0, "max_restarts", "must be >= 0", max_restarts)
        need(grace_s >= 0, "grace_s", "must be >= 0", grace_s)

        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise RuntimeError("RewardReplicas needs Ray: call ray.init(...) first")
        self._actors: list[ray.actor.ActorHandle] = []
        self._pg: PlacementGroup | None = placement_group(
            [{"CPU": cpus_per_replica}] * num_replicas, strategy=strategy
        )
        try:
            if not self._wait(self._pg.ready(), start_timeout_s):
                raise RewardServerError(
                    f"the placement group of {num_replicas} x {{CPU: {cpus_per_replica}}} "
                    f"({strategy}) was not placed within {start_timeout_s:.0f} s; free CPUs "
                    f"in the cluster: {ray.available_resources().get('CPU', 0)}"
                )
            replica = ray.remote(_Replica)
            for i in range(num_replicas):
                bundle = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
                self._actors.append(
                    replica.options(
                        num_cpus=cpus_per_replica,
                        max_restarts=max_restarts,
                        scheduling_strategy=bundle,
                    ).remote(i, workers_per_replica, port, log_dir, grace_s, start_timeout_s)
                )
            addresses = self._wait([a.address.remote() for a in self._actors], start_timeout_s)
            if addresses is None:
                raise RewardServerError(
                    f"{num_replicas} reward-server replicas did not start within "
                    f"{start_timeout_s:.0f} s"
                )
        except BaseException:
            self.close()
            raise
        self.addresses: tuple[str, ...] = tuple(addresses)
        self.address = ",".join(self.addresses)

    @staticmethod
    def _wait(refs, timeout_s: float):
        """``ray.get(refs)``, or None after ``timeout_s``; a replica that failed to start
        raises ``RewardServerError`` with Ray's report of why."""
        import ray

        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            return None
        except ray.exceptions.RayActorError as e:
            raise RewardServerError(f"a reward-server replica failed to start: {e}") from None

    @property
    def placement_group(self) -> PlacementGroup | None:
        """The replicas' placement group (bundle ``i`` holds replica ``i``); None once closed."""
        return self._pg

    def __len__(self) -> int:
        return len(self._actors)

    def live_addresses(self, timeout_s: float = 10.0) -> tuple[str, ...]:
        """Addresses of the replicas whose actor answers now (a restarted one's new port).

        Args:
            timeout_s: How long to wait for each actor (a restarting one may take this).
        """
        import ray

        live = []
        for a in self._actors:
            try:
                live.append(ray.get(a.address.remote(), timeout=timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
        return tuple(live)

    def server_pids(self) -> list[int]:
        """Process ids of the live replicas' servers (each on its own node)."""
        import ray

        return ray.get([a.server_pid.remote() for a in self._actors], timeout=30)

    def kill(self, index: int, *, restart: bool = False) -> None:
        """Kill replica ``index``'s actor, as a crash would (for tests).

        Its server drains for ``grace_s`` and exits; with ``restart=True`` and
        ``max_restarts > 0`` Ray restarts the replica (see the module docstring).
        """
        import ray

        ray.kill(self._actors[index], no_restart=not restart)

    def close(self) -> None:
        """Stop every server, kill the actors and remove the placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        stops = []
        for a in self._actors:
            try:
                stops.append(a.stop.remote())
            except ray.exceptions.RayActorError:
                continue
        for ref in stops:
            try:
                ray.get(ref, timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # a dead replica's server drains and exits on its own
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> RewardReplicas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
