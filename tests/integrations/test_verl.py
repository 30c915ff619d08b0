"""verl 0.9.1: the ``fipo`` policy loss in verl's registry, and the custom reward functions.

Runs ``verl_driver.py`` in the verl venv (``venvs.py``) with this project on PYTHONPATH and
``VERL_USE_EXTERNAL_MODULES=trainer.verl_loss`` (how a verl run registers the loss):

- verl's ``get_policy_loss_fn("fipo")`` returns our function; on random tensors with a real
  ``FSDPActorConfig`` it equals ``trainer.fipo.policy_loss`` (loss and gradient) off-policy,
  where Future-KL is active, and on-policy it equals verl's own ``vanilla`` loss with the
  same clip settings; ``$FIPO_LOSS`` reaches FIPO's own fields;
- ``server/verl_reward.py``, loaded by verl's ``get_custom_reward_fn`` from its path, gives
  the rewards the gRPC client gets: called directly, through the reward loop's
  ``NaiveRewardManager`` (the PPO trainer's path) and through the legacy
  ``BatchRewardManager`` (``compute_score_batch``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from server.client import RewardClient
from server.config import PoolConfig, ServerConfig
from server.service import create_server
from server.types import ScoreItem, Status

from .venvs import python_or_skip

ROOT = Path(__file__).resolve().parents[2]
CASES = [
    {"response": "2 + 2 = 4, so \\boxed{4}.", "gold": "4"},
    {"response": "It is \\boxed{16}.", "gold": "15"},
    {"response": "No idea.", "gold": "-2"},
    {"response": "\\boxed{y^2 + 4y + 4}", "gold": "y**2 + 4*y + 4"},
    {"response": "\\boxed{y^2 + 4y + 5}", "gold": "y**2 + 4*y + 4"},
]


@pytest.fixture(scope="module")
def verl_python() -> Path:
    return python_or_skip("verl")


@pytest.fixture(scope="module")
def verl_run(verl_python, tmp_path_factory, default_model_dir):
    server, port = create_server(
        ServerConfig(port=0, metrics_port=None, pool=PoolConfig(workers=1))
    )
    try:
        tmp = tmp_path_factory.mktemp("verl")
        spec = {
            "address": f"127.0.0.1:{port}",
            "reward_file": str(ROOT / "server" / "verl_reward.py"),
            "tokenizer_dir": str(default_model_dir),
            "cases": CASES,
        }
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FIPO_LOSS")}
        env.update(PYTHONPATH=str(ROOT), VERL_USE_EXTERNAL_MODULES="trainer.verl_loss",
                   HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0")  # fmt: skip
        driver = Path(__file__).with_name("verl_driver.py")
        proc = subprocess.run([str(verl_python), str(driver), str(tmp / "spec.json")],
                              capture_output=True, text=True, env=env, cwd=tmp, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        with RewardClient(f"127.0.0.1:{port}") as client:
            want = client.score(
                [ScoreItem(str(i), c["response"], (c["gold"],)) for i, c in enumerate(CASES)]
            )
        yield got, want
    finally:
        server.stop(grace=1.0)


def test_fipo_loss_in_verl_registry(verl_run):
    got, _ = verl_run
    loss = got["loss"]
    assert got["verl"] == "0.9.1"
    assert loss["registry_returns_adapter"]
    off = loss["off_policy"]
    assert off["verl_fipo"] == pytest.approx(off["trainer_fipo"], rel=1e-12, abs=1e-12)
    assert off["grad_max_abs_diff"] < 1e-12
    assert off["differs_from_dapo"] > 1e-6  # Future-KL acted: not DAPO's value
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(off["metrics"])
    on = loss["on_policy"]
    assert on["verl_fipo"] == pytest.approx(on["verl_vanilla"], rel=1e-12, abs=1e-12)
    assert on["grad_max_abs_diff"] < 1e-12
    env = loss["env_override"]
    assert env["verl_fipo"] == pytest.approx(env["trainer_fipo"], rel=1e-12, abs=1e-12)
    assert env["verl_fipo"] != pytest.approx(off["verl_fipo"])


def test_verl_reward_functions_match_grpc(verl_run):
    got, want = verl_run
    reward = got["reward"]
    assert [r.status for r in want] == [
        Status.OK, Status.WRONG, Status.NO_ANSWER, Status.OK, Status.WRONG,
    ]  # fmt: skip
    assert [s["score"] for s in reward["single"]] == [r.reward for r in want]
    assert [s["status"] for s in reward["single"]] == [r.status.value for r in want]
    assert [s["acc"] for s in reward["single"]] == [float(r.correct) for r in want]
    assert reward["batch_rewards"] == [r.reward for r in want]
    assert reward["reward_loop_rewards"] == [r.reward for r in want]
    extra = reward["batch_extra"]
    assert extra["status"] == [r.status.value for r in want]
    assert extra["status_no_answer"] == [float(r.status is Status.NO_ANSWER) for r in want]
    assert "python_syntax_gold" in extra["flags"][3]
