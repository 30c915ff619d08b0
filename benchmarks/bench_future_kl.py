"""Future-KL speed and accuracy: chunked decay-matrix matmul (public ports) vs trainer.fipo.

Usage:
    .venv/bin/python benchmarks/bench_future_kl.py                  # CPU, B=8, T=16,384
    .venv/bin/python benchmarks/bench_future_kl.py --device cuda --batch 64 --model-ratio

Both methods run in the same process on the same inputs. The baseline is what public
ports do: for each chunk of 128 positions, build the T x 128 matrix of ``gamma^(k-t)``
(zero for k < t) and multiply, O(B*T^2) work. Errors are max |F - F_ref| against a
float64 recurrence. The script also times ``policy_loss`` forward + backward (FIPO and
DAPO) and, with ``--model-ratio``, compares that to one forward + backward of a randomly
initialised Qwen2-0.5B-shaped model on the same tokens (meant for a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from trainer.fipo import LossConfig, future_kl, policy_loss
from trainer.kernels.reverse_scan import discounted_reverse_cumsum


def chunked_matmul_future_kl(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    decay_rate: float,
    ratio_cap: float,
    chunk: int = 128,
    power_table: bool = False,
) -> torch.Tensor:
    """The public ports' approach: one T x chunk decay matrix and one matmul per chunk.

    ``power_table=False`` builds each matrix with ``gamma ** distance`` as the ports do;
    ``True`` looks the powers up in a table computed once per call (a cheaper build, so
    the speed-up quoted against it is the conservative one).
    """
    x = log_ratio * mask * (torch.exp(log_ratio) <= ratio_cap)
    T = x.shape[1]
    gamma = 2.0 ** (-1.0 / decay_rate)
    k = torch.arange(T, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    powers = gamma ** torch.arange(T, device=x.device, dtype=torch.float64)
    powers = powers.to(x.dtype)
    out = torch.empty_like(x)
    for start in range(0, T, chunk):
        t = torch.arange(start, min(start + chunk, T), device=x.device)
        dist = k[:, None] - t[None, :]  # [T, chunk]
        if power_table:
            decay = torch.where(dist >= 0, powers[dist.clamp(min=0)], zero)
        else:
            decay = torch.where(dist >= 0, gamma ** dist.clamp(min=0).to(x.dtype), zero)
        out[:, start : start + len(t)] = x @ decay
    return out


def reference(
    log_ratio: torch.Tensor, mask: torch.Tensor, decay_rate: float, ratio_cap: float
) -> torch.Tensor:
    """Float64 recurrence ``F_t = x_t + gamma F_{t+1}`` on the CPU (slow but exact)."""
    x = log_ratio.double().cpu()
    x = torch.where(mask.bool().cpu() & (torch.exp(x) <= ratio_cap), x, 0.0).numpy()
    gamma = 2.0 ** (-1.0 / decay_rate)
    out = x.copy()
    for t in range(x.shape[1] - 2, -1, -1):
        out[:, t] += gamma * out[:, t + 1]
    return torch.from_numpy(out)


def timeit(
    fn: Callable[[], torch.Tensor | None], device: torch.device, repeats: int
) -> tuple[float, float, torch.Tensor | None]:
    """Median and min wall time in ms over ``repeats`` runs after one warm-up, and the
    warm-up's output."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), out


def model_ratio(batch: int, length: int, device: torch.device, loss_ms: float) -> None:
    """Loss fwd+bwd time as a share of a Qwen2-0.5B-shaped model's fwd+bwd on the tokens."""
    from bench_learner import qwen2_05b_config  # run as a file: benchmarks/ is on sys.path
    from transformers import Qwen2ForCausalLM

    cfg = qwen2_05b_config(max(32_768, length))
    cfg.use_cache = False  # training step; also keeps gradient checkpointing from warning
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)

    def step() -> None:
        # One sequence at a time (as a learner's micro-batches would), loss on hidden states
        # only so the full-vocab logits of 16k tokens are not the thing being measured.
        for _ in range(batch):
            hidden = model.model(input_ids=ids).last_hidden_state
            hidden.float().square().mean().backward()

    ms, _, _ = timeit(step, device, repeats=1)
    print(f"model fwd+bwd (Qwen2-0.5B shape, {batch} x {length}): {ms:9.1f} ms")
    print(f"policy_loss share of model step:                {100 * loss_ms / ms:8.2f} %")


