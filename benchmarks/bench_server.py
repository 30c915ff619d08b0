"""Reward-server throughput and latency vs an in-process ProcessPoolExecutor (same cores).

    python benchmarks/bench_server.py [--workers 2] [--golds 30] [--group 16]

One run measures, on the same machine and worker count:

1. baseline: ``concurrent.futures.ProcessPoolExecutor(workers)`` calling math-verify's
   ``parse`` (gold and response) and ``verify`` per item -- what a trainer would write;
2. the gRPC server (a ``python -m server`` subprocess; the client is this process) with
   no caching (gold and result caches off);
3. the server with gold caching (G = ``--group`` responses share each gold);
4. latency one item at a time (the fixed cost of each path), then p50/p99 at half load
   (open loop, items streamed at 50 % of the measured throughput), server and baseline;
5. 5 % hostile items mixed in: throughput drop vs (3), and every item's latency vs its
   deadline + 250 ms (open loop at half load).

The mix: G responses per gold; golds are integers, fractions, LaTeX expressions and
intervals; half the responses are right (often in another form), half wrong; each is a
2-10k-character chain of thought ending in a boxed answer. Figures are printed with ratios
against the baseline measured in the same run. Items are distinct, so the result cache never
hits (it stays on its default only where said).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from server.client import RewardClient  # noqa: E402
from server.types import ScoreItem, Status  # noqa: E402


def gold_and_answers(g: int) -> tuple[str, list[str], list[str]]:
    """A distinct gold for group ``g`` (integer, fraction, expression, radical, pi, interval)
    with right forms (often rewritten) and wrong ones. Golds never repeat, so the gold cache
    only helps within a group of G, as in training."""
    k = g + 2
    kind = g % 6
    if kind == 0:
        return (
            str(10 * k + 1),
            [str(10 * k + 1), f"\\frac{{{2 * (10 * k + 1)}}}{{2}}"],
            [str(10 * k), str(-(10 * k + 1))],
        )
    if kind == 1:
        a, b = k, 2 * k + 1  # coprime
        return (
            f"\\frac{{{a}}}{{{b}}}",
            [f"\\frac{{{a}}}{{{b}}}", f"\\frac{{{3 * a}}}{{{3 * b}}}", f"{a}/{b}"],
            [f"\\frac{{{b}}}{{{a}}}", f"\\frac{{{a}}}{{{b + 1}}}"],
        )
    if kind == 2:
        return (
            f"x^2+{2 * k}x+{k * k}",
            [f"(x+{k})^2", f"x^2+{2 * k}x+{k * k}"],
            [f"(x-{k})^2", f"x^2+{k * k}"],
        )
    if kind == 3:
        return (
            f"{k}\\sqrt{{3}}",
            [f"{k}\\sqrt{{3}}", f"\\sqrt{{{3 * k * k}}}"],
            [f"{k}\\sqrt{{2}}", f"\\sqrt{{{3 * k}}}"],
        )
    if kind == 4:
        return (
            f"\\frac{{\\pi}}{{{k}}}",
            [f"\\frac{{\\pi}}{{{k}}}", f"\\pi/{k}"],
            [f"\\frac{{\\pi}}{{{k + 1}}}", f"\\frac{{{k}}}{{\\pi}}"],
        )
    return (
        f"({k}, {k + 4}]",
        [f"({k},{k + 4}]", f"({k}, {k + 4}]"],
        [f"[{k},{k + 4}]", f"({k},{k + 4})"],
    )


FILLER = [
    "Let us consider the problem carefully.",
    "We substitute $x = {a}$ into the equation and simplify.",
    "Multiplying both sides by ${b}$ gives ${c}$.",
    "Note that $({a} + {b})^2 = {a}^2 + 2 \\cdot {a} \\cdot {b} + {b}^2$.",
    "By the triangle inequality, $|{a} - {b}| \\le |{a}| + |{b}|$.",
    "Hence the sum $\\sum_{{k=1}}^{{{a}}} k = \\frac{{{a}({a}+1)}}{{2}}$.",
    "Checking the boundary case {c} separately, nothing changes.",
    "Wait, let me re-examine the previous step.",
    "So far we have {a} + {b} = {c}.",
]

HOSTILE = [
    "\\boxed{9^{9^{9^{9}}}}",
    "{" * 5000 + "}" * 5000,
    "\\boxed{1000000!}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{(99999!)!}",
    "\\boxed{1}\x00",
    "9" * 2000,
    "x" * 200_000,
    "\\boxed{" * 400 + "1" + "}" * 400,
    "\\boxed{2^{3^{4^{5}}}}",
]


def chain_of_thought(rng: random.Random, answer: str) -> str:
    target = rng.randint(2_000, 10_000)
    parts: list[str] = []
    n = 0
    while n < target:
        s = rng.choice(FILLER).format(
            a=rng.randint(2, 99), b=rng.randint(2, 99), c=rng.randint(2, 999)
        )
        parts.append(s)
        n += len(s) + 1
    return " ".join(parts) + f"\n\nTherefore, the final answer is $\\boxed{{{answer}}}$."


def make_items(n_golds: int, group: int, seed: int, tag: str) -> list[ScoreItem]:
    rng = random.Random(seed)
    items = []
    for g in range(n_golds):
        gold, right, wrong = gold_and_answers(g + 1000 * seed)
        for k in range(group):
            answer = rng.choice(right if k % 2 == 0 else wrong)
            items.append(ScoreItem(f"{tag}-{g}-{k}", chain_of_thought(rng, answer), (gold,)))
    return items


def with_hostile(
    items: list[ScoreItem], share: float, seed: int, deadline_s: float
) -> list[ScoreItem]:
    rng = random.Random(seed)
    out = []
    for it in items:
        if rng.random() < share:
            out.append(
                ScoreItem(it.id + "-h", rng.choice(HOSTILE), it.golds, deadline_s=deadline_s)
            )
        else:
            out.append(ScoreItem(it.id, it.response, it.golds, deadline_s=deadline_s))
    return out


# ----------------------------------------------------------------------------- baseline


def baseline_verify(gold: str, response: str) -> bool:
    """What a trainer would write: math-verify per item, default timeouts, no caching."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    g = parse(f"${gold}$", [LatexExtractionConfig()])
    p = parse(response, [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])
    return verify(g, p)


