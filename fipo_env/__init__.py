"""fipo_env: token-level Gymnasium environments for math reasoning.

Importing the package registers ``fipo_env/MathReasoning-v0`` (single env, and a native
vector env for ``gymnasium.make_vec``). Entry points are ``"module:Class"`` strings, so the
registration itself imports nothing heavy.

The registration turns off Gymnasium's passive env checker and order-enforcing wrappers:
they do not forward the token fast path (``step_tokens``), so ``gymnasium.make`` would
hide it; the env checks its own inputs and raises ``ResetNeeded`` on out-of-order calls,
and the tests run ``gymnasium.utils.env_checker.check_env`` on it.
"""

from __future__ import annotations

import gymnasium

ENV_ID = "fipo_env/MathReasoning-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="fipo_env.envs.math_reasoning:MathReasoningEnv",
        vector_entry_point="fipo_env.envs.vector:MathReasoningVectorEnv",
        disable_env_checker=True,
        order_enforce=False,
    )

# Convenience names, imported on first use so that `import fipo_env` (which registration
# needs) stays cheap.
_EXPORTS = {
    "EnvConfig": "fipo_env.config",
    "PromptTemplate": "fipo_env.config",
    "MathReasoningEnv": "fipo_env.envs.math_reasoning",
    "MathReasoningVectorEnv": "fipo_env.envs.vector",
    "LocalVerifier": "fipo_env.verifiers",
    "Verifier": "fipo_env.verifiers",
    "make_verifier": "fipo_env.verifiers",
    "ArithmeticTask": "fipo_env.tasks",
    "Problem": "fipo_env.tasks",
    "make_task": "fipo_env.tasks",
    "load_problems": "fipo_env.tasks",
    "sample_problems": "fipo_env.tasks",
}

__all__ = ["ENV_ID", *_EXPORTS]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fipo_env' has no attribute {name!r}")
