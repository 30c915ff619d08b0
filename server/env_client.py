"""One ``RewardClient`` per process for reward functions that trainers load by path.

verl's custom reward functions and OpenRLHF's ``reward_func`` file are plain functions
called many times from several threads; each call must not open a new channel. They share
the client returned here, configured from arguments or, failing that, the environment:

- ``FIPO_REWARD_ADDRESS``: ``host:port`` of the reward server (default ``127.0.0.1:50051``),
  or several replicas, ``h1:p1,h2:p2`` (load-balanced, with failover);
- ``FIPO_REWARD_TOKEN``: bearer token, when the server requires one.
"""

from __future__ import annotations

import os
import threading

from server.client import RewardClient

ADDRESS_ENV = "FIPO_REWARD_ADDRESS"
TOKEN_ENV = "FIPO_REWARD_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:50051"

_lock = threading.Lock()
_clients: dict[tuple[str, str | None], RewardClient] = {}


def shared_client(address: str | None = None, token: str | None = None) -> RewardClient:
    """The process's client for ``address`` (else ``$FIPO_REWARD_ADDRESS``) and ``token``."""
    key = (
        address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        token or os.environ.get(TOKEN_ENV) or None,
    )
    with _lock:
        if key not in _clients:
            _clients[key] = RewardClient(key[0], token=key[1])
        return _clients[key]


def parse_enum(kind: type, value: object, what: str):
    """``value`` (an enum member or its name, any case) as a member of ``kind``.

    Raises:
        ValueError: Naming ``what`` and the accepted values.
    """
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ValueError(f"{what}={value!r} is not one of: {choices}") from None
