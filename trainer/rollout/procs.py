"""Process helpers of the rollout worker: pickle files and the parent-death signal.

Everything that crosses the worker's process boundary through a queue is small (a path,
a version, a counter); batches, requests and replies travel as pickle files in a private
RAM-backed folder, written atomically here.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any

from server.launch import set_parent_death_signal

# Seconds between liveness checks while a loop waits on a queue.
POLL_S = 0.2


def write_pickle(obj: Any, path: Path) -> Path:
    """Pickle ``obj`` to ``path`` atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return path


def read_pickle(path: str | Path, delete: bool = True) -> Any:
    """Load a pickle file written by ``write_pickle`` (and delete it)."""
    with open(path, "rb") as f:
        obj = pickle.load(f)
    if delete:
        Path(path).unlink(missing_ok=True)
    return obj


def die_with_parent() -> None:
    """Take this worker's whole process group down when its parent dies, even by SIGKILL.

    ``PR_SET_PDEATHSIG`` signals only this process, and vLLM's EngineCore / worker
    processes (and the verifier pool) are its children: killed alone, they would live on
    as orphans. So the death signal is SIGTERM, handled by SIGKILLing our own process group,
    and a watchdog thread does the same when the parent changes, in case the handler cannot
    run (vLLM may install its own, or the main thread may sit in a long C call).
    """
    parent = os.getppid()

    def kill_group(*_: object) -> None:
        if os.getpgrp() == os.getpid():  # never the learner's group: only one we lead
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_group)
    set_parent_death_signal(signal.SIGTERM)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                kill_group()

    threading.Thread(target=watch, name="fipo-parent-watch", daemon=True).start()
