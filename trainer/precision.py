"""Which floating-point precision this machine runs fast: the ``auto`` dtype choice.

bf16 halves memory traffic and, where the hardware multiplies bf16 natively (AVX-512
BF16 or AMX on x86 CPUs, Ampere and newer GPUs), roughly doubles matmul throughput. Where
it does not, bf16 is *emulated* and very slow: measured on an AVX2 + FMA CPU with torch
2.13, one thread, a 1024x576 @ 576x1536 matmul ran at 53 GFLOP/s in fp32 and 1.2 GFLOP/s
in bf16 (44x slower). Most laptops and many servers are in that second group (AMD before
Zen 4, most Intel client chips), so ``auto`` must never assume bf16.

The rule, for the rollout engine's dtype and the learner's autocast alike:

* CUDA: bf16 where ``torch.cuda.is_bf16_supported()``; otherwise the engine runs fp16 and
  the learner fp32 (fp16 autocast would need a loss scaler).
* CPU: bf16 only when ATen runs its AVX-512 kernels (``get_cpu_capability()`` is
  ``AVX512``), the processor has AVX-512 BF16 or AMX, and oneDNN is not capped below
  them (``ONEDNN_MAX_CPU_ISA``); fp32 everywhere else (AVX2, ARM, anything unknown).

``choose`` is the pure rule (tested for every capability); ``detect`` reads the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) that still include native bf16 instructions.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL")


@dataclass(frozen=True)
class Hardware:
    """What decides the dtype (read by ``detect``, or given by a test).

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        capability: ``torch.backends.cpu.get_cpu_capability()`` (``"AVX512"``, ``"AVX2"``,
            ``"DEFAULT"``, ...), or the GPU's name on CUDA.
        bf16_native: Whether the processor multiplies bf16 in hardware (CPU: AVX-512 BF16
            or AMX, and oneDNN allowed to use them; CUDA: ``is_bf16_supported()``).
    """

    device: str
    capability: str
    bf16_native: bool


@dataclass(frozen=True)
class Precision:
    """The ``auto`` choice and why it was made.

    Attributes:
        engine_dtype: Rollout engine dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        autocast_dtype: Learner autocast dtype: ``"bfloat16"`` or ``"float32"``.
        reason: One line a person can read (printed at start, stored with the run).
    """

    engine_dtype: str
    autocast_dtype: str
    reason: str


def choose(hw: Hardware) -> Precision:
    """The fast precision for ``hw`` (pure: no hardware access)."""
    if hw.device == "cuda":
        if hw.bf16_native:
            return Precision("bfloat16", "bfloat16", f"GPU {hw.capability} supports bf16")
        return Precision(
            "float16", "float32", f"GPU {hw.capability} lacks bf16: engine fp16, learner fp32"
        )
    if hw.capability.upper().startswith("AVX512") and hw.bf16_native:
        return Precision(
            "bfloat16",
            "bfloat16",
            f"CPU capability {hw.capability} with native bf16 (AVX-512 BF16/AMX)",
        )
    why = (
        "without native bf16"
        if hw.capability.upper().startswith("AVX512")
        else "has no native bf16"
    )
    return Precision(
        "float32",
        "float32",
        f"CPU capability {hw.capability} {why}: bf16 would be emulated (~40x slower), so fp32",
    )


def _cpu_bf16_native() -> bool:
    import torch

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and not cap.startswith(_ONEDNN_BF16_ISAS):
        return False  # oneDNN is told not to use the bf16 instructions
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if cpu is not None and any(hasattr(cpu, name) for name in checks):
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    try:  # older torch: read the flags the kernel reports (Linux)
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def detect(device: str = "auto") -> Hardware:
    """Read the hardware that ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``...) runs on."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return Hardware("cuda", torch.cuda.get_device_name(), bool(torch.cuda.is_bf16_supported()))
    capability = torch.backends.cpu.get_cpu_capability()
    return Hardware("cpu", capability, _cpu_bf16_native())


def resolve(engine_dtype: str, autocast_dtype: str, device: str = "auto") -> Precision:
    """Replace ``"auto"`` in either setting by this machine's choice; keep explicit ones.

    Returns:
        The dtypes to use, with a reason that says which were chosen and why.
    """
    hw = detect(device)
    if engine_dtype != "auto" and autocast_dtype != "auto":
        bf16 = "with" if hw.bf16_native else "without"
        where = "GPU" if hw.device == "cuda" else "CPU capability"
        # The machine is named even here: a resumed run's config.yaml keeps saying where.
        reason = f"set explicitly, on {where} {hw.capability} {bf16} native bf16"
        return Precision(engine_dtype, autocast_dtype, reason)
    auto = choose(hw)
    return Precision(
        auto.engine_dtype if engine_dtype == "auto" else engine_dtype,
        auto.autocast_dtype if autocast_dtype == "auto" else autocast_dtype,
        auto.reason,
    )


def describe_machine() -> str:
    """One line for benchmark output: the CPU capability, native bf16, cores, load."""
    import torch

    hw = detect("cpu")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: CPU capability {hw.capability} (native bf16: "
        f"{'yes' if hw.bf16_native else 'no'}), {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}{gpu}"
    )
