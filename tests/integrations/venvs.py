"""Throwaway virtualenvs holding the third-party trainers the adapters are tested against.

None of verl, OpenRLHF or TRL is a dependency of this project, and their full dependency
sets are huge (vLLM, flash-attn, DeepSpeed, Ray clusters). Each gets its own venv under
``/tmp`` (``$FIPO_VENV_ROOT`` overrides), with the trainer pinned and installed
``--no-deps`` where its own pins would pull CUDA stacks, plus exactly what the import path
the adapter uses needs, pinned to what the project's venv holds where both have it.

Build them (CI does this once; tests build a missing one themselves unless
``FIPO_NO_VENV_BUILD=1``, and skip with the reason when that fails)::

    python tests/integrations/venvs.py openrlhf verl trl     # or: all

Each venv is marked ready by a ``.fipo-recipe`` file holding its recipe; a venv whose
recipe changed is rebuilt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Shared pins: the project's requirements.lock versions, so both sides of a test run the
# same torch / grpc / protobuf code.
_TORCH = "torch==2.13.0"  # the CPU wheel on this machine's index (pip caps torch <= 2.14.1)
_GRPC = ("grpcio==1.85.1", "grpcio-health-checking==1.85.1", "protobuf==7.36.2")
_HF = (
    "transformers==5.19.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface_hub==2.4.0",
)


@dataclass(frozen=True)
class Recipe:
    """How to build one venv.

    Attributes:
        name: Short name (``openrlhf``, ``verl``, ``trl``).
        packages: Installed with their dependencies.
        no_deps: Installed with ``--no-deps`` afterwards (the trainer itself).
        probe: Python code that must run in the finished venv.
    """

    name: str
    packages: tuple[str, ...]
    no_deps: tuple[str, ...]
    probe: str


RECIPES: dict[str, Recipe] = {
    # openrlhf/utils/agent.py imports aiohttp and openrlhf.utils, whose __init__ imports
    # torch, transformers, sympy and pylatexenc. Its pins (deepspeed, flash-attn, vllm,
    # ray, transformers 5.15) are for training, which the test does not do.
    "openrlhf": Recipe(
        name="openrlhf",
        packages=(
            _TORCH,
            *_HF,
            "numpy==2.3.5",
            "sympy==1.14.0",
            "pylatexenc",
            "aiohttp==3.14.5",
            *_GRPC,
        ),  # fmt: skip
        no_deps=("openrlhf==0.11.2",),
        probe="from openrlhf.utils.agent import SingleTurnAgentExecutor",
    ),
    # verl.trainer.ppo.core_algos (policy-loss registry) and verl.trainer.ppo.reward
    # (custom reward functions) import verl/__init__ -> verl.protocol -> ray, tensordict,
    # omegaconf, transformers; its reward loop (the PPO trainer's reward path) aiohttp.
    # verl 0.9.1 wants transformers < 5.11.
    "verl": Recipe(
        name="verl",
        packages=(
            _TORCH,
            "numpy==2.3.5",
            "omegaconf",
            "hydra-core",
            "tensordict==0.10.0",
            "transformers==5.10.2",
            "ray==2.60.0",
            "codetiming",
            "dill",
            "packaging",
            "pylatexenc",
            "aiohttp==3.14.5",
            *_GRPC,
        ),  # fmt: skip
        no_deps=("verl==0.9.1",),
        probe=(
            "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "from verl.trainer.ppo.reward import get_custom_reward_fn\n"
            "from verl.workers.reward_manager.batch import BatchRewardManager\n"
            "from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager"
        ),
    ),
}


def _trl_requirements() -> tuple[str, ...]:
    """TRL's pins, declared once in ``benchmarks/bench_trl.py`` (its venv recipe)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_trl.py"
    spec = importlib.util.spec_from_file_location("_bench_trl_pins", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  (dataclasses look it up)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return tuple(module.TRL_REQUIREMENTS)


# TRL 1.16 with its dependencies (all CPU wheels), as benchmarks/bench_trl.py installs it.
RECIPES["trl"] = Recipe(
    name="trl",
    packages=_trl_requirements(),
    no_deps=(),
    probe="import trl, transformers; from trl import GRPOConfig, GRPOTrainer",
)


def venv_root() -> Path:
    """Where the venvs live: ``$FIPO_VENV_ROOT`` or ``/tmp``."""
    return Path(os.environ.get("FIPO_VENV_ROOT", "/tmp"))


def python_of(name: str) -> Path:
    """The interpreter of the venv ``name`` (it may not exist yet)."""
    return venv_root() / f"fipo-{name}-venv" / "bin" / "python"


def _marker(name: str) -> Path:
    return python_of(name).parents[1] / ".fipo-recipe"


def is_ready(name: str) -> bool:
    """Whether the venv ``name`` exists and was built from the current recipe."""
    marker = _marker(name)
    return marker.exists() and marker.read_text() == json.dumps(asdict(RECIPES[name]))


def build(name: str, *, quiet: bool = True) -> Path:
    """Create (or complete) the venv ``name`` from its recipe; returns its python.

    Raises:
        RuntimeError: pip or the probe failed; the message holds the tail of the output.
    """
    recipe = RECIPES[name]
    python = python_of(name)
    q = ["-q"] if quiet else []
    steps = []
    if not python.exists():
        steps.append([sys.executable, "-m", "venv", str(python.parents[1])])
    steps += [
        [str(python), "-m", "pip", "install", *q, *recipe.packages],
        *([[str(python), "-m", "pip", "install", *q, "--no-deps", *recipe.no_deps]]
          if recipe.no_deps else []),
        [str(python), "-c", recipe.probe],
    ]  # fmt: skip
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(
                f"building the {name} venv failed at {' '.join(cmd[:5])} ...:\n{tail}"
            )
    _marker(name).write_text(json.dumps(asdict(recipe)))
    return python


def ensure(name: str) -> tuple[Path | None, str]:
    """The venv's python, building it when absent; ``(None, reason)`` when unavailable."""
    if is_ready(name):
        return python_of(name), ""
    if os.environ.get("FIPO_NO_VENV_BUILD") == "1":
        return None, (
            f"the {name} venv is not built and FIPO_NO_VENV_BUILD=1; "
            f"build it with `python tests/integrations/venvs.py {name}`"
        )
    try:
        return build(name), ""
    except RuntimeError as e:
        return None, str(e)


def python_or_skip(name: str) -> Path:
    """For a test fixture: the venv's python, or ``pytest.skip`` with the reason."""
    import pytest

    python, reason = ensure(name)
    if python is None:
        pytest.skip(f"{name} venv unavailable: {reason}")
    return python


def main(argv: list[str]) -> int:
    names = list(RECIPES) if argv in ([], ["all"]) else argv
    for name in names:
        if name not in RECIPES:
            raise SystemExit(f"unknown venv {name!r}; choose from {sorted(RECIPES)} or all")
        print(f"building {python_of(name)} ...", flush=True)
        build(name, quiet=False)
        print(f"{name}: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
