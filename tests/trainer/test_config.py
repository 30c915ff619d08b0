"""Config loading: presets, YAML, overrides, and validation messages naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, TrainConfig, parse_args, save_yaml


def test_no_arguments_gives_the_cpu_default() -> None:
    cfg = parse_args([]).config
    assert cfg == TrainConfig()
    assert cfg.algorithm.name == "fipo"
    assert cfg.optim.mini_batches >= 2  # Future-KL needs several optimiser steps per batch


def test_overrides_in_both_spellings_and_bare_keys() -> None:
    cfg = parse_args(
        [
            "rollout.group_size=4",
            "--optim.lr",
            "3e-5",
            "--algorithm.name=dapo",
            "steps=7",
            "--model",
            "/some/dir",
            "algorithm.decay_rate=none",
            "rollout.dynamic_sampling=false",
        ]
    ).config
    assert cfg.rollout.group_size == 4
    assert cfg.optim.lr == 3e-5
    assert cfg.algorithm.name == "dapo"
    assert cfg.run.steps == 7
    assert cfg.model.path == "/some/dir"
    assert cfg.algorithm.decay_rate is None
    assert cfg.rollout.dynamic_sampling is False


def test_yaml_roundtrip_and_override_wins(tmp_path: Path) -> None:
    cfg = parse_args(["rollout.group_size=6", "optim.mini_batches=3"]).config
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    again = parse_args(["--config", str(path), "optim.mini_batches=2"]).config
    assert again.rollout.group_size == 6
    assert again.optim.mini_batches == 2


def test_gpu_preset_is_larger() -> None:
    cfg = parse_args(["--preset", "gpu"]).config
    assert cfg.rollout.group_size == 16 and cfg.model.gradient_checkpointing
    assert cfg.optim.mini_batches == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollout.group_size=1"], "rollout.group_size must be >= 2"),
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["optim.lr=fast"], "optim.lr must be a number"),
        (["algorithm.name=ppo"], "algorithm.name must be one of"),
        (["rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["rollout.overlong_buffer=500"], "rollout.overlong_buffer must be in"),
        (["rollout.reward_address=nowhere"], "rollout.reward_address must look like host:port"),
        (["rollout.worker_cpus=a,b"], "rollout.worker_cpus must be a comma-separated"),
        (["run.steps=2.5"], "run.steps must be an integer"),
        (["rollout.dynamic_sampling=maybe"], "rollout.dynamic_sampling must be a boolean"),
        (["optim.nosuch=1"], "unknown field optim.nosuch"),
        (["nosuch.field=1"], "unknown config section 'nosuch'"),
        (["max_response_tokens=5"], "ambiguous key 'max_response_tokens'"),
        (["--preset", "tpu"], "unknown preset 'tpu'"),
        (["positional"], "unexpected argument 'positional'"),
        (["--optim.lr"], "option --optim.lr needs a value"),
        (
            ["optim.mini_batches=100", "rollout.prompts_per_step=2", "rollout.group_size=2"],
            "optim.mini_batches (100) exceeds",
        ),
        (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
        (["cluster.address=ray://h:1"], "cluster.address must be empty (this machine, no Ray)"),
        (["cluster.address=nohost"], "cluster.address must be empty"),
        (["cluster.rollout_workers=0"], "cluster.rollout_workers must be >= 1"),
        (["cluster.learner_ranks=-1"], "cluster.learner_ranks must be >= 1"),
        (["cluster.reward_replicas=two"], "cluster.reward_replicas must be an integer"),
        (["cluster.reward_cpus=0"], "cluster.reward_cpus must be > 0"),
        (["cluster.learner_rank_gpus=-1"], "cluster.learner_rank_gpus must be >= 0"),
        (["cluster.strategy=RANDOM"], "cluster.strategy must be 'PACK'"),
        (["cluster.reward_port=80"], "cluster.reward_port must be 0 (free ports)"),
        (["cluster.num_cpus=4"], "cluster.num_cpus applies to cluster.address=local only"),
        (
            ["cluster.address=auto", "cluster.rollout_workers=9"],
            "cluster.rollout_workers (9) exceeds rollout.prompts_per_step (8)",
        ),
        (
            ["cluster.address=local", "cluster.learner_rank_gpus=1", "model.device=cpu"],
            "cluster.learner_rank_gpus (1.0) needs model.device cuda or auto",
        ),
        (
            ["cluster.address=auto", "cluster.reward_replicas=2", "rollout.reward_address=h:1"],
            "cluster.reward_replicas (2) with rollout.reward_address",
        ),
    ],
)
def test_validation_messages_name_the_field(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(args)


def test_bad_yaml_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'"):
        parse_args(["--config", str(path)])


def test_engine_threads_leave_the_learner_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenMP threads spin: engine + learner threads must not exceed the cores."""
    import os

    from trainer.rollout.config import engine_threads, rollout_worker_config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert engine_threads(parse_args([]).config) == 1  # 2 cores - 1 learner thread
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert engine_threads(parse_args([]).config) == 15
    assert engine_threads(parse_args(["model.num_threads=0"]).config) == 8  # learner: all
    assert engine_threads(parse_args(["rollout.engine_threads=3"]).config) == 3
    assert engine_threads(parse_args(["rollout.worker_cpus=0"]).config) is None  # pinned
    cfg = parse_args(["rollout.dtype=float32", "rollout.kv_cache_gib=0.5"]).config
    worker = rollout_worker_config(cfg, Path("/m"), "127.0.0.1:1", log_file="/tmp/w.log")
    assert worker.engine.cpu_threads == 15 and worker.engine.dtype == "float32"
    assert worker.engine.kv_cache_gib == 0.5 and worker.log_file == "/tmp/w.log"
    assert worker.engine.max_num_seqs == cfg.rollout.prompts_per_step * cfg.rollout.group_size


