"""The single token-level env: Gymnasium API, episodes, rewards, step_tokens fast path."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env

import fipo_env
from fipo_env.config import EnvConfig, PromptTemplate
from fipo_env.envs.math_reasoning import MathReasoningEnv
from fipo_env.tasks import Problem
from server.types import AnswerFormat, RewardScheme


def make_env(tok, verifier, **kw):
    kw.setdefault("max_prompt_tokens", 64)
    kw.setdefault("max_response_tokens", 24)
    return gym.make(fipo_env.ENV_ID, tokenizer=tok, verifier=verifier, **kw)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_registered_with_module_class_entry_points():
    assert fipo_env.EnvConfig is EnvConfig and fipo_env.MathReasoningEnv is MathReasoningEnv
    spec = gym.spec(fipo_env.ENV_ID)
    assert spec.entry_point == "fipo_env.envs.math_reasoning:MathReasoningEnv"
    assert spec.vector_entry_point == "fipo_env.envs.vector:MathReasoningVectorEnv"


def test_check_env_passes(tiny_tokenizer, local_verifier):
    env = make_env(tiny_tokenizer, local_verifier, max_response_tokens=8)
    assert isinstance(env, MathReasoningEnv)  # make adds no wrapper that hides step_tokens
    check_env(env)
    env.close()


def test_reset_renders_chat_prompt_and_is_seeded(tiny_tokenizer, local_verifier):
    env = make_env(tiny_tokenizer, local_verifier)
    obs, info = env.reset(seed=5)
    n = int(obs["prompt_len"])
    text = tiny_tokenizer.decode(obs["prompt_ids"][:n].tolist())
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert info["problem"] in text and "\\boxed{}" in text
    assert (obs["prompt_ids"][n:] == env.pad_id).all() and int(obs["response_len"]) == 0
    assert obs in env.observation_space
    obs2, info2 = env.reset(seed=5)
    assert info2 == info and (obs2["prompt_ids"] == obs["prompt_ids"]).all()
    problems = {env.reset(seed=s)[1]["problem"] for s in range(20)}
    assert len(problems) > 5


def test_correct_answer_terminates_with_reward(tiny_tokenizer, local_verifier):
    env = make_env(tiny_tokenizer, local_verifier)
    _, info = env.reset(seed=0)
    eos = tiny_tokenizer.eos_token_id
    ids = encode(tiny_tokenizer, f"So \\boxed{{{info['gold']}}}") + [eos]
    for t in ids[:-1]:
        obs, r, term, trunc, step_info = env.step(t)
        assert (r, term, trunc, step_info) == (0.0, False, False, {})
    obs, r, term, trunc, info = env.step(ids[-1])
    assert (r, term, trunc) == (1.0, True, False)
    assert info["status"] == "OK" and info["correct"] and info["stop_reason"] == "stop_token"
    assert info["response"] == f"So \\boxed{{{info['gold']}}}"  # EOS kept as a token, not text
    assert info["response_tokens"] == len(ids) == int(obs["response_len"])
    assert (obs["response_ids"][: len(ids)] == ids).all()
    assert info["reward_components"] == {"verifier": 1.0, "overlong": 0.0}
    with pytest.raises(ResetNeeded):
        env.step(5)


def test_plain_final_number_is_accepted_and_wrong_scores_zero(tiny_tokenizer, local_verifier):
    env = make_env(tiny_tokenizer, local_verifier)
    _, info = env.reset(seed=1)
    gold = int(info["gold"])
    eos = tiny_tokenizer.eos_token_id
    *_, r, term, _, fin = env.step_tokens(encode(tiny_tokenizer, f"The answer is {gold}") + [eos])
    assert (r, term, fin["status"]) == (1.0, True, "OK")
    env.reset(seed=1)
    *_, r, _, _, fin = env.step_tokens(encode(tiny_tokenizer, f"It is {gold + 1}") + [eos])
    assert (r, fin["status"], fin["correct"]) == (0.0, "WRONG", False)


def test_truncation_at_length_limit(tiny_tokenizer, local_verifier):
    env = make_env(tiny_tokenizer, local_verifier, max_response_tokens=5)
    env.reset(seed=0)
    tok = encode(tiny_tokenizer, "a")[0]
    for _ in range(4):
        assert env.step(tok)[2:4] == (False, False)
    obs, r, term, trunc, info = env.step(tok)
    assert (term, trunc, info["stop_reason"]) == (False, True, "length")
    assert info["status"] == "NO_ANSWER" and r == 0.0


def test_stop_token_on_the_last_slot_terminates(tiny_tokenizer, local_verifier):
    env = make_env(tiny_tokenizer, local_verifier, max_response_tokens=3)
    env.reset(seed=0)
    env.step(encode(tiny_tokenizer, "a")[0])
    env.step(encode(tiny_tokenizer, "b")[0])
    assert env.step(tiny_tokenizer.eos_token_id)[2:4] == (True, False)


@pytest.mark.parametrize("seed", list(range(12)))
def test_step_tokens_gives_the_same_episode_as_step(tiny_tokenizer, local_verifier, seed):
    rng = np.random.default_rng(seed)
    a = make_env(tiny_tokenizer, local_verifier, max_response_tokens=int(rng.integers(4, 40)))
    b = make_env(tiny_tokenizer, local_verifier, max_response_tokens=a.config.max_response_tokens)
    _, info = a.reset(seed=seed)
    b.reset(seed=seed)
    eos = tiny_tokenizer.eos_token_id
    kind = seed % 3
    if kind == 0:  # a correct answer, then junk after the stop token
        toks = encode(tiny_tokenizer, f"\\boxed{{{info['gold']}}}") + [eos] + [7, 8, 9]
    elif kind == 1:  # random tokens with stop tokens sprinkled in
        toks = rng.integers(0, len(tiny_tokenizer), size=60)
        toks[rng.random(60) < 0.05] = eos
        toks = toks.tolist()
    else:  # never stops: runs into the length limit
        toks = [t for t in rng.integers(0, len(tiny_tokenizer), size=60).tolist() if t != eos]
    steps = []
    for t in toks:
        out = a.step(t)
        steps.append(t)
        if out[2] or out[3]:
            break
    else:
        pytest.fail("episode should have ended")
    # Feed the same tokens to b in random chunks (including empty ones).
    pos, out_b = 0, None
    while True:
        k = int(rng.integers(0, 9))
        out_b = b.step_tokens(np.asarray(toks[pos : pos + k], dtype=np.int64))
        assert out_b[4]["tokens_consumed"] <= k
        pos += out_b[4]["tokens_consumed"]
        if out_b[2] or out_b[3]:
            break
    assert pos == len(steps)
    obs_a, r_a, te_a, tr_a, info_a = out
    obs_b, r_b, te_b, tr_b, info_b = out_b
    assert (r_a, te_a, tr_a) == (r_b, te_b, tr_b)
    for key in obs_a:
        assert np.array_equal(obs_a[key], obs_b[key]), key
    info_b = {k: v for k, v in info_b.items() if k != "tokens_consumed"}
    assert info_a == info_b


def test_bad_actions_and_call_order_are_clear_errors(tiny_tokenizer, local_verifier):
    env = make_env(tiny_tokenizer, local_verifier)
    with pytest.raises(ResetNeeded):
        env.step(1)
    with pytest.raises(ResetNeeded):
        env.step_tokens([1])
    env.reset(seed=0)
    v = len(tiny_tokenizer)
    with pytest.raises(ValueError, match="not a token id"):
        env.step(v)
    with pytest.raises(ValueError, match="not a token id"):
        env.step(-1)
    with pytest.raises(ValueError, match="token id"):
        env.step("x")
    with pytest.raises(ValueError, match=f"outside the vocabulary \\[0, {v}\\)"):
        env.step_tokens([1, v + 3])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        env.step_tokens([[1, 2]])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        env.step_tokens([1.5])
    # Nothing was consumed by the rejected calls.
    assert env.step_tokens([])[0]["response_len"] == 0


def test_given_problem_signed_reward_and_overlong_penalty(tiny_tokenizer, local_verifier):
    env = make_env(
        tiny_tokenizer,
        local_verifier,
        max_response_tokens=20,
        overlong_buffer=10,
        reward_scheme=RewardScheme.SIGNED,
    )
    problem = Problem("What is 2 + 2?", ("4",), "custom:2+2")
    _, info = env.reset(seed=0, options={"problem": problem})
    assert info["problem"] == "What is 2 + 2?"
    eos = tiny_tokenizer.eos_token_id
    body = encode(tiny_tokenizer, "\\boxed{4}")
    pad = encode(tiny_tokenizer, " a")[0]
    # 15 tokens = 5 past L_max - L_buf = 10: penalty -(15 - 10) / 10 = -0.5.
    toks = [pad] * (14 - len(body)) + body + [eos]
    *_, r, term, _, fin = env.step_tokens(toks)
    assert term and fin["response_tokens"] == 15
    assert fin["reward_components"] == {"verifier": 1.0, "overlong": pytest.approx(-0.5)}
    assert r == pytest.approx(0.5)
    env.reset(seed=0, options={"problem": problem})
    *_, r, _, _, fin = env.step_tokens(encode(tiny_tokenizer, "\\boxed{5}") + [eos])
    assert r == -1.0 and fin["reward_components"]["overlong"] == 0.0


def test_prompt_template_is_configurable(tiny_tokenizer, local_verifier):
    tpl = PromptTemplate(user="Q: {question} A:", system="Be brief.", assistant_prefix="Sure.")
    env = make_env(
        tiny_tokenizer, local_verifier, config=EnvConfig(max_prompt_tokens=80, prompt=tpl)
    )
    obs, info = env.reset(seed=0)
    text = tiny_tokenizer.decode(obs["prompt_ids"][: int(obs["prompt_len"])].tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert f"Q: {info['problem']} A:" in text and text.endswith("assistant\nSure.")
    raw = make_env(
        tiny_tokenizer,
        local_verifier,
        config=EnvConfig(prompt=PromptTemplate(user="{question}", use_chat_template=False)),
    )
    obs, info = raw.reset(seed=0)
    assert tiny_tokenizer.decode(obs["prompt_ids"][: int(obs["prompt_len"])].tolist()) == (
        info["problem"] + "\n"
    )
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate(user="no placeholder")


def test_config_and_prompt_limits_are_validated(tiny_tokenizer, local_verifier):
    with pytest.raises(TypeError, match="unknown env argument"):
        make_env(tiny_tokenizer, local_verifier, max_tokens=3)
    with pytest.raises(ValueError, match="overlong_buffer"):
        EnvConfig(max_response_tokens=8, overlong_buffer=9)
    with pytest.raises(ValueError, match="stop_token_ids"):
        EnvConfig(stop_token_ids=(-1,))
    # Names are accepted, as in the trainer's RolloutWorkerConfig, and stored as enums.
    named = EnvConfig(reward_scheme="signed", answer_format="EXPR")
    assert named.reward_scheme is RewardScheme.SIGNED and named.answer_format is AnswerFormat.EXPR
    with pytest.raises(ValueError, match=r"reward_scheme must be .*'binary', 'signed'.*'plus'"):
        EnvConfig(reward_scheme="plus")
    env = make_env(tiny_tokenizer, local_verifier, max_prompt_tokens=8)
    with pytest.raises(ValueError, match="longer than max_prompt_tokens=8"):
        env.reset(seed=0)
    with pytest.raises(ValueError, match="more than max_prompt_tokens=8"):
        env.reset(options={"problem": Problem("What is 1 + 1?", ("2",), "k")})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"problems": []})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MathReasoningEnv(tokenizer="/nonexistent/tok", verifier=local_verifier)
    with pytest.raises(ValueError, match="neither 'local' nor an address"):
        MathReasoningEnv(tokenizer=tiny_tokenizer, verifier="nonsense")


def test_custom_stop_tokens_and_render(tiny_tokenizer, local_verifier):
    stop = encode(tiny_tokenizer, ".")[0]
    env = make_env(tiny_tokenizer, local_verifier, stop_token_ids=(stop,), render_mode="ansi")
    env.reset(seed=0)
    obs, _, term, _, info = env.step_tokens(encode(tiny_tokenizer, "x.") + [9, 9])
    assert term and info["tokens_consumed"] == len(encode(tiny_tokenizer, "x."))
    assert env.render().startswith("Q: ")
