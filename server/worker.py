"""The body of one math-verify worker process.

Started by ``server.pool`` through multiprocessing's *forkserver* context: the fork server is
a clean process started before any gRPC server exists, with math-verify already imported
(see ``PRELOAD``), so a replacement worker is a cheap fork even after the gRPC server is up
(gRPC Python must not fork itself once a server exists).

Protocol over a duplex ``multiprocessing`` connection: the worker sends ``("ready", pid)``,
then answers each ``(task_id, item, budget_s)`` with ``(task_id, verdict)``; ``None`` asks it
to exit.
"""

from __future__ import annotations

import os
import resource
import signal
import traceback
from multiprocessing.connection import Connection

from server.config import VerifierConfig
from server.types import ScoreItem, Status

#: Modules the fork server imports once, so forked workers start warm.
PRELOAD = ["server.worker", "server.verify", "sympy", "math_verify", "latex2sympy2_extended"]


def _cap_memory(limit_mb: int) -> None:
    if limit_mb <= 0:
        return
    limit = limit_mb * 1024 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def worker_main(conn: Connection, verifier_config: VerifierConfig, memory_limit_mb: int) -> None:
    """Run the worker loop until told to stop or the connection closes.

    Args:
        conn: The worker's end of the pipe to its supervisor thread.
        verifier_config: Verifier settings.
        memory_limit_mb: RLIMIT_AS cap in MiB (0: none).
    """
    # Ctrl-C reaches the whole process group; the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from server.verify import Verdict, Verifier

    verifier = Verifier(verifier_config)
    # Warm up latex2sympy's lazily built parser before reporting ready, so the first real
    # item does not pay ~100 ms; the gold cache is cleared again afterwards.
    verifier.check(ScoreItem("warmup", "\\boxed{\\frac{1}{2}}", ("0.5",)), 30.0)
    verifier.clear_caches()
    _cap_memory(memory_limit_mb)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, item, budget_s = msg
        try:
            verdict = verifier.check(item, budget_s)
        except Exception as e:  # a verifier bug must not kill the worker: report it
            verdict = Verdict(
                Status.INTERNAL,
                message=f"verifier error: {type(e).__name__}: {str(e)[:200]}",
            )
            traceback.print_exc()
        try:
            conn.send((task_id, verdict))
        except (EOFError, OSError):
            return