def test_prompt_limit_is_one_field_for_worker_engine_and_env() -> None:
    """rollout.max_prompt_tokens reaches the worker, the env and the engine's context."""
    from trainer.rollout.config import rollout_worker_config

    cfg = parse_args(["rollout.max_prompt_tokens=128", "eval.max_response_tokens=200"]).config
    worker = rollout_worker_config(cfg, Path("/m"), "127.0.0.1:1")
    assert worker.rollout is cfg.rollout
    assert worker.engine.max_model_len == 128 + 200
    assert worker.env_kwargs()["max_prompt_tokens"] == 128
    assert worker.env_kwargs(max_response_tokens=200)["max_response_tokens"] == 200
    assert worker.env_kwargs(max_response_tokens=200)["overlong_buffer"] is None
    with pytest.raises(ConfigError, match="rollout.max_prompt_tokens must be >= 1"):
        parse_args(["rollout.max_prompt_tokens=0"])


def test_help_lists_every_field_preset_and_algorithm() -> None:
    import dataclasses

    from trainer.config import PRESETS, help_text

    text = help_text()
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f"  {section.name}.{f.name}=" in text
    assert "rollout.group_size=8  (integer)" in text and "G: samples per prompt." in text
    assert all(f"  {name} " in text for name in PRESETS)
    assert "  dr_grpo " in text


def test_every_loss_preset_is_selectable() -> None:
    from trainer.fipo import LOSS_PRESETS
    from trainer.learner import build_loss_config

    for name in LOSS_PRESETS:
        build_loss_config(parse_args([f"algorithm.name={name}"]).config.algorithm)
    dr = build_loss_config(parse_args(["algorithm.name=dr_grpo"]).config.algorithm)
    assert dr.aggregation == "seq_mean_token_sum_norm"


def test_paper_preset_is_selectable_by_name() -> None:
    from trainer.config import parse_args

    cfg = parse_args(["--preset", "paper"]).config
    assert cfg.rollout.max_staleness == 0 and cfg.rollout.group_size == 16
    assert cfg.rollout.overlong_buffer > 0 and cfg.rollout.filter_metric == "acc"
    assert cfg.algorithm.name == "fipo" and cfg.algorithm.tis_cap == 0.0
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high) == (0.2, 0.28)
    assert cfg.algorithm.dual_clip == 10.0 and cfg.algorithm.decay_rate == 32.0
    assert cfg.optim.mini_batches == 8 and cfg.optim.lr == 1e-6 and cfg.optim.warmup_steps > 0


def test_cluster_section_accepts_every_address_form() -> None:
    assert not parse_args([]).config.cluster.enabled  # make run: this machine, no Ray
    for address in ("local", "auto", "10.0.0.1:6379", "head-node:6379"):
        cfg = parse_args([f"cluster.address={address}", "cluster.rollout_workers=2"]).config
        assert cfg.cluster.enabled and cfg.cluster.address == address
    cfg = parse_args(["cluster.address=local", "cluster.num_cpus=6", "strategy=SPREAD"]).config
    assert cfg.cluster.num_cpus == 6 and cfg.cluster.strategy == "SPREAD"
