"""Reward-server addresses: one ``host:port`` or several, and the gRPC target they make.

A client may be given several replicas of the reward server, as ``"h1:p1,h2:p2"`` or a
list. One address is passed to gRPC as is (its own DNS resolver, ``pick_first``: the
behaviour of a single server). Several become one channel target of gRPC's static
resolvers, ``ipv4:a:p1,b:p2`` (or ``ipv6:[a]:p1,...``), with gRPC's own ``round_robin``
load balancing in the service config: each RPC goes to the next connected replica, and a
replica whose connection fails is left out until it reconnects. Host names are resolved
here, once, when the client is created (the static resolvers take IP addresses only); a
replica that moves to another IP needs a new client.

Example:
    >>> parse_addresses("10.0.0.1:50051, 10.0.0.2:50051")
    ('10.0.0.1:50051', '10.0.0.2:50051')
    >>> grpc_target(("10.0.0.1:50051", "10.0.0.2:50052"))
    'ipv4:10.0.0.1:50051,10.0.0.2:50052'
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Sequence

# gRPC's own target schemes; a single target written in one is passed to gRPC unchecked.
_GRPC_URI = re.compile(r"^(dns|unix|unix-abstract|ipv4|ipv6|vsock):")

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
"""gRPC service config that spreads RPCs over every connected address of the target."""


def split_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as ``(host, port)``; IPv6 brackets removed.

    Raises:
        ValueError: Naming ``address`` and the expected form.
    """
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or "," in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"reward server address {address!r} must look like host:port "
            "(e.g. 127.0.0.1:50051 or [::1]:50051)"
        )
    return host, int(port)


def parse_addresses(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Split and check a reward-server address list.

    Args:
        spec: ``"host:port"``, ``"h1:p1,h2:p2"`` (a ``grpc://`` prefix on each is
            allowed), or a sequence of such strings. A single gRPC target URI
            (``unix:/path``, ``dns:///host:port``, ``ipv4:...``) is kept as it is.

    Returns:
        The addresses, stripped, in order.

    Raises:
        ValueError: The list is empty, an address is malformed or one is listed twice;
            the message names it.
    """
    if isinstance(spec, str) and _GRPC_URI.match(spec.strip()):
        return (spec.strip(),)
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    addresses = tuple(p.strip().removeprefix("grpc://") for p in parts)
    if not any(addresses):
        raise ValueError(f"no reward server address given (got {spec!r}); expected host:port")
    for a in addresses:
        if not a:
            raise ValueError(f"empty entry in the reward server address list {spec!r}")
        split_host_port(a)
    if len(set(addresses)) != len(addresses):
        twice = sorted({a for a in addresses if addresses.count(a) > 1})
        raise ValueError(f"reward server address {twice[0]!r} is listed twice in {spec!r}")
    return addresses


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 literal (not a name to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP for ``host``: the literal itself, else the first IPv4 answer, else IPv6."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"cannot resolve reward server host {host!r}: {e}") from None
    ips = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    return next((ip for ip in ips if ip.version == 4), ips[0])


def grpc_target(addresses: Sequence[str]) -> str:
    """The channel target of ``addresses`` (from ``parse_addresses``).

    One address: unchanged. Several: ``ipv4:ip:port,...`` or ``ipv6:[ip]:port,...``
    after resolving host names (use with the ``ROUND_ROBIN`` service config).

    Raises:
        ValueError: A host name does not resolve, or the addresses mix IPv4 and IPv6
            (gRPC's static resolvers take one family per target).
    """
    if len(addresses) == 1:
        return addresses[0]
    hosts = [split_host_port(a) for a in addresses]
    ips = [(_resolve(h, p), p) for h, p in hosts]
    versions = {ip.version for ip, _ in ips}
    if len(versions) > 1:
        raise ValueError(
            f"reward server addresses {', '.join(addresses)} mix IPv4 and IPv6; "
            "list replicas of one family"
        )
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{p}" for ip, p in ips)
    return "ipv6:" + ",".join(f"[{ip}]:{p}" for ip, p in ips)