def run_baseline(ex: cf.ProcessPoolExecutor, items: list[ScoreItem]) -> float:
    t = time.perf_counter()
    futures = [ex.submit(baseline_verify, it.golds[0], it.response) for it in items]
    for f in futures:
        f.result()
    return len(items) / (time.perf_counter() - t)


def open_loop_baseline(
    ex: cf.ProcessPoolExecutor, items: list[ScoreItem], rate: float
) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()
    futures = []
    start = time.perf_counter()
    for i, it in enumerate(items):
        _sleep_until(start + i / rate)
        sent = time.perf_counter()
        f = ex.submit(baseline_verify, it.golds[0], it.response)
        f.add_done_callback(lambda _f, s=sent: _append(lat, lock, time.perf_counter() - s))
        futures.append(f)
    cf.wait(futures)
    time.sleep(0.05)
    return lat


def _append(lst, lock, v):
    with lock:
        lst.append(v)


def _sleep_until(t: float) -> None:
    d = t - time.perf_counter()
    if d > 0:
        time.sleep(d)


# ----------------------------------------------------------------------------- server


class ServerProcess:
    def __init__(self, workers: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--port",
                "0",
                "--no-metrics",
                "--workers",
                str(workers),
                *args,
            ],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stderr:
            rec = json.loads(line)
            if rec["msg"] == "reward server listening":
                self.address = "127.0.0.1:" + rec["address"].rsplit(":", 1)[1]
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def run_server(client: RewardClient, items: list[ScoreItem]) -> tuple[float, list]:
    t = time.perf_counter()
    results = client.score(items)
    return len(items) / (time.perf_counter() - t), results


def open_loop_server(
    client: RewardClient, items: list[ScoreItem], rate: float
) -> tuple[list[float], list]:
    sent: dict[str, float] = {}
    start = time.perf_counter()

    def gen():
        for i, it in enumerate(items):
            _sleep_until(start + i / rate)
            sent[it.id] = time.perf_counter()
            yield it

    lat, results = [], []
    for r in client.score_stream(gen(), timeout_s=600):
        lat.append(time.perf_counter() - sent[r.id])
        results.append(r)
    return lat, results


