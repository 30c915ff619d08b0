"""The embedded default model and model-directory resolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fipo_env.models import ModelNotFoundError, load_tokenizer, offline_hub, resolve_model_dir

REPO = Path(__file__).resolve().parents[2]


def test_default_model_dir_is_a_loadable_safetensors_model(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (default_model_dir / "model.safetensors").stat().st_size > 100_000_000
    assert "quantization_config" not in config


def test_tokenizer_has_chat_template_and_eos(default_model_dir):
    tok = load_tokenizer(default_model_dir)
    assert tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True
    )
    text = tok.decode(ids)
    assert "What is 2+3?" in text and text.rstrip().endswith("assistant")


def test_resolve_default_aliases(default_model_dir):
    assert resolve_model_dir(None) == default_model_dir
    assert resolve_model_dir("default") == default_model_dir


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path)


# Processes that may import huggingface_hub first; it reads HF_HUB_OFFLINE once, on import.
# (The rollout worker is spawned by the trainer and inherits its environment.)
_IMPORT_ENTRY = """
import importlib, importlib.util, os, sys
entry = sys.argv[1]
if entry.endswith(".py"):
    spec = importlib.util.spec_from_file_location("entry", entry)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
else:
    importlib.import_module(entry)
print(os.environ.get("HF_HUB_OFFLINE"), "huggingface_hub" in sys.modules)
"""


@pytest.mark.parametrize(
    "entry", ["trainer.run", "benchmarks/bench_env.py", "benchmarks/bench_rollout.py"]
)
def test_entry_modules_set_hf_hub_offline_before_any_hub_import(entry):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_ENTRY, entry],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False"], out.stdout


def test_offline_hub_keeps_an_explicit_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    offline_hub()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    offline_hub()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
