"""Moving a learner's weights into a running engine through a safetensors file.

The learner writes its state dict to a file in ``/dev/shm`` (RAM-backed, so "disk" I/O is
a memcpy) and tells the engine's process the path; the engine reads the tensors back with
``safe_open`` (memory-mapped) and loads them in place. Nothing but a path crosses the
process boundary, which is why this works the same for a local worker process and for
vLLM's own worker processes (``collective_rpc`` arguments are pickled, and tensors sent
that way arrive as nested lists).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_shm_dir() -> Path:
    """``/dev/shm`` where it exists (Linux), else the system temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, dtype: str | None = None
) -> Path:
    """Write ``state_dict`` as one safetensors file, atomically.

    Tied parameters (e.g. ``lm_head.weight`` sharing ``embed_tokens.weight``'s storage)
    are cloned: safetensors refuses tensors that share memory.

    Args:
        state_dict: Parameter name -> tensor (Hugging Face names), on any device.
        path: Target file; written to a temporary name then renamed, so a reader never
            sees half a file.
        dtype: Cast floating-point tensors to this dtype name first (e.g. the engine's
            ``"bfloat16"``, halving the bytes written); ``None`` keeps each dtype.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: on an empty state dict, a non-tensor value or an unknown dtype.
    """
    if not state_dict:
        raise ValueError("save_weights: the state dict is empty")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"save_weights: unknown dtype {dtype!r}; expected one of {list(_DTYPES)}")
    target = _DTYPES[dtype] if dtype is not None else None
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"save_weights: {name!r} is a {type(value).__name__}, not a tensor")
        t = value.detach()
        if target is not None and t.is_floating_point() and t.dtype != target:
            t = t.to(target)
        t = t.to("cpu")
        storage = t.untyped_storage().data_ptr()
        if storage in seen_storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen_storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def iter_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a safetensors file, one tensor at a time."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
            yield name, f.get_tensor(name)


class WeightFiles:
    """A private folder of versioned weight files that keeps only the newest one.

    Args:
        root: Parent folder (default ``/dev/shm``).
        prefix: Folder name prefix (the folder also carries the pid and a random part).
    """

    def __init__(self, root: str | Path | None = None, prefix: str = "fipo-weights-") -> None:
        base = Path(root) if root is not None else default_shm_dir()
        _remove_orphans(base, prefix)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
        self._current: Path | None = None

    @property
    def current(self) -> Path | None:
        """The newest file written, or ``None``."""
        return self._current

    def write(
        self, state_dict: Mapping[str, torch.Tensor], version: int, dtype: str | None = None
    ) -> Path:
        """Save ``state_dict`` as version ``version`` (older files stay until ``prune``)."""
        return save_weights(state_dict, self.dir / f"v{version:08d}.safetensors", dtype=dtype)

    def set_current(self, path: Path) -> None:
        """Mark ``path`` as the newest file."""
        self._current = path

    def prune(self) -> None:
        """Delete every file but the newest (keeps RAM use at one copy of the weights)."""
        for old in self.dir.glob("v*.safetensors*"):
            if old != self._current:
                old.unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Delete the folder and everything in it."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self._current = None


def _remove_orphans(base: Path, prefix: str) -> None:
    """Delete folders left by processes that died without cleaning up (e.g. SIGKILL).

    ``/dev/shm`` is RAM: a leaked copy of the weights costs memory until reboot. A folder
    is named ``<prefix><pid>-<random>``; it is an orphan when that pid no longer exists.
    """
    for folder in base.glob(f"{prefix}*-*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
