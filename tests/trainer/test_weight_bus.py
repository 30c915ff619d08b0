"""``trainer.weight_bus`` alone, over gloo on CPU: one sender, receivers in processes
(bit-equal tensors, several buckets, versions in a row) or threads (the error paths:
the same code, without the start-up of a process each).

The engines and the rollout worker that use the bus are tested in
``test_weight_bus_engines.py``.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: find the helpers
from bus_support import receiver_main, sample_state_dict  # noqa: E402
from test_engines_support import live_descendants  # noqa: E402

from trainer.weight_bus import WeightBus, bucket_layout, make_manifest  # noqa: E402

BUCKET = 2048  # small: the ~28 KB sample takes four buckets


def _stop(bus, procs) -> None:
    """Leave the bus and kill the receivers still running (a failed test's leftovers)."""
    bus.close()
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)


def test_layout_packs_in_order_aligned_and_alone_when_too_big():
    manifest = make_manifest(sample_state_dict())
    layout = bucket_layout(manifest, BUCKET)
    assert len(layout) == 4
    flat = [(spec.name, offset) for _, members in layout for spec, offset in members]
    assert [name for name, _ in flat] == [s.name for s in manifest]
    assert all(offset % 64 == 0 for _, offset in flat)
    # embed.weight (24 KiB) exceeds the bucket size: a bucket of its own.
    assert layout[0][1][0][0].name == "embed.weight" and len(layout[0][1]) == 1
    cast = make_manifest(sample_state_dict(), dtype="bfloat16")
    assert {s.name: s.dtype for s in cast} == {
        "embed.weight": "bfloat16",
        "layer.0.bias": "bfloat16",
        "layer.0.scale": "bfloat16",
        "layer.1.weight": "bfloat16",
        "positions": "int64",
        "mask": "bool",
    }


def test_one_sender_two_receiver_processes_get_every_tensor_bit_equal():
    v1, v2 = sample_state_dict(1.0), sample_state_dict(2.0)
    bus = WeightBus.serve(make_manifest(v1), receivers=2, timeout_s=120, bucket_bytes=BUCKET)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=receiver_main, args=(bus.spec, rank, [1, 2], results)) for rank in (1, 2)
    ]
    try:
        for p in procs:
            p.start()
        bus.wait_joined()
        assert len(bus._layout) >= 3  # several buckets per publish
        bus.send(v1, version=1)
        bus.send(v2, version=2)
        got = {}
        for _ in range(6):
            rank, version, saved = results.get(timeout=120)
            if version:
                got[rank, version] = torch.load(io.BytesIO(saved))
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        _stop(bus, procs)
    assert sorted(got) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for (_, version), tensors in got.items():
        sent = v1 if version == 1 else v2
        assert list(tensors) == list(sent)
        for name, t in sent.items():
            r = tensors[name]
            assert r.dtype == t.dtype and r.shape == t.shape, name
            assert torch.equal(r.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), name
    assert live_descendants() == []


def test_a_dead_receiver_fails_the_publish_at_once_for_every_member():
    """A receiver killed between publishes: the sender's broadcast fails, and it leaves
    the bus, so the surviving receiver fails within seconds, not at the 120 s timeout
    (gloo's tree would keep it waiting for data that will not come)."""
    sd = sample_state_dict()
    bus = WeightBus.serve(make_manifest(sd), receivers=2, timeout_s=120, bucket_bytes=BUCKET)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=receiver_main, args=(bus.spec, rank, [1], results)) for rank in (1, 2)
    ]
    try:
        for p in procs:
            p.start()
        bus.wait_joined()
        assert [results.get(timeout=120)[2] for _ in procs] == ["joined", "joined"]
        procs[1].kill()  # rank 2
        procs[1].join(30)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="[Cc]onnection"):
            bus.send(sd, version=1)
        rank, version, outcome = results.get(timeout=60)
        assert (rank, version) == (1, 1) and outcome.startswith("error: ")
        assert time.monotonic() - start < 30
        procs[0].join(30)
        assert procs[0].exitcode == 0
        with pytest.raises(RuntimeError, match="not joined"):  # the sender left the bus
            bus.send(sd, version=2)
    finally:
        _stop(bus, procs)
    assert live_descendants() == []


def _join_in_threads(bus, ranks, expect=None):
    """Receivers in threads; returns (threads, errors: rank -> exception, buses)."""
    errors, buses = {}, {}

    def run(rank):
        try:
            buses[rank] = WeightBus.join(bus.spec, rank, expect=expect)
        except Exception as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    return threads, errors, buses


def test_a_manifest_mismatch_names_the_tensor_on_both_sides():
    sd = sample_state_dict()
    # A receiver whose engine holds another shape refuses at join; the sender says who.
    bus = WeightBus.serve(make_manifest(sd), receivers=1, timeout_s=30, bucket_bytes=BUCKET)
    expect = {k: tuple(v.shape) for k, v in sd.items()} | {"layer.0.bias": (8,)}
    threads, errors, _ = _join_in_threads(bus, [1], expect)
    with pytest.raises(ValueError, match=r"rank 1 refused: 'layer.0.bias': shape \(8,\)"):
        bus.wait_joined()
    threads[0].join(30)
    assert "'layer.0.bias'" in str(errors[1])
    bus.close()

    # A publish that does not fit the manifest is refused before a byte moves; the
    # receivers hear why, and the bus carries the next (good) publish.
    bus = WeightBus.serve(make_manifest(sd), receivers=1, timeout_s=30, bucket_bytes=BUCKET)
    threads, errors, buses = _join_in_threads(bus, [1])
    bus.wait_joined()
    threads[0].join(30)
    receiver = buses[1]
    outcome: dict = {}

    def receive_three():
        for key, version in (("first", 1), ("second", 2), ("third", 3)):
            try:
                outcome[key] = {k: v.clone() for k, v in receiver.receive(version)}
            except RuntimeError as exc:
                outcome[key] = exc

    t = threading.Thread(target=receive_three, daemon=True)
    t.start()
    bad = sd | {"embed.weight": torch.zeros(64, 95)}
    with pytest.raises(ValueError, match=r"version 1: 'embed.weight': shape \(64, 95\)"):
        bus.send(bad, version=1)
    bus.send(sd, version=2)
    with pytest.raises(ValueError, match="'extra' is not in the manifest"):
        bus.send(sd | {"extra": torch.ones(1)}, version=3)
    t.join(30)
    assert "aborted: 'embed.weight'" in str(outcome["first"])
    assert torch.equal(outcome["second"]["embed.weight"], sd["embed.weight"])
    assert "aborted: 'extra'" in str(outcome["third"])
    receiver.close()
    bus.close()


def test_join_timeouts_name_the_address_and_who_is_missing():
    bus = WeightBus.serve(make_manifest(sample_state_dict()), receivers=2, timeout_s=2)
    threads, errors, _ = _join_in_threads(bus, [1])  # rank 2 never comes
    with pytest.raises(TimeoutError, match=rf"127.0.0.1:{bus.spec.port}: rank\(s\) \[2\] of 3"):
        bus.wait_joined()
    threads[0].join(30)
    assert isinstance(errors[1], TimeoutError) and "[2]" in str(errors[1])
    spec = bus.spec
    bus.close()
    # Nobody serves that port any more: a receiver says where it looked.
    with pytest.raises(TimeoutError, match=rf"no sender at 127.0.0.1:{spec.port}"):
        WeightBus.join(spec, 1)
