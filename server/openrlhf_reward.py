"""OpenRLHF ``--remote_rm_url`` reward file: ``reward_func`` scores through the reward server.

Pass this file's path to OpenRLHF 0.11.2 (``--reward.remote_url /path/to/server/openrlhf_reward.py``,
alias ``--remote_rm_url``); its executor loads ``reward_func(queries, prompts, labels)`` from
it and calls it from a thread. One gRPC ``Score`` call per invocation. Settings come from the
environment of the process that runs OpenRLHF's vLLM engines:

- ``FIPO_REWARD_ADDRESS``: ``host:port`` of the reward server (default ``127.0.0.1:50051``);
- ``FIPO_REWARD_TOKEN``: bearer token, when the server requires one;
- ``FIPO_ANSWER_FORMAT``: ``latex`` (default), ``expr`` or ``choice``;
- ``FIPO_REWARD_SCHEME``: ``binary`` (default, 1/0) or ``signed`` (+1/-1).

The reply has the keys and shapes of the HTTP protocol (``server.openrlhf``): lists of
``rewards``, ``scores`` and numeric ``extra_logs``, one value per query.

OpenRLHF loads the file by path, not as a module of this project, so when ``server`` is
not importable (the project is not installed in OpenRLHF's environment) the project root
next to this file is put on ``sys.path``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

try:
    import server  # noqa: F401  (installed, or already on sys.path)
except ImportError:  # loaded by path from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.env_client import parse_enum, shared_client
from server.openrlhf import items_from_request, reply
from server.types import AnswerFormat, RewardScheme

FORMAT_ENV = "FIPO_ANSWER_FORMAT"
SCHEME_ENV = "FIPO_REWARD_SCHEME"


def reward_func(queries: list[str], prompts: list[str], labels: list[Any]) -> dict[str, Any]:
    """Rewards for OpenRLHF: one per query (prompt + response), against its label (the gold).

    Returns:
        ``{"rewards": [...], "scores": [...], "extra_logs": {name: [...]}}``.

    Raises:
        server.openrlhf.ProtocolError: Malformed lists.
        server.client.RewardError: The server could not be reached or refused the call.
    """
    items = items_from_request(
        queries,
        prompts,
        labels,
        answer_format=parse_enum(
            AnswerFormat, os.environ.get(FORMAT_ENV, "latex"), f"${FORMAT_ENV}"
        ),
        reward_scheme=parse_enum(
            RewardScheme, os.environ.get(SCHEME_ENV, "binary"), f"${SCHEME_ENV}"
        ),
    )
    return reply(shared_client().score(items))
