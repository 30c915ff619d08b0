"""Configuration of the math environments: prompt template and episode / reward settings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeVar

from server.types import AnswerFormat, RewardScheme

E = TypeVar("E", bound=enum.Enum)

# SmolLM2-135M-Instruct rarely writes \boxed{} on its own; asking for it in the prompt while
# the verifier also accepts a plain final number (the LATEX format's response extraction
# tries boxed answers first, then plain expressions) keeps the default task learnable from
# ~29 % one-digit accuracy. See docs/env.md.
DEFAULT_USER_TEMPLATE = "{question}\nGive the final answer in \\boxed{}."


@dataclass(frozen=True)
class PromptTemplate:
    """How a problem becomes the prompt the policy sees.

    Attributes:
        user: The user message; the literal ``{question}`` is replaced by the problem text
            (plain replacement, not ``str.format``, so LaTeX braces need no escaping).
        system: Optional system message; ``None`` keeps the chat template's default.
        use_chat_template: Render through ``tokenizer.apply_chat_template`` with a
            generation prompt; ``False`` tokenises ``system + user`` as raw text (for base
            models without a chat template).
        assistant_prefix: Text placed at the start of the assistant turn (it is part of
            the prompt, not of the response), e.g. ``"Let's think step by step."``.
    """

    user: str = DEFAULT_USER_TEMPLATE
    system: str | None = None
    use_chat_template: bool = True
    assistant_prefix: str = ""

    def __post_init__(self) -> None:
        if "{question}" not in self.user:
            raise ValueError(
                f"PromptTemplate.user must contain the placeholder '{{question}}', got {self.user!r}"
            )


@dataclass(frozen=True)
class EnvConfig:
    """Episode and reward settings shared by the single and the vector environment.

    Attributes:
        max_prompt_tokens: Size of the prompt buffer in the observation. A problem whose
            rendered prompt is longer is redrawn (up to ``max_redraws`` times) or, when it
            was passed explicitly, rejected with an error.
        max_response_tokens: Response-length limit: the episode is truncated when this
            many tokens have been generated without a stop token. Also the size of the
            response buffer and ``L_max`` of the soft overlong penalty.
        stop_token_ids: Tokens that end the episode (``terminated``); the stop token is
            part of the response. ``None`` uses the tokenizer's EOS token.
        answer_format: Format the verifier extracts answers in; ``None`` uses each
            problem's own format (LaTeX golds for the built-in tasks, whose response
            extraction accepts ``\\boxed{}`` first and a plain final number too). A name
            (``"latex"``, ``"expr"``, ``"choice"``) is accepted too.
        reward_scheme: Binary 0/1 or signed +-1 verdict reward (a ``RewardScheme`` or its
            name, ``"binary"`` / ``"signed"``).
        overlong_buffer: ``L_buf`` of DAPO's soft overlong penalty, applied by the verifier
            (``server.types.ScoreItem``); ``None`` turns the penalty off.
        verify_deadline_s: Per-item verification deadline passed to the verifier; ``None``
            uses the verifier's default.
        max_redraws: How many times a too-long prompt is redrawn before failing.
        prompt: The prompt template.
    """

    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    stop_token_ids: tuple[int, ...] | None = None
    answer_format: AnswerFormat | None = None
    reward_scheme: RewardScheme = RewardScheme.BINARY
    overlong_buffer: int | None = None
    verify_deadline_s: float | None = None
    max_redraws: int = 100
    prompt: PromptTemplate = field(default_factory=PromptTemplate)

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.stop_token_ids is not None and (
            isinstance(self.stop_token_ids, int)
            or not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids)
        ):
            raise ValueError(
                f"stop_token_ids must be a tuple of non-negative ints, got {self.stop_token_ids!r}"
            )
        if (
            self.overlong_buffer is not None
            and not 0 < self.overlong_buffer <= self.max_response_tokens
        ):
            raise ValueError(
                f"overlong_buffer must be in (0, max_response_tokens={self.max_response_tokens}], "
                f"got {self.overlong_buffer}"
            )
        if self.verify_deadline_s is not None and self.verify_deadline_s <= 0:
            raise ValueError(f"verify_deadline_s must be positive, got {self.verify_deadline_s}")
        if self.max_redraws < 1:
            raise ValueError(f"max_redraws must be >= 1, got {self.max_redraws}")
        # Names are accepted as in the trainer's config ("signed", "latex"); stored as enums.
        if isinstance(self.answer_format, str):
            object.__setattr__(self, "answer_format", _enum(AnswerFormat, self.answer_format))
        if isinstance(self.reward_scheme, str):
            object.__setattr__(self, "reward_scheme", _enum(RewardScheme, self.reward_scheme))
        if not isinstance(self.answer_format, AnswerFormat | None):
            raise ValueError(
                f"answer_format must be an AnswerFormat, one of "
                f"{[m.value for m in AnswerFormat]} or None, got {self.answer_format!r}"
            )
        if not isinstance(self.reward_scheme, RewardScheme):
            raise ValueError(
                f"reward_scheme must be a RewardScheme or one of "
                f"{[m.value for m in RewardScheme]}, got {self.reward_scheme!r}"
            )


def _enum(kind: type[E], name: str) -> E | str:
    """``kind`` member named ``name`` (any case: ``"signed"``, ``"SIGNED"``); else ``name``,
    which the caller then rejects with a message listing what was expected."""
    for member in kind:
        if name.lower() in (member.value, member.name.lower()):
            return member
    return name