def main() -> None:
    from trainer.precision import describe_machine

    print(describe_machine(), flush=True)  # figures depend on it (bf16 is native only on some CPUs)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=16_384)
    parser.add_argument("--decay-rate", type=float, default=32.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--baseline-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--model-ratio", action="store_true", help="also time a 0.5B model step")
    parser.add_argument(
        "--backend",
        choices=["torch", "triton"],
        default="torch",
        help="future_kl backend to time (triton: CUDA only, never validated here)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B, T, tau, cap = args.batch, args.length, args.decay_rate, 10.0
    g = torch.Generator().manual_seed(0)
    # Log-ratio shifts of a later mini-batch are small, with a few large ones.
    log_ratio = (torch.randn(B, T, generator=g) * 0.05).to(device)
    log_ratio[:, ::997] += 3.0  # ratio ~20 > c: exercises the filter
    mask = torch.ones(B, T, device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # padded rows

    print(f"device={device} threads={torch.get_num_threads()} B={B} T={T} tau={tau} c={cap}")
    ref = reference(log_ratio, mask, tau, cap)

    gamma = 2.0 ** (-1.0 / tau)
    x32 = torch.where((mask > 0) & (log_ratio <= torch.log(torch.tensor(cap))), log_ratio, 0.0)
    rows = [
        (
            "baseline: chunked T x 128 matmul, pow build",
            lambda: chunked_matmul_future_kl(log_ratio, mask, tau, cap),
            args.baseline_repeats,
        ),
        (
            "baseline: chunked T x 128 matmul, table build",
            lambda: chunked_matmul_future_kl(log_ratio, mask, tau, cap, power_table=True),
            args.baseline_repeats,
        ),
        (
            f"future_kl backend={args.backend}",
            lambda: future_kl(log_ratio, mask, tau, ratio_cap=cap, backend=args.backend),
            args.repeats,
        ),
        (
            "  the scan alone in fp32 (for reference)",
            lambda: discounted_reverse_cumsum(x32, gamma),
            args.repeats,
        ),
    ]
    if args.backend == "triton":  # compare the kernel with the default path too
        rows.append(
            (
                "future_kl backend=torch",
                lambda: future_kl(log_ratio, mask, tau, ratio_cap=cap),
                args.repeats,
            )
        )
    print(f"{'method':46s} {'median ms':>10s} {'min ms':>10s} {'max abs err':>12s}")
    results = []
    for name, fn, repeats in rows:
        ms, mn, out = timeit(fn, device, repeats)
        err = (out.double().cpu() - ref).abs().max().item()
        results.append((ms, mn))
        print(f"{name:46s} {ms:10.3f} {mn:10.3f} {err:12.2e}")
    ours_ms, ours_min = results[2]
    for label, (ms, mn) in (("pow build", results[0]), ("table build", results[1])):
        print(
            f"speed-up future_kl vs baseline ({label}): {ms / ours_ms:9.1f}x median,"
            f" {mn / ours_min:9.1f}x min"
        )

    old = (-torch.rand(B, T, generator=g) * 3).to(device)
    logp0 = old + log_ratio
    adv = torch.randn(B, generator=g).to(device)
    for name, cfg in (("fipo", LossConfig.fipo()), ("dapo", LossConfig.dapo())):

        def step(cfg: LossConfig = cfg) -> None:
            logp = logp0.clone().requires_grad_()
            loss, _ = policy_loss(logp, old, adv, mask, cfg)
            loss.backward()
            return None

        ms, mn, _ = timeit(step, device, args.repeats)
        print(f"policy_loss fwd+bwd {name} (B={B}, T={T}): median {ms:8.3f} ms, min {mn:8.3f} ms")
        if name == "fipo":
            fipo_ms = ms
    if args.model_ratio:
        model_ratio(B, T, device, fipo_ms)


if __name__ == "__main__":
    main()
