"""Fixtures shared by the trainer tests: the tiny random Llama models.

The builders themselves live in ``test_engines_support.py`` (importable by a test
module or a subprocess); here they become fixtures, built once per session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib (no test dir on sys.path); the helpers are here.
sys.path.insert(0, str(Path(__file__).parent))
from test_engines_support import make_tiny_model, tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer (engines, rollouts)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-wide random Llama over a 64-token vocabulary, no tokenizer (the learner)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=64).save_pretrained(path)
    return path
