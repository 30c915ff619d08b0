"""Pieces shared by the single and the vector math environment.

Tokenizer resolution, prompt rendering, the observation space, the stop-token scan and
the conversion of verifier results into rewards and ``info`` entries. Both environments
call these same functions, which is what keeps their episodes identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces

from fipo_env.config import EnvConfig
from fipo_env.models import offline_hub
from fipo_env.tasks.types import Problem
from server.types import ScoreItem, ScoreResult
from server.worker import MainModuleError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from transformers import PreTrainedTokenizerBase

    from fipo_env.tasks.types import Task
    from server.types import Scorer

TOKEN_DTYPE = np.int32  # every vocabulary in use (<= 256k) fits; halves copies vs int64


def resolve_tokenizer(
    tokenizer: str | Path | PreTrainedTokenizerBase | None,
) -> PreTrainedTokenizerBase:
    """Return a Hugging Face tokenizer for ``tokenizer``.

    Args:
        tokenizer: A tokenizer object (anything with ``encode``/``decode``), a local model
            or tokenizer directory, or ``None`` / ``"default"`` for the embedded
            SmolLM2-135M-Instruct (converted once into the cache, never downloaded).
    """
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "default"):
        from fipo_env.models import load_tokenizer

        return load_tokenizer()
    if isinstance(tokenizer, str | Path):
        path = Path(tokenizer).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {str(tokenizer)!r} does not exist; pass a local model "
                "directory, a tokenizer object, or None for the embedded default"
            )
        offline_hub()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    for attr in ("encode", "decode"):
        if not callable(getattr(tokenizer, attr, None)):
            raise TypeError(f"tokenizer {tokenizer!r} has no {attr}() method")
    return tokenizer


def stop_ids_for(tokenizer: PreTrainedTokenizerBase, config: EnvConfig) -> tuple[int, ...]:
    """Stop tokens: the configured ones, else the tokenizer's EOS token."""
    if config.stop_token_ids is not None:
        return tuple(config.stop_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token_id; set EnvConfig.stop_token_ids explicitly"
        )
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def vocab_size_of(tokenizer: PreTrainedTokenizerBase, override: int | None) -> int:
    """Action-space size: ``override`` or ``len(tokenizer)`` (added tokens included)."""
    size = int(override) if override is not None else len(tokenizer)
    if size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {size}")
    return size


def pad_id_of(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """Padding value for the observation buffers (positions past the lengths)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if isinstance(pad, list | tuple):
        pad = pad[0] if pad else None
    return int(pad) if pad is not None and 0 <= int(pad) < vocab_size else 0


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, config: EnvConfig, question: str
) -> list[int]:
    """Token ids of the prompt for ``question`` (chat template + generation prompt).

    The template is rendered to text and then encoded without extra special tokens, which
    is what ``apply_chat_template(tokenize=True)`` does, but independent of its return type
    (a list in transformers 4, a ``BatchEncoding`` in 5).
    """
    tpl = config.prompt
    user = tpl.user.replace("{question}", question)
    if tpl.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        if tpl.system is not None:
            messages.insert(0, {"role": "system", "content": tpl.system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif tpl.use_chat_template:
        raise ValueError(
            "the tokenizer has no chat template; set PromptTemplate(use_chat_template=False)"
        )
    else:
        text = (tpl.system + "\n\n" if tpl.system else "") + user + "\n"
    text += tpl.assistant_prefix
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptCache:
    """``render_prompt`` with a bounded cache keyed by the question text.

    Rendering a chat template and tokenising costs ~0.5-1 ms, as much as stepping
    thousands of tokens; a trainer poses the same problem many times (G samples per
    group, repeated draws from small levels), so prompts are rendered once.

    Args:
        tokenizer: The tokenizer.
        config: The env config (its prompt template).
        maxsize: Most prompts kept; the oldest is dropped beyond it.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, config: EnvConfig, maxsize: int = 8192
    ) -> None:
        self._tokenizer = tokenizer
        self._config = config
        self._maxsize = maxsize
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, question: str) -> np.ndarray:
        ids = self._cache.get(question)
        if ids is None:
            ids = np.asarray(
                render_prompt(self._tokenizer, self._config, question), dtype=TOKEN_DTYPE
            )
            ids.flags.writeable = False  # shared by every episode that poses this problem
            if len(self._cache) >= self._maxsize:
                del self._cache[next(iter(self._cache))]
            self._cache[question] = ids
        return ids

    def draw(self, task: Task, rng: np.random.Generator) -> tuple[Problem, np.ndarray]:
        """Sample a problem from ``task`` whose prompt fits ``max_prompt_tokens``.

        Redraws up to ``max_redraws`` times, then raises ``ValueError`` naming the limit.
        """
        limit = self._config.max_prompt_tokens
        for _ in range(self._config.max_redraws):
            problem = task.sample(rng)
            ids = self(problem.question)
            if len(ids) <= limit:
                return problem, ids
        raise ValueError(
            f"{self._config.max_redraws} problems in a row from task {task.name!r} had "
            f"prompts longer than max_prompt_tokens={limit}; raise the limit"
        )


