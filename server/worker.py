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

import multiprocessing as mp
import os
import resource
import signal
import sys
import traceback
from multiprocessing import spawn
from multiprocessing.connection import Connection

from server.config import VerifierConfig
from server.types import ScoreItem, Status

#: Modules the fork server imports once, so forked workers start warm.
PRELOAD = ["server.worker", "server.verify", "sympy", "math_verify", "latex2sympy2_extended"]

#: Exit status of a worker that found itself re-importing a main module which starts a pool.
MAIN_REIMPORT_EXIT = 87

_GUARD_HINT = (
    'put the script\'s top-level code under `if __name__ == "__main__":`, or score with a '
    'running reward server instead (`python -m server`, then verifier="host:port" in '
    "fipo_env or server.client.RewardClient)"
)


class MainModuleError(RuntimeError):
    """Verify workers cannot start because of how the program's main module is run.

    Worker processes come from multiprocessing's fork server, which re-imports the main
    module (the script) in every new worker, exactly as the ``spawn`` start method does.
    """


def check_main_module() -> None:
    """Fail early when the main module cannot be re-imported in a worker at all.

    A script fed on standard input (``python - < script.py``) is re-imported from the path
    ``<stdin>``, which does not exist: every worker would die with ``FileNotFoundError``.

    Raises:
        MainModuleError: The main module's path is not a file.
    """
    path = spawn.get_preparation_data("fipo-verify-worker").get("init_main_from_path")
    if path is not None and not os.path.isfile(path):
        raise MainModuleError(
            f"cannot start verify workers: they re-import the main module from {path!r}, "
            "which is not a file (is the script read from standard input?). Save it to a "
            f"file and run that, and {_GUARD_HINT}"
        )


def exit_if_reimporting_main() -> None:
    """In a worker that is still re-importing the main module, exit with ``MAIN_REIMPORT_EXIT``.

    A script without the ``__main__`` guard creates its pool again while a new worker
    re-imports it; multiprocessing would then raise its long bootstrapping error in the
    worker. Exiting quietly with a known status lets the parent raise one message instead
    (``main_reimport_error``). ``_inheriting`` is the flag multiprocessing itself checks.
    """
    if getattr(mp.current_process(), "_inheriting", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(MAIN_REIMPORT_EXIT)


def main_reimport_error() -> MainModuleError:
    """The error for a worker that exited with ``MAIN_REIMPORT_EXIT``."""
    main = sys.modules.get("__main__")
    where = getattr(main, "__file__", None) or "the main module"
    return MainModuleError(
        f"cannot start verify workers: {where} creates a worker pool (e.g. fipo_env's default "
        "verifier='local' on its first reward) while it is being imported, and every new "
        "worker process re-imports the main module (multiprocessing forkserver), so the "
        f"workers would start pools of their own; {_GUARD_HINT}"
    )


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
    from server.types import Verdict
    from server.verify import Verifier

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
