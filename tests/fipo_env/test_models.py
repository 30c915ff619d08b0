"""The embedded default model and model-directory resolution."""

from __future__ import annotations

import json

import pytest

from fipo_env.models import ModelNotFoundError, load_tokenizer, resolve_model_dir


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
