"""``fipo_env/MathReasoning-v0``: one math problem per episode, one token per step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.error import ResetNeeded

from fipo_env.config import EnvConfig
from fipo_env.envs import common
from fipo_env.tasks import Problem, Task, make_task
from fipo_env.verifiers import close_verifier, make_verifier

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from transformers import PreTrainedTokenizerBase

    from server.types import Scorer

ObsType = dict[str, np.ndarray]


class MathReasoningEnv(gym.Env[ObsType, np.int64]):
    """Token-level math reasoning: the policy writes the answer one token at a time.

    ## Description

    An episode is one problem from a task (built-in arithmetic by default, or reasoning-gym
    generators, or JSONL / Parquet / ``datasets`` files). ``reset`` draws a problem and
    renders it with the tokenizer's chat template; every ``step`` appends one generated
    token to the response. The token *is* the action, so the token ids (and the policy's
    log-probs of them) never drift through a decode / re-encode round trip, which
    whole-completion environments suffer from. ``step_tokens`` appends many tokens at once:
    the fast path for an inference engine (vLLM) that generates a whole response.

    ## Action Space

    ``Discrete(vocab_size)``: the id of the next response token (``vocab_size`` defaults to
    ``len(tokenizer)``).

    ## Observation Space

    A ``Dict`` of fixed-size arrays (``int32``):

    | key            | space                                        | meaning                     |
    |----------------|----------------------------------------------|-----------------------------|
    | ``prompt_ids``   | ``Box(0, vocab_size - 1, (max_prompt_tokens,))``   | prompt tokens, padded       |
    | ``prompt_len``   | ``Box(0, max_prompt_tokens, ())``                  | number of real prompt tokens|
    | ``response_ids`` | ``Box(0, vocab_size - 1, (max_response_tokens,))`` | response so far, padded     |
    | ``response_len`` | ``Box(0, max_response_tokens, ())``                | tokens generated so far     |

    Why fixed-size boxes plus lengths rather than a variable-length ``Sequence`` space:
    Gymnasium's vector machinery (``batch_space``, ``concatenate``) and every consumer of
    batched observations (a policy forward pass, a replay buffer) need arrays of one shape.
    Padded ``[N, max_len]`` buffers with ``[N]`` lengths stack into plain numpy arrays with
    no per-step allocation, which ``Sequence`` spaces (tuples of ragged arrays) cannot do.
    Positions at and past a length hold the pad id; ignore them.

    ## Rewards

    0 on every step until the episode ends; then the verifier's reward for the decoded
    response: 1 / 0 (binary) or +1 / -1 (signed), plus DAPO's soft overlong penalty when
    ``EnvConfig.overlong_buffer`` is set. ``info["reward_components"]`` splits the two.

    ## Starting State

    A problem drawn with the env's seeded generator (``reset(seed=...)`` makes the draw
    reproducible); or ``reset(options={"problem": Problem(...)})`` to pose a given one.
    The response is empty.

    ## Episode End

    - Termination: the policy emits a stop token (EOS by default); it is kept as the last
      response token.
    - Truncation: ``max_response_tokens`` tokens were generated without a stop token.

    At the end, ``info`` carries ``problem``, ``gold``, ``response`` (decoded, special
    tokens skipped), ``response_tokens``, ``stop_reason``, the verifier's ``status``,
    ``correct``, ``extracted_prediction``, ``extracted_gold`` and ``reward_components``.

    ## Arguments

    ```python
    gymnasium.make("fipo_env/MathReasoning-v0", tokenizer=None, task="arithmetic",
                   config=EnvConfig(), verifier="local", vocab_size=None)
    ```

    - ``tokenizer``: a Hugging Face tokenizer, a local model directory, or ``None`` for the
      embedded SmolLM2-135M-Instruct.
    - ``task``: a ``Task`` object or spec string (``"arithmetic:0,1"``,
      ``"reasoning_gym:basic_arithmetic"``, ``"file:/data/gsm8k.jsonl"``), train split.
    - ``config``: ``EnvConfig`` (lengths, stop tokens, reward scheme, prompt template);
      keyword overrides of its fields are accepted too (``max_response_tokens=128``).
    - ``verifier``: ``"local"`` (the reward server's worker pool in-process, started on
      first use), a reward-server address ``"host:port"``, or any ``server.types.Scorer``.
    - ``vocab_size``: action-space size if the model's vocabulary is larger than the
      tokenizer's (padded embedding tables).

    ## Version History

    - v0: initial version.
    """

    # render_fps only silences the passive checker; "ansi" text has no frame rate.
    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        task: str | Task = "arithmetic",
        config: EnvConfig | None = None,
        verifier: str | Scorer | None = "local",
        vocab_size: int | None = None,
        render_mode: str | None = None,
        **config_overrides: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        config = config or EnvConfig()
        if config_overrides:
            config = _replace(config, config_overrides)
        self.config = config
        self.render_mode = render_mode
        self.tokenizer = common.resolve_tokenizer(tokenizer)
        self.task = make_task(task)
        self.vocab_size = common.vocab_size_of(self.tokenizer, vocab_size)
        self.stop_ids = common.stop_ids_for(self.tokenizer, config)
        self._stop_set = frozenset(self.stop_ids)
        self._stop_arr = np.asarray(self.stop_ids, dtype=np.int64)
        self.pad_id = common.pad_id_of(self.tokenizer, self.vocab_size)
        self.verifier, self._owns_verifier = make_verifier(verifier)
        self._prompts = common.PromptCache(self.tokenizer, config)
        self._decode = common.make_batch_decoder(self.tokenizer)

        self.action_space = gym.spaces.Discrete(self.vocab_size)
        self.observation_space = common.observation_space(self.vocab_size, config)

        self._prompt = np.full(config.max_prompt_tokens, self.pad_id, dtype=common.TOKEN_DTYPE)
        self._response = np.full(config.max_response_tokens, self.pad_id, dtype=common.TOKEN_DTYPE)
        self._prompt_len = 0
        self._response_len = 0
        self._problem: Problem | None = None
        self._done = True
        self._needs_reset = True
        self._episodes = 0

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsType, dict[str, Any]]:
        """Draw a problem (or take ``options["problem"]``) and return the prompt tokens."""
        super().reset(seed=seed)
        unknown = sorted(set(options or {}) - {"problem"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; the only option is 'problem'")
        given = (options or {}).get("problem")
        if given is not None and not isinstance(given, Problem):
            raise TypeError(f"options['problem'] must be a fipo_env.tasks.Problem, got {given!r}")
        problem, ids = self._draw(given)
        self._problem = problem
        self._prompt_len = len(ids)
        self._prompt.fill(self.pad_id)
        self._prompt[: len(ids)] = ids
        self._response.fill(self.pad_id)
        self._response_len = 0
        self._done = False
        self._needs_reset = False
        self._episodes += 1
        return self._obs(), common.reset_info(problem, len(ids))

    def step(
        self, action: int | np.integer
    ) -> tuple[ObsType, SupportsFloat, bool, bool, dict[str, Any]]:
        """Append one token; at a stop token or the length limit, score the response."""
        self._check_running()
        try:
            tok = int(action)
        except (TypeError, ValueError):
            raise ValueError(f"action must be a token id (int), got {action!r}") from None
        if tok != action or not 0 <= tok < self.vocab_size:
            raise ValueError(f"action {action!r} is not a token id in [0, {self.vocab_size})")
        self._response[self._response_len] = tok
        self._response_len += 1
        stopped = tok in self._stop_set
        if stopped or self._response_len >= self.config.max_response_tokens:
            return self._finish(stopped, consumed=None)
        return self._obs(), 0.0, False, False, {}

    def step_tokens(
        self, token_ids: ArrayLike
    ) -> tuple[ObsType, SupportsFloat, bool, bool, dict[str, Any]]:
        """Append many tokens in one call (the fast path an inference engine feeds).

        Tokens are consumed up to and including the first stop token, or until the
        response-length limit; the rest are ignored. The result is the same episode as
        calling ``step`` once per consumed token.

        Args:
            token_ids: A 1-D sequence of token ids (list or numpy array); may be empty.

        Returns:
            ``(obs, reward, terminated, truncated, info)`` as ``step`` returns after the
            last consumed token; ``info["tokens_consumed"]`` says how many were used.
        """
        self._check_running()
        arr = common.as_token_array(token_ids, self.vocab_size)
        room = self.config.max_response_tokens - self._response_len
        window = arr[:room]
        stop_at = common.first_stop(window, self._stop_arr)
        n = stop_at + 1 if stop_at >= 0 else len(window)
        self._response[self._response_len : self._response_len + n] = window[:n]
        self._response_len += n
        if stop_at >= 0 or self._response_len >= self.config.max_response_tokens:
            return self._finish(stop_at >= 0, consumed=n)
        return self._obs(), 0.0, False, False, {"tokens_consumed": n}

    def render(self) -> str | None:
        """``ansi``: the problem and the response decoded so far."""
        if self.render_mode != "ansi" or self._problem is None:
            return None
        text = self.tokenizer.decode(self._response[: self._response_len].tolist())
        return f"Q: {self._problem.question}\nA: {text}"

    def close(self) -> None:
        """Close the verifier if this env created it."""
        if self._owns_verifier:
            close_verifier(self.verifier)
        super().close()

    # ------------------------------------------------------------------ internals

    @property
    def problem(self) -> Problem | None:
        """The current episode's problem."""
        return self._problem

    def response_token_ids(self) -> list[int]:
        """The response tokens generated so far in this episode."""
        return self._response[: self._response_len].tolist()

    def _check_running(self) -> None:
        if self._needs_reset:
            raise ResetNeeded(
                "call reset() before step()/step_tokens(), and again after an episode ends"
            )

    def _draw(self, given: Problem | None) -> tuple[Problem, np.ndarray]:
        limit = self.config.max_prompt_tokens
        if given is not None:
            ids = self._prompts(given.question)
            if len(ids) > limit:
                raise ValueError(
                    f"the prompt of the given problem has {len(ids)} tokens, more than "
                    f"max_prompt_tokens={limit}"
                )
            return given, ids
        return self._prompts.draw(self.task, self.np_random)

    def _obs(self) -> ObsType:
        # Copies: an observation must not change under the caller when the env steps on.
        return {
            "prompt_ids": self._prompt.copy(),
            "prompt_len": np.asarray(self._prompt_len, dtype=common.TOKEN_DTYPE),
            "response_ids": self._response.copy(),
            "response_len": np.asarray(self._response_len, dtype=common.TOKEN_DTYPE),
        }

    def _finish(
        self, stopped: bool, consumed: int | None
    ) -> tuple[ObsType, float, bool, bool, dict[str, Any]]:
        assert self._problem is not None
        ids = self._response[: self._response_len].tolist()
        text = self._decode([ids])[0]
        key = f"ep{self._episodes}"
        item = common.score_item(key, self._problem, text, self._response_len, self.config)
        # The episode is over whether or not scoring succeeds: a failed verifier call must
        # not leave a full response buffer that a retried step would write past.
        self._done = True
        self._needs_reset = True
        results = common.score_or_raise(self.verifier, [item])
        info = common.final_info(self._problem, text, self._response_len, stopped, results[0])
        if consumed is not None:
            info["tokens_consumed"] = consumed
        return self._obs(), float(results[0].reward), stopped, not stopped, info


def _replace(config: EnvConfig, overrides: dict[str, Any]) -> EnvConfig:
    """``dataclasses.replace`` with a clear error for unknown field names."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(EnvConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown env argument(s) {unknown}; EnvConfig fields are {sorted(names)}")
    return dataclasses.replace(config, **overrides)
