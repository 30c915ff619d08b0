"""A weight bus: one sender broadcasts a model's weights to N receivers, in place.

The collective twin of the ``/dev/shm`` file path (``trainer.engines.weights``): rank 0
is the learner's rank 0, ranks 1..N the engines (a vLLM engine over several GPUs: one per
vLLM worker, ``rank_offset + its rank``). gloo moves CPU tensors (run here), NCCL CUDA
tensors (the same code, not run here: docs/rollout.md). The bus is a process group of its
own, built *directly* from a ``TCPStore`` and the backend's class, never with
``init_process_group``: the learner ranks own the default group (data parallel) and vLLM
owns one in its worker.

- Join, once: rank 0 ``serve`` binds a store on a free port and writes the manifest (name,
  shape, dtype in the engine's dtype) into it; each receiver ``join``s (checks the
  manifest against its engine, marks itself joined or failed with the reason); rank 0
  ``wait_joined``; all build the group together.
- Publish: rank 0 ``send`` broadcasts a header ``[version]`` (``[-1]`` and a reason in the
  store if the state dict does not fit the manifest), then the tensors packed into flat
  byte buckets of ``bucket_bytes`` (a larger tensor alone); ``receive`` yields
  ``(name, tensor)`` views, a *fresh* buffer per bucket, so they outlive the next one
  (vLLM's layer-wise reload keeps them until a layer is complete).

Every member must take part in each step at the same time (a collective waits up to
``timeout_s`` for the others); one whose collective fails leaves, so the others fail too.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

Backend = Literal["gloo", "nccl"]
#: Default bucket size: few collectives per publish, a bounded extra buffer.
BUCKET_BYTES = 256 * 2**20
_ALIGN = 64  # byte offset of every tensor in a bucket (a viewed dtype needs alignment)
_ABORT = -1  # header value: the sender gave up on this publish (reason in the store)
_POLL_S = 0.05


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the manifest: HF name, shape, dtype name (``"bfloat16"``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.torch_dtype).itemsize


@dataclass(frozen=True)
class BusSpec:
    """Where and how to join a bus (small and picklable: sent to every member).

    Attributes:
        host: Address of rank 0's ``TCPStore`` (an IP the receivers can reach).
        port: Its port.
        world_size: 1 sender + the receivers.
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
        timeout_s: Longest wait for the others at join and in every collective.
        bucket_bytes: Bucket size (both sides derive the same bucket layout from it).
    """

    host: str
    port: int
    world_size: int
    backend: Backend
    timeout_s: float
    bucket_bytes: int = BUCKET_BYTES

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def make_manifest(
    state_dict: Mapping[str, torch.Tensor], dtype: str | None = None
) -> tuple[TensorSpec, ...]:
    """The manifest of ``state_dict``: floating-point tensors in ``dtype`` when given
    (the engine's dtype: a bf16 engine gets half the bytes of fp32 master weights)."""
    out = []
    for name, t in state_dict.items():
        name_dtype = dtype if dtype is not None and t.is_floating_point() else None
        out.append(TensorSpec(name, tuple(t.shape), name_dtype or str(t.dtype).split(".")[-1]))
    return tuple(out)


def bucket_layout(
    manifest: tuple[TensorSpec, ...], bucket_bytes: int
) -> list[tuple[int, list[tuple[TensorSpec, int]]]]:
    """Buckets as ``(size in bytes, [(tensor, byte offset), ...])``, in manifest order."""
    buckets: list[tuple[int, list[tuple[TensorSpec, int]]]] = []
    size, members = 0, []
    for spec in manifest:
        if members and size + spec.nbytes > bucket_bytes:
            buckets.append((size, members))
            size, members = 0, []
        members.append((spec, size))
        size += -(-spec.nbytes // _ALIGN) * _ALIGN
    if members:
        buckets.append((size, members))
    return buckets


class WeightBus:
    """One member of a bus; build with :meth:`serve` (rank 0) or :meth:`join`."""

    def __init__(self, spec: BusSpec, rank: int, store, manifest, device: torch.device):
        self.spec, self.rank, self.device = spec, rank, device
        self.manifest: tuple[TensorSpec, ...] = manifest
        self._store = store
        self._layout = bucket_layout(manifest, spec.bucket_bytes)
        self._group = None
        self._sends = 0  # publishes so far (names the abort key of each)

    # ------------------------------------------------------------------ join

    @classmethod
    def serve(
        cls,
        manifest: tuple[TensorSpec, ...],
        receivers: int,
        *,
        host: str = "127.0.0.1",
        backend: Backend = "gloo",
        timeout_s: float = 600.0,
        bucket_bytes: int = BUCKET_BYTES,
        device: torch.device | str | None = None,
    ) -> WeightBus:
        """Rank 0: bind a store on a free port and publish the manifest; returns at once
        (call :meth:`wait_joined` while the receivers :meth:`join`)."""
        if receivers < 1 or not manifest or bucket_bytes < 1:
            raise ValueError("WeightBus.serve needs receivers >= 1, a manifest, bucket_bytes >= 1")
        store = dist.TCPStore(
            host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False
        )
        spec = BusSpec(host, store.port, receivers + 1, backend, timeout_s, bucket_bytes)
        store.set("manifest", json.dumps([[s.name, list(s.shape), s.dtype] for s in manifest]))
        return cls(spec, 0, store, manifest, _device(backend, device))

    def wait_joined(self) -> None:
        """Rank 0: block until every receiver joined, then build the group.

        Raises:
            TimeoutError: Not all joined in ``timeout_s`` (names host:port and who not).
            ValueError: A receiver refused the manifest (names it and the tensor).
        """
        self._store.set("joined/0", "1")
        self._await_members()
        self._group = _new_group(self._store, 0, self.spec)

    @classmethod
    def join(
        cls,
        spec: BusSpec,
        rank: int,
        expect: Mapping[str, tuple[int, ...]] | None = None,
        device: torch.device | str | None = None,
    ) -> WeightBus:
        """Receiver ``rank`` (1..N): join ``spec``'s bus; blocks until every member has.

        Args:
            expect: This engine's tensors (name -> shape); every tensor of the manifest
                must be one of them, with that shape. ``None`` checks nothing (vLLM's
                own loader names what it cannot place).

        Raises:
            TimeoutError: No store at host:port, or not every member joined in time.
            ValueError: The manifest does not fit ``expect`` (names the tensor).
        """
        if not 1 <= rank < spec.world_size:
            raise ValueError(
                f"weight bus {spec.address}: rank {rank} outside 1..{spec.world_size - 1}"
            )
        try:
            store = dist.TCPStore(
                spec.host, spec.port, None, False, timedelta(seconds=spec.timeout_s)
            )
            raw = json.loads(store.get("manifest"))
        except RuntimeError as exc:  # torch.distributed.DistError: no store, or no manifest
            raise TimeoutError(
                f"weight bus: rank {rank} found no sender at {spec.address} within "
                f"{spec.timeout_s:.0f} s ({exc})"
            ) from None
        manifest = tuple(TensorSpec(n, tuple(s), d) for n, s, d in raw)
        problem = _misfit(manifest, expect, "this engine") if expect is not None else ""
        if problem:
            store.set(f"failed/{rank}", problem)
            raise ValueError(f"weight bus {spec.address}, rank {rank}: {problem}")
        bus = cls(spec, rank, store, manifest, _device(spec.backend, device))
        store.set(f"joined/{rank}", "1")
        bus._await_members()
        bus._group = _new_group(store, rank, spec)
        return bus

    @staticmethod
    def cancel(spec: BusSpec, rank: int, reason: str) -> None:
        """Mark ``rank`` as failed (e.g. its process died), so the members waiting for it
        at join stop at once, naming ``reason``, instead of at the timeout."""
        store = dist.TCPStore(spec.host, spec.port, None, False, timedelta(seconds=10))
        store.set(f"failed/{rank}", reason)

    def _await_members(self) -> None:
        spec, deadline = self.spec, time.monotonic() + self.spec.timeout_s
        while True:
            for r in range(1, spec.world_size):
                if self._store.check([f"failed/{r}"]):
                    reason = self._store.get(f"failed/{r}").decode()
                    raise ValueError(f"weight bus {spec.address}: rank {r} refused: {reason}")
            missing = [r for r in range(spec.world_size) if not self._store.check([f"joined/{r}"])]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"weight bus {spec.address}: rank(s) {missing} of {spec.world_size} "
                    f"(0 = sender) did not join within {spec.timeout_s:.0f} s"
                )
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ publish

    def send(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Rank 0: broadcast ``state_dict`` (cast to the manifest's dtypes) as ``version``.

        Raises:
            ValueError: ``state_dict`` does not match the manifest (names the tensor); the
                receivers are told (their ``receive`` raises with the same reason).
        """
        self._check(sender=True)
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        problem = _misfit(self.manifest, shapes, "the state dict")
        extra = set(state_dict) - {s.name for s in self.manifest}
        problem = problem or (f"{sorted(extra)[0]!r} is not in the manifest" if extra else "")
        if problem:
            self.abort(problem)
            raise ValueError(f"weight bus {self.spec.address}: version {version}: {problem}")
        self._sends += 1
        self._broadcast(torch.tensor([int(version)], dtype=torch.int64, device=self.device))
        buf = torch.empty(
            max(size for size, _ in self._layout), dtype=torch.uint8, device=self.device
        )
        for size, members in self._layout:
            for spec, offset in members:
                t = state_dict[spec.name].detach().to(self.device, spec.torch_dtype)
                buf[offset : offset + spec.nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
            self._broadcast(buf[:size])

    def abort(self, reason: str) -> None:
        """Rank 0: call off this publish instead of sending; every receiver's ``receive``
        raises at once with ``reason`` (rather than waiting for the timeout)."""
        self._check(sender=True)
        self._sends += 1
        self._store.set(f"abort/{self._sends}", reason)
        self._broadcast(torch.tensor([_ABORT], dtype=torch.int64, device=self.device))

    def receive(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver: the header now, then an iterator over ``(name, tensor)`` that receives
        bucket by bucket; exhaust it (the sender's broadcast waits for every member).

        Raises:
            RuntimeError: The sender aborted this publish (its reason), or sent another
                version than ``version`` (after the rest was drained, so the bus stays usable).
        """
        self._check(sender=False)
        self._sends += 1
        header = torch.empty(1, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        sent = int(header.item())
        if sent == _ABORT:
            reason = self._store.get(f"abort/{self._sends}").decode()
            raise RuntimeError(f"weight bus {self.spec.address}: the sender aborted: {reason}")
        if sent != version:
            for _ in self._buckets():
                pass
            raise RuntimeError(
                f"weight bus {self.spec.address}: rank {self.rank} expected version {version}, "
                f"the sender broadcast {sent}"
            )
        return self._buckets()

    def _buckets(self) -> Iterator[tuple[str, torch.Tensor]]:
        for size, members in self._layout:
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)  # fresh: see top
            self._broadcast(buf)
            for spec, offset in members:
                raw = buf[offset : offset + spec.nbytes]
                yield spec.name, raw.view(spec.torch_dtype).view(spec.shape)

    def close(self) -> None:
        """Leave the bus (rank 0 also stops its store); idempotent. Dropping the group
        closes its connections: a peer blocked in a collective on it fails at once."""
        group, self._group, self._store = self._group, None, None
        if group is not None and self.spec.backend == "nccl":
            with contextlib.suppress(RuntimeError):  # frees the communicator's resources
                group.abort()

    # ------------------------------------------------------------------ internals

    def _check(self, sender: bool) -> None:
        if self._group is None:
            raise RuntimeError(f"weight bus {self.spec.address}: not joined (or closed)")
        if sender != (self.rank == 0):
            raise RuntimeError(
                f"weight bus: rank {self.rank} cannot {'send' if sender else 'receive'}"
            )

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            self._group.broadcast([tensor], opts).wait()
        except RuntimeError:
            # A member died: leave, so the others fail now rather than at the timeout
            # (gloo's tree would keep them waiting for data that will not come).
            self.close()
            raise


def _misfit(
    manifest: tuple[TensorSpec, ...], have: Mapping[str, tuple[int, ...]], where: str
) -> str:
    """The first tensor of ``manifest`` missing from ``have`` or shaped otherwise; ``""``."""
    for spec in manifest:
        shape = have.get(spec.name)
        if shape is None:
            return f"{spec.name!r} is in the manifest but not in {where}"
        if tuple(shape) != spec.shape:
            return f"{spec.name!r}: shape {tuple(shape)} in {where}, {spec.shape} in the manifest"
    return ""


def _device(backend: Backend, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


def _new_group(store, rank: int, spec: BusSpec):
    """The bus's process group on its own key space of ``store`` (no default group)."""
    prefixed = dist.PrefixStore("group/", store)
    timeout = timedelta(seconds=spec.timeout_s)
    if spec.backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
    if spec.backend == "nccl":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise RuntimeError("weight bus backend 'nccl' needs a CUDA build of torch")
        opts = nccl.Options()
        opts._timeout = timeout
        return nccl(prefixed, rank, spec.world_size, opts)
    raise ValueError(f"weight bus backend must be 'gloo' or 'nccl', got {spec.backend!r}")
