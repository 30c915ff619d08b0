"""``trainer.precision``: the ``auto`` dtype follows what the hardware multiplies natively.

bf16 is fast only where the processor has bf16 instructions; elsewhere it is emulated and
~40x slower than fp32 (measured on an AVX2 CPU), so every capability is checked here.
"""

from __future__ import annotations

import pytest
import torch

from trainer.config import parse_args
from trainer.precision import Hardware, choose, detect, resolve


@pytest.mark.parametrize(
    ("hw", "engine", "autocast"),
    [
        (Hardware("cpu", "AVX512", bf16_native=True), "bfloat16", "bfloat16"),
        (Hardware("cpu", "AVX512", bf16_native=False), "float32", "float32"),  # Skylake-X
        (Hardware("cpu", "AVX2", bf16_native=False), "float32", "float32"),  # Zen 3, laptops
        # ATen limited to AVX2 kernels on a bf16-capable CPU: bf16 would not run natively.
        (Hardware("cpu", "AVX2", bf16_native=True), "float32", "float32"),
        (Hardware("cpu", "DEFAULT", bf16_native=False), "float32", "float32"),
        (Hardware("cpu", "SVE256", bf16_native=True), "float32", "float32"),  # ARM: not assumed
        (Hardware("cuda", "NVIDIA H100", bf16_native=True), "bfloat16", "bfloat16"),
        (Hardware("cuda", "Tesla V100", bf16_native=False), "float16", "float32"),
    ],
)
def test_choice_for_each_capability(hw: Hardware, engine: str, autocast: str) -> None:
    p = choose(hw)
    assert (p.engine_dtype, p.autocast_dtype) == (engine, autocast)
    assert hw.capability in p.reason  # the printed reason names what was seen


def test_explicit_settings_are_kept() -> None:
    assert resolve("float32", "bfloat16").engine_dtype == "float32"
    assert resolve("float32", "bfloat16").autocast_dtype == "bfloat16"
    assert resolve("float16", "auto").engine_dtype == "float16"
    # Still says which machine (a resumed run's config.yaml keeps the record).
    reason = resolve("float32", "float32", "cpu").reason
    assert reason.startswith("set explicitly, on CPU capability ")
    assert torch.backends.cpu.get_cpu_capability() in reason


def test_detect_reads_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    hw = detect("cpu")
    assert hw.capability == torch.backends.cpu.get_cpu_capability()
    # oneDNN told to stay below its bf16 ISA: never native, whatever the CPU has.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert detect("cpu").bf16_native is False
    assert resolve("auto", "auto", "cpu").engine_dtype == "float32"


def test_config_defaults_are_auto_and_validated() -> None:
    cfg = parse_args([]).config
    assert cfg.rollout.dtype == "auto" and cfg.model.autocast_dtype == "auto"
    assert parse_args(["rollout.dtype=float32"]).config.rollout.dtype == "float32"
    with pytest.raises(ValueError, match="rollout.dtype"):
        parse_args(["rollout.dtype=int8"])


def test_the_run_stores_the_choice_and_why(tmp_path) -> None:
    from trainer.config import save_yaml
    from trainer.run import resolve_precision

    cfg, p = resolve_precision(parse_args([]).config)
    assert cfg.rollout.dtype in ("bfloat16", "float32", "float16")
    assert cfg.model.autocast_dtype in ("bfloat16", "float32")
    save_yaml(cfg, tmp_path / "config.yaml", comment=f"precision: {p.reason}")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith(f"# precision: {p.reason}\n")
    # A resumed run reads the concrete choice back, not "auto".
    again = parse_args(["--config", str(tmp_path / "config.yaml")]).config
    assert again.rollout.dtype == cfg.rollout.dtype
    assert again.model.autocast_dtype == cfg.model.autocast_dtype
