"""Shared test fixtures: offline Hugging Face, the embedded default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub (there is no network to one here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory (converted once)."""
    from fipo_env.models import default_model_dir as _default_model_dir

    return _default_model_dir()