def make_batch_decoder(
    tokenizer: PreTrainedTokenizerBase,
) -> Callable[[list[list[int]]], list[str]]:
    """A function decoding many token-id lists at once, special tokens skipped.

    Uses the Rust ``tokenizers`` backend's ``decode_batch`` directly when the tokenizer
    has one and it decodes a probe exactly as ``tokenizer.batch_decode`` does: the
    transformers wrapper spends more time checking its inputs in Python than decoding
    (about 2x on 64 x 1,024 tokens). Falls back to ``batch_decode`` otherwise.
    """

    def slow(seqs: list[list[int]]) -> list[str]:
        return list(tokenizer.batch_decode(seqs, skip_special_tokens=True))

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not callable(getattr(backend, "decode_batch", None)):
        return slow
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return slow

    def fast(seqs: list[list[int]]) -> list[str]:
        return list(backend.decode_batch(seqs, skip_special_tokens=True))

    specials = [int(i) for i in getattr(tokenizer, "all_special_ids", [])]
    n = len(tokenizer)
    probe = [specials + list(range(min(n, 300))), list(range(max(0, n - 300), n)) + specials]
    try:
        same = fast(probe) == slow(probe)
    except Exception:  # noqa: BLE001 -- any backend quirk: keep the reference path
        same = False
    return fast if same else slow


def observation_space(vocab_size: int, config: EnvConfig) -> spaces.Dict:
    """The single-episode observation space (see the env docstring for the why)."""
    hi = vocab_size - 1
    return spaces.Dict(
        {
            "prompt_ids": spaces.Box(0, hi, (config.max_prompt_tokens,), TOKEN_DTYPE),
            "prompt_len": spaces.Box(0, config.max_prompt_tokens, (), TOKEN_DTYPE),
            "response_ids": spaces.Box(0, hi, (config.max_response_tokens,), TOKEN_DTYPE),
            "response_len": spaces.Box(0, config.max_response_tokens, (), TOKEN_DTYPE),
        }
    )


def first_stop(tokens: np.ndarray, stop_ids: np.ndarray) -> int:
    """Index of the first stop token in ``tokens``, or -1."""
    if stop_ids.size == 1:
        hits = np.flatnonzero(tokens == stop_ids[0])
    else:
        hits = np.flatnonzero(np.isin(tokens, stop_ids))
    return int(hits[0]) if hits.size else -1


def as_token_array(token_ids: ArrayLike, vocab_size: int, what: str = "token_ids") -> np.ndarray:
    """Validate ``token_ids`` (a 1-D sequence of ints in ``[0, vocab_size)``) as an array."""
    arr = np.asarray(token_ids)
    if arr.size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{what} must be a 1-D sequence of ints, got shape {arr.shape} {arr.dtype}"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return arr


def score_item(
    key: str, problem: Problem, response: str, n_tokens: int, config: EnvConfig
) -> ScoreItem:
    """The verifier request for one finished episode."""
    penalty = config.overlong_buffer is not None
    return ScoreItem(
        id=key,
        response=response,
        golds=problem.golds,
        answer_format=config.answer_format or problem.answer_format,
        reward_scheme=config.reward_scheme,
        response_tokens=n_tokens if penalty else None,
        max_response_tokens=config.max_response_tokens if penalty else None,
        overlong_buffer=config.overlong_buffer,
        deadline_s=config.verify_deadline_s,
    )


def reset_info(problem: Problem, n_prompt: int) -> dict[str, Any]:
    """``info`` returned by ``reset``: the problem and its gold."""
    return {
        "problem": problem.question,
        "gold": problem.gold,
        "source": problem.source,
        "canonical": problem.canonical,
        "prompt_tokens": n_prompt,
    }


def final_info(
    problem: Problem,
    response: str,
    n_tokens: int,
    stopped: bool,
    result: ScoreResult,
) -> dict[str, Any]:
    """``info`` at the end of an episode: problem, gold, response, verdict, reward parts."""
    return {
        "problem": problem.question,
        "gold": problem.gold,
        "response": response,
        "response_tokens": n_tokens,
        "stop_reason": "stop_token" if stopped else "length",
        "status": result.status.value,
        "correct": bool(result.correct),
        "extracted_prediction": result.extracted_prediction,
        "extracted_gold": result.extracted_gold,
        "verifier_message": result.message,
        "reward_components": {
            "verifier": float(result.reward - result.overlong_penalty),
            "overlong": float(result.overlong_penalty),
        },
    }


def score_or_raise(verifier: Scorer, items: list[ScoreItem]) -> list[ScoreResult]:
    """Score ``items``; a verifier failure becomes a ``RuntimeError`` that says what was lost.

    Raises:
        MainModuleError: A local verifier's workers cannot start because the script lacks
            its ``if __name__ == "__main__":`` guard (passed through unwrapped).
        RuntimeError: The verifier raised, or did not answer every item in order.
    """
    try:
        results = verifier.score(items)
    except MainModuleError:
        raise  # the script itself must change (its __main__ guard): say only that
    except Exception as e:
        raise RuntimeError(
            f"the verifier ({type(verifier).__name__}) failed to score {len(items)} finished "
            f"episode(s): {e}; their rewards are lost, call reset()"
        ) from e
    check_results(results, [it.id for it in items])
    return results


def check_results(results: Sequence[ScoreResult], keys: Sequence[str]) -> None:
    """A verifier must answer every item, in order; anything else is a bug worth stopping on."""
    got = [r.id for r in results]
    if got != list(keys):
        raise RuntimeError(
            f"the verifier returned results for {got[:4]}... but was asked for {list(keys)[:4]}... "
            "(a Scorer must return one result per item, in order)"
        )
