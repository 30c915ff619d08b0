"""Train with TRL's ``GRPOTrainer``, rewarded by the fipo reward server (TRL 1.16).

The reward is ``server.trl_reward.make_trl_reward_func`` over a ``RewardClient``: TRL calls
it with the completions and the dataset's ``answer`` column, it sends them in one gRPC
``Score`` call and returns one reward per completion. Everything else is TRL's.

Run the server in the project's environment, then this script where TRL is installed
(the throwaway venv of ``tests/integrations/venvs.py trl`` or ``bench_trl.py``; it needs
only TRL, grpcio, grpcio-health-checking and protobuf, plus this checkout on the path)::

    python -m server --port 50051 --no-metrics &                # project venv
    /tmp/fipo-trl-venv/bin/python examples/trl_grpo.py --steps 3  # TRL venv

It trains the embedded SmolLM2-135M-Instruct (converted once by the project:
``python -c "from fipo_env.models import default_model_dir; print(default_model_dir())"``)
on one-digit additions on the CPU, and prints one JSON line per step plus a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the reward client comes from this checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Question: What is {a} + {b}? Put the final answer in \\boxed{{}}.\nAnswer:"


def default_model() -> Path:
    """The embedded model's folder (``fipo_env.models.default_model_dir``, without importing it)."""
    cache = os.environ.get("FIPO_CACHE_DIR")
    root = Path(cache).expanduser() if cache else Path.home() / ".cache" / "fipo"
    return root / "models" / "SmolLM2-135M-Instruct"


def build_dataset(n: int, seed: int):
    """``n`` one-digit additions with the gold in column ``answer``."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": PROMPT.format(a=a, b=b), "answer": str(a + b)})
    return Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reward-address",
                   default=os.environ.get("FIPO_REWARD_ADDRESS", "127.0.0.1:50051"),
                   help="host:port of the reward server (default $FIPO_REWARD_ADDRESS or %(default)s)")  # fmt: skip
    p.add_argument("--token", default=os.environ.get("FIPO_REWARD_TOKEN"), help="bearer token")
    p.add_argument("--model", type=Path, default=default_model())
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/trl-grpo-example"))
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model} is not a model folder; convert the embedded model with "
                "`python -c \"from fipo_env.models import default_model_dir; default_model_dir()\"`")  # fmt: skip
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (GRPO compares completions of one prompt)")

    import torch
    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from server.client import RewardClient
    from server.trl_reward import make_trl_reward_func

    client = RewardClient(args.reward_address, token=args.token)
    info = client.server_info(timeout_s=30.0)  # fail early, with the reason, if unreachable
    scored = {"calls": 0, "items": 0}
    reward = make_trl_reward_func(client, gold_column="answer")

    def math_verify_reward(prompts, completions, **kwargs):
        scored["calls"] += 1
        scored["items"] += len(completions)
        return reward(prompts, completions, **kwargs)

    class Log(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                print(json.dumps({"step": state.global_step, "reward": logs["reward"],
                                  "loss": logs.get("loss")}), flush=True)  # fmt: skip

    torch.manual_seed(args.seed)
    cfg = GRPOConfig(
        output_dir=str(args.out_dir), use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, max_steps=args.steps, seed=args.seed, learning_rate=args.lr,
        num_generations=args.group_size, per_device_train_batch_size=args.group_size,
        gradient_accumulation_steps=args.prompts, max_completion_length=args.max_tokens,
        use_vllm=False, dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=str(args.model),
        reward_funcs=[math_verify_reward],
        args=cfg,
        train_dataset=build_dataset(4 * args.steps * args.prompts, args.seed),
        processing_class=AutoTokenizer.from_pretrained(args.model),
        callbacks=[Log()],
    )
    t0 = time.perf_counter()
    trainer.train()
    client.close()
    print(json.dumps({"done": True, "steps": trainer.state.global_step, "trl": trl.__version__,
                      "server_version": info.server_version, "reward_calls": scored["calls"],
                      "items_scored": scored["items"], "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
