"""Native vector version of ``fipo_env/MathReasoning-v0`` over padded numpy arrays.

Built by ``gymnasium.make_vec("fipo_env/MathReasoning-v0", num_envs=N, ...)``. All
sub-episodes live in shared ``[N, max_len]`` buffers, a batched ``step`` is a handful of
numpy operations, and every episode that ends in one call is scored in ONE verifier
batch. ``group_size = G`` makes blocks of G consecutive sub-envs pose the same problems
(the k-th episode of every member of a group is the same problem), which is what
group-relative methods (GRPO / DAPO / FIPO) sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from fipo_env.config import EnvConfig
from fipo_env.envs import common
from fipo_env.envs.math_reasoning import _replace
from fipo_env.tasks import Problem, Task, make_task
from fipo_env.verifiers import close_verifier, make_verifier

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from transformers import PreTrainedTokenizerBase

    from server.types import Scorer

ObsType = dict[str, np.ndarray]


class MathReasoningVectorEnv(VectorEnv):
    """``num_envs`` token-level math episodes stepped together.

    Same episodes, spaces (batched), rewards and ``info`` keys as ``MathReasoningEnv``;
    see its docstring. Infos follow Gymnasium's vector convention (a key holds an array
    over sub-envs, ``"_key"`` masks which entries are set). Extra arguments:

    Args:
        num_envs: Number of sub-episodes.
        tokenizer: As for ``MathReasoningEnv`` (object, model directory or ``None``).
        task: Task object or spec string.
        config: ``EnvConfig``; keyword overrides of its fields are accepted too.
        verifier: ``"local"``, ``"host:port"`` or any ``server.types.Scorer``.
        vocab_size: Action-space size override.
        group_size: Consecutive sub-envs that share problems (must divide ``num_envs``).
        autoreset_mode: ``SAME_STEP`` (default: an ended sub-env is reset in the same call;
            its last observation and info are in ``info["final_obs"]`` /
            ``info["final_info"]``, and the returned observation already holds the next
            prompt, ready for the next generation round), ``NEXT_STEP`` (Gymnasium's
            default: reset on the following call, whose action for it is ignored) or
            ``DISABLED`` (call ``reset(options={"reset_mask": mask})`` yourself).
        copy_obs: Return copies of the observation buffers (``False`` returns views that
            the next call overwrites; faster for a consumer that reads them at once).
        render_mode: ``None`` or ``"ansi"`` (``render()`` returns one text per sub-env).
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        task: str | Task = "arithmetic",
        config: EnvConfig | None = None,
        verifier: str | Scorer | None = "local",
        vocab_size: int | None = None,
        group_size: int = 1,
        autoreset_mode: str | AutoresetMode = AutoresetMode.SAME_STEP,
        copy_obs: bool = True,
        render_mode: str | None = None,
        **config_overrides: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.render_mode = render_mode
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if not isinstance(group_size, int) or group_size < 1 or num_envs % group_size:
            raise ValueError(
                f"group_size must be a positive int dividing num_envs={num_envs}, got {group_size!r}"
            )
        config = config or EnvConfig()
        if config_overrides:
            config = _replace(config, config_overrides)
        self.config = config
        self.num_envs = num_envs
        self.group_size = group_size
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        self.copy_obs = copy_obs
        self.tokenizer = common.resolve_tokenizer(tokenizer)
        self.task = make_task(task)
        self.vocab_size = common.vocab_size_of(self.tokenizer, vocab_size)
        self.stop_ids = common.stop_ids_for(self.tokenizer, config)
        self._stop_arr = np.asarray(self.stop_ids, dtype=np.int64)
        self.pad_id = common.pad_id_of(self.tokenizer, self.vocab_size)
        self.verifier, self._owns_verifier = make_verifier(verifier)
        self._prompts = common.PromptCache(self.tokenizer, config)
        self._decode = common.make_batch_decoder(self.tokenizer)

        import gymnasium as gym

        self.single_action_space = gym.spaces.Discrete(self.vocab_size)
        self.single_observation_space = common.observation_space(self.vocab_size, config)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)

        n, p, r = num_envs, config.max_prompt_tokens, config.max_response_tokens
        self._prompt = np.full((n, p), self.pad_id, dtype=common.TOKEN_DTYPE)
        self._prompt_len = np.zeros(n, dtype=common.TOKEN_DTYPE)
        self._response = np.full((n, r), self.pad_id, dtype=common.TOKEN_DTYPE)
        self._response_len = np.zeros(n, dtype=common.TOKEN_DTYPE)
        self._problems: list[Problem | None] = [None] * n
        self._ended = np.zeros(n, dtype=bool)  # episode over, sub-env not reset yet
        self._episode_idx = np.zeros(n, dtype=np.int64)
        self._started = False
        self._broken = False  # a verifier call failed mid-step; a full reset is needed
        self._calls = 0
        n_groups = n // group_size
        self._group_rngs: list[np.random.Generator] = []
        self._group_cache: list[dict[int, tuple[Problem, np.ndarray]]] = [
            {} for _ in range(n_groups)
        ]
        self._group_next = [0] * n_groups

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsType, dict[str, Any]]:
        """Reset all sub-envs, or those in ``options["reset_mask"]``.

        Args:
            seed: Seeds the problem draws (each group gets its own stream from it).
            options: ``reset_mask``: bool array ``[num_envs]`` for a partial reset;
                ``problems``: a sequence of ``num_envs`` ``Problem`` (or ``None`` to draw)
                to pose given problems, e.g. a fixed eval set.
        """
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        given = options.pop("problems", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; use reset_mask, problems")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(f"reset_mask must be a bool array of shape ({self.num_envs},)")
            if not self._started:
                raise ResetNeeded("call reset() without reset_mask first")
            if seed is not None:
                raise ValueError("seed cannot be combined with reset_mask (seed a full reset)")
        if given is not None and len(given) != self.num_envs:
            raise ValueError(
                f"options['problems'] must hold {self.num_envs} entries, got {len(given)}"
            )
        if self._broken and mask is not None:
            raise ResetNeeded("a verifier call failed; call reset() without reset_mask")
        self._broken = False
        if seed is not None or not self._started:
            self._seed(seed)
        elif mask is None:
            self._episode_idx += 1
        if mask is None:
            mask = np.ones(self.num_envs, dtype=bool)
        else:
            self._episode_idx[mask] += 1
        self._started = True
        infos: dict[str, Any] = {}
        for i in np.flatnonzero(mask):
            infos = self._add_info(infos, self._load(int(i), given[i] if given else None), int(i))
        return self._obs(), infos

    def step(
        self, actions: ArrayLike
    ) -> tuple[ObsType, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Append one token to every sub-episode (``actions``: ints, shape ``[num_envs]``)."""
        acts = np.asarray(actions)
        if acts.shape != (self.num_envs,) or not np.issubdtype(acts.dtype, np.integer):
            raise ValueError(
                f"actions must be {self.num_envs} token ids (int array of shape ({self.num_envs},)), "
                f"got shape {acts.shape} dtype {acts.dtype}"
            )
        common.as_token_array(acts, self.vocab_size, "actions")
        reset_now = self._before_step(wants_tokens=np.ones(self.num_envs, dtype=bool))
        active = ~reset_now
        idx = np.flatnonzero(active)
        self._response[idx, self._response_len[idx]] = acts[idx]
        self._response_len[idx] += 1
        stopped = np.zeros(self.num_envs, dtype=bool)
        stopped[idx] = np.isin(acts[idx], self._stop_arr)
        return self._after_step(active, stopped, active.astype(np.int64), reset_now)

    def step_tokens(
        self,
        token_ids: Sequence[ArrayLike] | np.ndarray,
        lengths: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[ObsType, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Append many tokens to every sub-episode in one call (batched fast path).

        Each sub-env consumes its tokens up to and including the first stop token or until
        its length limit, exactly as the single env's ``step_tokens``. Episodes that end
        are decoded and scored together in one verifier call.

        Args:
            token_ids: ``num_envs`` 1-D token sequences (may be empty), or a 2-D int array
                ``[num_envs, T]`` read up to ``lengths``.
            lengths: With a 2-D array, the number of valid tokens per row (default ``T``).

        Returns:
            ``(obs, rewards, terminated, truncated, infos)``; ``infos["tokens_consumed"]``
            (``[num_envs]``) says how many tokens each sub-env used.
        """
        if isinstance(token_ids, np.ndarray) and token_ids.ndim == 2:
            arr, lens = self._padded(token_ids, lengths)
            reset_now = self._before_step(wants_tokens=lens > 0)
            consumed, stopped = self._append_padded(arr, lens, ~reset_now & ~self._ended)
            return self._after_step(~reset_now, stopped, consumed, reset_now)
        rows = self._rows(token_ids, lengths)
        wants = np.fromiter((r.size > 0 for r in rows), dtype=bool, count=self.num_envs)
        reset_now = self._before_step(wants_tokens=wants)
        active = ~reset_now
        consumed = np.zeros(self.num_envs, dtype=np.int64)
        stopped = np.zeros(self.num_envs, dtype=bool)
        limit = self.config.max_response_tokens
        for i in np.flatnonzero(active & wants):
            arr = rows[i]
            start = int(self._response_len[i])
            window = arr[: limit - start]
            stop_at = common.first_stop(window, self._stop_arr)
            n = stop_at + 1 if stop_at >= 0 else window.size
            self._response[i, start : start + n] = window[:n]
            self._response_len[i] = start + n
            consumed[i] = n
            stopped[i] = stop_at >= 0
        return self._after_step(active, stopped, consumed, reset_now)

    def render(self) -> tuple[str, ...] | None:
        """``ansi``: per sub-env, its problem and the response decoded so far."""
        if self.render_mode != "ansi" or not self._started:
            return None
        return tuple(
            f"Q: {p.question if p is not None else ''}\nA: "
            + self.tokenizer.decode(self._response[i, : self._response_len[i]].tolist())
            for i, p in enumerate(self._problems)
        )

    def close_extras(self, **kwargs: Any) -> None:
        """Close the verifier if this env created it."""
        if self._owns_verifier:
            close_verifier(self.verifier)

    # ------------------------------------------------------------------ internals

    @property
    def problems(self) -> list[Problem | None]:
        """The current problem of every sub-env."""
        return list(self._problems)

    def _seed(self, seed: int | None) -> None:
        self._np_random, self._np_random_seed = seeding.np_random(seed)
        # One stream per group, derived from the seed, so a group's k-th problem depends
        # only on (seed, group, k), not on how fast its members finish.
        children = np.random.SeedSequence(self._np_random_seed).spawn(len(self._group_cache))
        self._group_rngs = [np.random.default_rng(c) for c in children]
        self._group_cache = [{} for _ in self._group_cache]
        self._group_next = [0] * len(self._group_cache)
        self._episode_idx[:] = 0

    def _padded(
        self, token_ids: np.ndarray, lengths: Sequence[int] | np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate a 2-D ``step_tokens`` input; returns ``(tokens [N, T], lengths [N])``."""
        if token_ids.shape[0] != self.num_envs:
            raise ValueError(f"token_ids has {token_ids.shape[0]} rows, expected {self.num_envs}")
        if not np.issubdtype(token_ids.dtype, np.integer):
            raise ValueError(f"token_ids must hold ints, got dtype {token_ids.dtype}")
        t = token_ids.shape[1]
        lens = np.full(self.num_envs, t) if lengths is None else np.asarray(lengths)
        if (
            lens.shape != (self.num_envs,)
            or not np.issubdtype(lens.dtype, np.integer)
            or (lens < 0).any()
            or (lens > t).any()
        ):
            raise ValueError(f"lengths must be {self.num_envs} ints in [0, {t}]")
        common.as_token_array(token_ids[np.arange(t)[None, :] < lens[:, None]], self.vocab_size)
        return token_ids, lens.astype(np.int64)

    def _append_padded(
        self, arr: np.ndarray, lens: np.ndarray, active: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised append of a padded batch; returns ``(consumed [N], stopped [N])``.

        The same rule as the per-row loop (up to the first stop token or the length limit),
        in a fixed number of numpy operations whatever ``num_envs`` is.
        """
        n_envs, t = arr.shape
        if t == 0:
            return np.zeros(n_envs, dtype=np.int64), np.zeros(n_envs, dtype=bool)
        start = self._response_len.astype(np.int64)
        avail = np.where(active, np.minimum(lens, self.config.max_response_tokens - start), 0)
        pos = np.arange(t)
        in_window = pos[None, :] < avail[:, None]
        if self._stop_arr.size == 1:
            is_stop = (arr == self._stop_arr[0]) & in_window
        else:
            is_stop = np.isin(arr, self._stop_arr) & in_window
        stopped = is_stop.any(axis=1)
        consumed = np.where(stopped, is_stop.argmax(axis=1) + 1, avail)
        rows, cols = np.nonzero(pos[None, :] < consumed[:, None])
        self._response[rows, start[rows] + cols] = arr[rows, cols]
        self._response_len += consumed.astype(common.TOKEN_DTYPE)
        return consumed, stopped

    def _rows(
        self, token_ids: Sequence[ArrayLike], lengths: Sequence[int] | np.ndarray | None
    ) -> list[np.ndarray]:
        """Normalise a list-of-sequences ``step_tokens`` input to validated 1-D arrays."""
        if lengths is not None:
            raise ValueError("lengths is only for a 2-D token_ids array")
        if len(token_ids) != self.num_envs:
            raise ValueError(f"token_ids must hold {self.num_envs} sequences, got {len(token_ids)}")
        return [
            common.as_token_array(r, self.vocab_size, f"token_ids[{i}]")
            for i, r in enumerate(token_ids)
        ]

    def _before_step(self, wants_tokens: np.ndarray) -> np.ndarray:
        """Autoreset bookkeeping; returns the mask of sub-envs reset by this call."""
        if not self._started:
            raise ResetNeeded("call reset() before step()/step_tokens()")
        if self._broken:
            raise ResetNeeded("a verifier call failed during the last step; call reset()")
        self._calls += 1
        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            return self._ended.copy()
        if self.autoreset_mode is AutoresetMode.DISABLED:
            bad = self._ended & wants_tokens
            if bad.any():
                raise ResetNeeded(
                    f"sub-env(s) {np.flatnonzero(bad).tolist()} ended; reset them with "
                    "reset(options={'reset_mask': mask}) (autoreset_mode is DISABLED)"
                )
            return np.zeros(self.num_envs, dtype=bool)
        return np.zeros(self.num_envs, dtype=bool)

    def _after_step(
        self, active: np.ndarray, stopped: np.ndarray, consumed: np.ndarray, reset_now: np.ndarray
    ) -> tuple[ObsType, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        n = self.num_envs
        active = active & ~self._ended  # DISABLED: ended sub-envs with no tokens stay ended
        ended = active & (stopped | (self._response_len >= self.config.max_response_tokens))
        stopped = stopped & ended
        rewards = np.zeros(n, dtype=np.float64)
        infos: dict[str, Any] = {}
        for i in np.flatnonzero(reset_now):  # NEXT_STEP: the previous call ended these
            self._episode_idx[i] += 1
            self._ended[i] = False
            infos = self._add_info(infos, self._load(int(i), None), int(i))
        idx = np.flatnonzero(ended)
        if idx.size:
            finals = self._score(idx, stopped)
            for i, (reward, info) in zip(idx, finals, strict=True):
                rewards[i] = reward
                i = int(i)
                if self.autoreset_mode is AutoresetMode.SAME_STEP:
                    final_obs = {k: v[i].copy() for k, v in self._views().items()}
                    infos = self._add_info(infos, {"final_obs": final_obs, "final_info": info}, i)
                    self._episode_idx[i] += 1
                    infos = self._add_info(infos, self._load(i, None), i)
                else:
                    self._ended[i] = True
                    infos = self._add_info(infos, info, i)
        infos["tokens_consumed"] = consumed
        infos["_tokens_consumed"] = np.ones(n, dtype=bool)
        terminated = stopped
        truncated = ended & ~stopped
        return self._obs(), rewards, terminated, truncated, infos

    def _score(self, idx: np.ndarray, stopped: np.ndarray) -> list[tuple[float, dict[str, Any]]]:
        """Decode and score the episodes ``idx`` in one verifier batch."""
        seqs = [self._response[i, : self._response_len[i]].tolist() for i in idx]
        texts = self._decode(seqs)
        keys = [f"c{self._calls}e{int(i)}" for i in idx]
        items = [
            common.score_item(k, self._problems[i], t, len(s), self.config)  # type: ignore[arg-type]
            for k, i, t, s in zip(keys, idx, texts, seqs, strict=True)
        ]
        try:
            results = common.score_or_raise(self.verifier, items)
        except Exception:
            # Episodes ended but have no reward: the batch is inconsistent until a reset.
            self._broken = True
            raise
        return [
            (
                float(res.reward),
                common.final_info(self._problems[i], t, len(s), bool(stopped[i]), res),  # type: ignore[arg-type]
            )
            for i, t, s, res in zip(idx, texts, seqs, results, strict=True)
        ]

    def _load(self, i: int, given: Problem | None) -> dict[str, Any]:
        """Start sub-env ``i``'s next episode; returns its reset info."""
        if given is not None:
            if not isinstance(given, Problem):
                raise TypeError(
                    f"options['problems'][{i}] must be a Problem or None, got {given!r}"
                )
            ids = self._prompts(given.question)
            if ids.size > self.config.max_prompt_tokens:
                raise ValueError(
                    f"the prompt of options['problems'][{i}] has {ids.size} tokens, more than "
                    f"max_prompt_tokens={self.config.max_prompt_tokens}"
                )
            problem = given
        else:
            problem, ids = self._group_problem(i)
        self._problems[i] = problem
        self._prompt[i].fill(self.pad_id)
        self._prompt[i, : ids.size] = ids
        self._prompt_len[i] = ids.size
        self._response[i].fill(self.pad_id)
        self._response_len[i] = 0
        self._ended[i] = False
        info = common.reset_info(problem, int(ids.size))
        info["group"] = i // self.group_size
        info["episode_index"] = int(self._episode_idx[i])
        return info

    def _group_problem(self, i: int) -> tuple[Problem, np.ndarray]:
        g, k = i // self.group_size, int(self._episode_idx[i])
        cache = self._group_cache[g]
        while self._group_next[g] <= k:
            cache[self._group_next[g]] = self._prompts.draw(self.task, self._group_rngs[g])
            self._group_next[g] += 1
        entry = cache[k]
        lo = int(self._episode_idx[g * self.group_size : (g + 1) * self.group_size].min())
        for old in [kk for kk in cache if kk < lo]:
            del cache[old]
        return entry

    def _views(self) -> ObsType:
        return {
            "prompt_ids": self._prompt,
            "prompt_len": self._prompt_len,
            "response_ids": self._response,
            "response_len": self._response_len,
        }

    def _obs(self) -> ObsType:
        views = self._views()
        return {k: v.copy() for k, v in views.items()} if self.copy_obs else views
