"""The optional Triton Future-KL kernel (trainer/kernels/triton_scan.py) vs the torch path.

On the CPU the kernel runs through Triton's interpreter in a subprocess (the interpreter
is chosen when the kernel is defined, so it cannot be switched on inside this process).
The ``gpu`` test compiles and runs it on a real CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from trainer.fipo import future_kl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

CASES = """
import torch
from trainer.fipo import future_kl

g = torch.Generator().manual_seed(0)
worst = 0.0
for B, T, tau, cap, dtype, block in [
    (3, 1, 32.0, None, torch.float32, 16),
    (2, 100, 1.0, 10.0, torch.float32, 16),
    (4, 1000, 32.0, 10.0, torch.bfloat16, 64),
    (2, 2500, 500.0, 2.0, torch.float32, 256),
]:
    x = (torch.randn(B, T, generator=g) * 0.5).to(dtype)
    x[:, ::7] += 3.0
    mask = torch.rand(B, T, generator=g) < 0.8
    from trainer.kernels.triton_scan import future_kl_triton
    got = future_kl_triton(x, mask, tau, cap, block=block)
    want = future_kl(x, mask, tau, ratio_cap=cap)
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().item() + 1.0
    worst = max(worst, ((got - want).abs().max() / scale).item())
print("WORST", worst)
"""


def test_kernel_matches_torch_path_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CASES)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[1])
    assert worst < 2e-6  # float32 accumulation, relative to the row's scale


def test_triton_backend_refuses_cpu_tensors_without_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process")
    with pytest.raises(ValueError, match="needs CUDA"):
        future_kl(torch.zeros(1, 4), torch.ones(1, 4), 32.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        future_kl(torch.zeros(1, 4), torch.ones(1, 4), 32.0, backend="numba")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_kernel_matches_torch_path_on_gpu() -> None:
    g = torch.Generator().manual_seed(1)
    for B, T, dtype in [
        (64, 16_384, torch.float32),
        (8, 3000, torch.bfloat16),
        (1, 1, torch.float32),
    ]:
        x = (torch.randn(B, T, generator=g) * 0.1).to(dtype).cuda()
        x[:, ::997] += 3.0
        mask = (torch.rand(B, T, generator=g) < 0.9).cuda()
        got = future_kl(x, mask, 32.0, ratio_cap=10.0, backend="triton")
        want = future_kl(x, mask, 32.0, ratio_cap=10.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
