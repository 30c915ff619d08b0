"""Checkpoints: learner weights + optimiser + schedule + every RNG, written atomically.

Layout inside a run folder::

    checkpoints/step_000010/state.pt   # learner state, RNG states, run position
    checkpoints/step_000010/meta.json  # step, time, human-readable summary
    checkpoints/latest                 # name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, so an
interruption while saving never leaves a half-written "latest".
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Global RNG states of python, numpy and torch."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path, step: int, learner_state: dict[str, Any], extra: dict[str, Any], keep: int
) -> Path:
    """Write the checkpoint of ``step`` and keep only the newest ``keep`` ones.

    Args:
        run_dir: The run folder.
        step: Training steps completed.
        learner_state: ``Learner.state_dict()``.
        extra: Other state to restore (run position, rollout seed, ...); JSON-able values
            are also copied into ``meta.json``.
        keep: How many checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(
        {"step": step, "learner": learner_state, "rng": rng_state(), "extra": extra},
        tmp / "state.pt",
    )
    meta = {"step": step, "saved_at": time.time()}
    meta.update({k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool))})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest = root / "latest"
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    latest_tmp.replace(latest)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder or a checkpoint folder to a checkpoint folder.

    Raises:
        FileNotFoundError: Nothing resumable at ``path`` (message says what was looked for).
    """
    p = Path(path)
    if (p / "state.pt").is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        candidate = p / "checkpoints" / latest.read_text().strip()
        if (candidate / "state.pt").is_file():
            return candidate
    raise FileNotFoundError(
        f"nothing to resume at {str(p)!r}: expected a run folder with checkpoints/latest "
        "or a checkpoint folder with state.pt"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (run folder or checkpoint folder) onto the CPU."""
    folder = find_checkpoint(path)
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)


def resume_hint(run_dir: str | Path) -> str:
    """How to continue a stopped run: the ``--resume`` command and its checkpoint."""
    try:
        found = find_checkpoint(run_dir)
    except FileNotFoundError:
        return "no checkpoint was written yet: start the run again"
    return f"resume with: python -m trainer.run --resume {run_dir} (checkpoint {found.name})"
