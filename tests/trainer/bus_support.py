"""Helpers for the weight-bus tests (no tests of its own).

Importable by a spawned process (``tests/trainer`` is on ``sys.path``, see conftest.py),
so :func:`receiver_main` runs as one receiver of a bus in a process of its own.
"""

from __future__ import annotations

import torch


def sample_state_dict(scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Tensors of every kind a state dict holds: fp32 of several shapes (one 0-dim),
    bf16, int64 and bool, ~28 KB in all."""
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 96, generator=gen) * scale,
        "layer.0.bias": torch.randn(7, generator=gen) * scale,
        "layer.0.scale": torch.tensor(3.25 * scale),
        "layer.1.weight": (torch.randn(40, 33, generator=gen) * scale).to(torch.bfloat16),
        "positions": torch.arange(11) * int(scale),
        "mask": torch.arange(5) % 2 == int(scale) % 2,
    }


def receiver_main(spec, rank: int, versions: list[int], results) -> None:
    """Join ``spec``'s bus as ``rank``, receive each of ``versions`` and put
    ``(rank, version, torch.save'd {name: tensor})`` on ``results`` (bytes: a tensor
    put on a queue as is would be shared memory that dies with this process); also
    ``(rank, 0, "joined")`` first, and ``(rank, version, "error: ...")`` to end early."""
    import io

    from trainer.weight_bus import WeightBus

    bus = WeightBus.join(spec, rank)
    results.put((rank, 0, "joined"))
    try:
        for version in versions:
            buf = io.BytesIO()
            try:
                torch.save({name: t.clone() for name, t in bus.receive(version)}, buf)
            except RuntimeError as exc:
                results.put((rank, version, f"error: {exc}"))
                return
            results.put((rank, version, buf.getvalue()))
    finally:
        bus.close()