def tree_cpu(pid: int) -> float:
    """CPU seconds used by process ``pid`` and its descendants (reaped ones included)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def executor_cpu(ex: cf.ProcessPoolExecutor) -> float:
    return sum(tree_cpu(pid) for pid in list(ex._processes)) + self_cpu()


def measured(fn, cpu_fn, n: int) -> tuple[float, float]:
    """Run ``fn``; return (items/s wall clock, CPU ms per item over the measured processes)."""
    c0 = cpu_fn()
    rate = fn()
    return rate, (cpu_fn() - c0) / n * 1e3


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def main() -> int:
    from trainer.precision import describe_machine

    print(describe_machine(), flush=True)  # figures depend on it (bf16 is native only on some CPUs)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--golds", type=int, default=30, help="distinct golds per scenario")
    ap.add_argument("--group", type=int, default=16, help="responses per gold (G)")
    ap.add_argument("--deadline", type=float, default=2.0, help="per-item deadline, hostile run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    args = ap.parse_args()
    W, n = args.workers, args.golds * args.group
    print(
        f"# bench_server: workers={W}, items/scenario={n} (G={args.group}), cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f}"
    )
    print(
        f"# command: python benchmarks/bench_server.py --workers {W} --golds {args.golds} --group {args.group} --rounds {args.rounds}"
    )
    print(
        "# throughput rounds interleave the three systems on the same items; ratios are per round"
    )
    sets = [
        make_items(args.golds, args.group, seed=s + 1, tag=f"r{s}") for s in range(args.rounds + 2)
    ]
    warm = make_items(2, 4, seed=99, tag="warm")
    fig: dict[str, float] = {}
    srv_a = ServerProcess(W, "--gold-cache", "0", "--result-cache", "0")
    srv_b = ServerProcess(W, "--result-cache", "0", "--deadline", str(args.deadline))
    try:
        with (
            cf.ProcessPoolExecutor(W) as ex,
            RewardClient(srv_a.address, batch_size=64, max_in_flight=4, timeout_s=600) as ca,
            RewardClient(srv_b.address, batch_size=64, max_in_flight=4, timeout_s=600) as cb,
        ):
            for it in warm:
                ex.submit(baseline_verify, it.golds[0], it.response).result()
            ca.score(warm)
            cb.score(warm)
            rows, cpus = [], []
            cpu_a = lambda: tree_cpu(srv_a.proc.pid) + self_cpu()  # noqa: E731 -- server + client
            cpu_b = lambda: tree_cpu(srv_b.proc.pid) + self_cpu()  # noqa: E731
            for r in range(args.rounds):
                items = sets[r]
                base, c0 = measured(
                    lambda it=items: run_baseline(ex, it), lambda: executor_cpu(ex), n
                )
                a, c1 = measured(lambda it=items: run_server(ca, it)[0], cpu_a, n)
                b, c2 = measured(lambda it=items: run_server(cb, it)[0], cpu_b, n)
                rows.append((base, a, b))
                cpus.append((c0, c1, c2))
                print(
                    f"round {r}: baseline {base:6.1f}/s {c0:5.2f} CPU-ms/item | server no cache {a:6.1f}/s "
                    f"({a / base:.2f}x) {c1:5.2f} CPU-ms | server gold cache {b:6.1f}/s ({b / base:.2f}x) {c2:5.2f} CPU-ms"
                )
            base, a, b = (statistics.median(x) for x in zip(*rows, strict=True))
            ra = statistics.median(x[1] / x[0] for x in rows)
            rb = statistics.median(x[2] / x[0] for x in rows)
            c0, c1, c2 = (statistics.median(x) for x in zip(*cpus, strict=True))
            fig.update(
                baseline_vps=base,
                server_nocache_vps=a,
                server_goldcache_vps=b,
                ratio_nocache=ra,
                ratio_goldcache=rb,
                baseline_cpu_ms=c0,
                server_nocache_cpu_ms=c1,
                server_goldcache_cpu_ms=c2,
            )
            print(
                f"median wall clock: baseline ProcessPoolExecutor({W}) {base:.1f}/s; server no caching {a:.1f}/s "
                f"= {ra:.2f}x (target >= 0.9x); server gold caching {b:.1f}/s = {rb:.2f}x (target >= 1.3x)"
            )
            print(
                f"median CPU cost (all processes involved, client included): baseline {c0:.2f} ms/item; "
                f"server no caching {c1:.2f} ms ({c0 / c1:.2f}x as efficient); gold caching {c2:.2f} ms "
                f"({c0 / c2:.2f}x) -- the load-independent view on a shared machine"
            )

            # One item at a time (no queueing): the fixed cost of the path itself.
            one_b, one_s = [], []
            for it in sets[args.rounds][:80]:
                t = time.perf_counter()
                ex.submit(baseline_verify, it.golds[0], it.response).result()
                one_b.append(time.perf_counter() - t)
                t = time.perf_counter()
                cb.score([ScoreItem(it.id + "-1", it.response, it.golds)])
                one_s.append(time.perf_counter() - t)
            fig.update(one_baseline_p50_ms=pct(one_b, 0.5), one_server_p50_ms=pct(one_s, 0.5))
            print(
                f"one item at a time (80 items): baseline p50 {pct(one_b, 0.5):.1f} ms p90 {pct(one_b, 0.9):.1f} ms | "
                f"server (unary Score) p50 {pct(one_s, 0.5):.1f} ms p90 {pct(one_s, 0.9):.1f} ms"
            )
            base_lat = open_loop_baseline(ex, sets[args.rounds], rate=base / 2)
            lat, _ = open_loop_server(cb, sets[args.rounds], rate=b / 2)
            fig.update(
                baseline_half_p50_ms=pct(base_lat, 0.5),
                baseline_half_p99_ms=pct(base_lat, 0.99),
                server_half_p50_ms=pct(lat, 0.5),
                server_half_p99_ms=pct(lat, 0.99),
            )
            print(
                f"half load: baseline at {base / 2:.0f}/s p50 {pct(base_lat, 0.5):.1f} ms p99 {pct(base_lat, 0.99):.1f} ms | "
                f"server at {b / 2:.0f}/s p50 {pct(lat, 0.5):.1f} ms p99 {pct(lat, 0.99):.1f} ms (target p99 < 50 ms)"
            )

            clean = [
                ScoreItem(it.id, it.response, it.golds, deadline_s=args.deadline)
                for it in sets[args.rounds + 1]
            ]
            hostile = with_hostile(sets[args.rounds + 1], 0.05, seed=7, deadline_s=args.deadline)
            n_h = sum(it.id.endswith("-h") for it in hostile)
            c_v, h_v, hres = [], [], []
            for _ in range(2):  # interleaved, best of two each
                c_v.append(run_server(cb, clean)[0])
                hv, hres = run_server(cb, hostile)
                h_v.append(hv)
            drop = 1 - max(h_v) / max(c_v)
            statuses = {
                s.value: sum(r.status is s for r in hres)
                for s in Status
                if any(r.status is s for r in hres)
            }
            fig.update(clean_vps=max(c_v), hostile_vps=max(h_v), hostile_drop_pct=100 * drop)
            print(
                f"5% hostile ({n_h}/{len(hostile)} items): {max(h_v):.1f}/s vs {max(c_v):.1f}/s clean: drop {drop * 100:.1f}% (target < 20%); statuses {statuses}"
            )
            lat_h, res_h = open_loop_server(cb, hostile, rate=b / 2)
            bound = (args.deadline + 0.25) * 1e3
            late = [(r, x) for r, x in zip(res_h, lat_h, strict=True) if x * 1e3 > bound]
            over = len(late)
            for r, x in late:
                print(
                    f"   late: {r.id} {r.status.value} client {x * 1e3:.0f} ms, server-side "
                    f"{r.latency_ms:.0f} ms (queue + verification), hostile={r.id.endswith('-h')}"
                )
            fig.update(
                hostile_half_p99_ms=pct(lat_h, 0.99),
                hostile_half_max_ms=max(lat_h) * 1e3,
                hostile_over_bound=over,
            )
            print(
                f"5% hostile at half load: p99 {pct(lat_h, 0.99):.1f} ms, max {max(lat_h) * 1e3:.1f} ms; "
                f"items later than deadline + 250 ms ({bound:.0f} ms): {over}/{len(lat_h)}"
            )
    finally:
        srv_a.stop()
        srv_b.stop()
    print("# figures " + json.dumps({k: round(v, 2) for k, v in fig.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
