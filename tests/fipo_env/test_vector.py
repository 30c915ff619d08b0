"""The native vector env: make_vec, batched step / step_tokens, autoreset modes, groups."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode

import fipo_env
from fipo_env.envs.vector import MathReasoningVectorEnv


class CountingScorer:
    """Delegates to a real verifier and records the size of every ``score`` call."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[int] = []

    def score(self, items):
        self.calls.append(len(items))
        return self.inner.score(items)


def make_vec(tok, verifier, n=4, **kw):
    kw.setdefault("max_prompt_tokens", 64)
    kw.setdefault("max_response_tokens", 16)
    return gym.make_vec(fipo_env.ENV_ID, num_envs=n, tokenizer=tok, verifier=verifier, **kw)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_make_vec_builds_the_native_vector_env(tiny_tokenizer, local_verifier):
    venv = make_vec(tiny_tokenizer, local_verifier, n=3)
    assert isinstance(venv, MathReasoningVectorEnv)
    assert venv.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    obs, infos = venv.reset(seed=0)
    assert obs in venv.observation_space
    assert obs["prompt_ids"].shape == (3, 64) and obs["response_ids"].shape == (3, 16)
    assert obs["prompt_len"].shape == (3,) and infos["_problem"].all()
    assert venv.action_space == gym.spaces.MultiDiscrete([len(tiny_tokenizer)] * 3)
    obs2, infos2 = venv.reset(seed=0)
    assert (obs2["prompt_ids"] == obs["prompt_ids"]).all()
    assert list(infos2["problem"]) == list(infos["problem"])
    venv.close()


def test_make_vec_accepts_render_mode_ansi_like_the_single_env(tiny_tokenizer, local_verifier):
    venv = make_vec(tiny_tokenizer, local_verifier, n=2, render_mode="ansi")
    assert venv.render_mode == "ansi" and venv.render() is None  # nothing to show before reset
    _, infos = venv.reset(seed=0)
    venv.step_tokens([encode(tiny_tokenizer, "so"), []])
    frames = venv.render()
    assert len(frames) == 2
    assert frames[0] == f"Q: {infos['problem'][0]}\nA: so"
    assert frames[1] == f"Q: {infos['problem'][1]}\nA: "
    venv.close()
    with pytest.raises(ValueError, match="render_mode"):
        make_vec(tiny_tokenizer, local_verifier, n=2, render_mode="human")


def test_vector_episodes_match_single_env_and_score_in_one_batch(tiny_tokenizer, local_verifier):
    n = 6
    scorer = CountingScorer(local_verifier)
    venv = make_vec(tiny_tokenizer, scorer, n=n, max_response_tokens=20)
    _, infos = venv.reset(seed=11)
    problems = venv.problems
    eos = tiny_tokenizer.eos_token_id
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(n):
        gold = infos["gold"][i]
        if i % 3 == 0:
            seqs.append(encode(tiny_tokenizer, f"\\boxed{{{gold}}}") + [eos, 5])
        elif i % 3 == 1:
            seqs.append(encode(tiny_tokenizer, f"I get {int(gold) + 1}") + [eos])
        else:
            seqs.append([t for t in rng.integers(0, len(tiny_tokenizer), 40).tolist() if t != eos])
    obs, rew, term, trunc, infos = venv.step_tokens(seqs)
    assert scorer.calls == [n]  # every episode that ended in this call: one verifier batch
    assert (term | trunc).all()
    assert list(term) == [True, True, False] * 2 and list(trunc) == [False, False, True] * 2
    fin = infos["final_info"]
    # Same-step autoreset: the returned obs already holds the next prompts.
    assert (obs["response_len"] == 0).all() and infos["_final_obs"].all()
    single = gym.make(
        fipo_env.ENV_ID,
        tokenizer=tiny_tokenizer,
        verifier=local_verifier,
        max_prompt_tokens=64,
        max_response_tokens=20,
    )
    for i in range(n):
        so, sr, ste, str_, sinfo = single.reset(
            options={"problem": problems[i]}
        ) and single.step_tokens(seqs[i])
        assert (sr, ste, str_) == (rew[i], term[i], trunc[i])
        for key in so:
            assert np.array_equal(so[key], infos["final_obs"][i][key]), (i, key)
        for key in ("response", "status", "correct", "response_tokens", "stop_reason", "gold"):
            assert fin[key][i] == sinfo[key], (i, key)
        assert fin["reward_components"]["verifier"][i] == sinfo["reward_components"]["verifier"]
        assert infos["tokens_consumed"][i] == sinfo["tokens_consumed"]
    # Boxed gold: 1; wrong number: 0; random tokens: whatever the single env says (above).
    assert list(rew[[0, 1, 3, 4]]) == [1.0, 0.0, 1.0, 0.0]
    assert list(fin["status"][:2]) == ["OK", "WRONG"]  # [2]: random text, WRONG or NO_ANSWER


def test_batched_step_equals_step_tokens(tiny_tokenizer, local_verifier):
    n, t = 5, 30
    rng = np.random.default_rng(3)
    eos = tiny_tokenizer.eos_token_id
    toks = rng.integers(0, len(tiny_tokenizer), size=(n, t))
    toks[rng.random((n, t)) < 0.06] = eos
    a = make_vec(tiny_tokenizer, local_verifier, n=n, autoreset_mode="NextStep")
    b = make_vec(tiny_tokenizer, local_verifier, n=n, autoreset_mode="NextStep")
    a.reset(seed=4)
    b.reset(seed=4)
    rewards_a = np.zeros(n)
    done_a = np.zeros(n, dtype=bool)
    ends_a = {}
    for k in range(t):
        obs_a, r, te, tr, inf = a.step(toks[:, k])
        for i in np.flatnonzero((te | tr) & ~done_a):
            ends_a[i] = (r[i], te[i], obs_a["response_len"][i], inf["response"][i])
        rewards_a += r
        done_a |= te | tr
    obs_b, r_b, te_b, tr_b, inf_b = b.step_tokens(toks)  # 2-D array form
    ended_b = te_b | tr_b
    for i in range(n):
        first_end = ended_b[i]
        assert first_end == (i in ends_a)
        if first_end:
            assert ends_a[i] == (r_b[i], te_b[i], obs_b["response_len"][i], inf_b["response"][i])


def test_next_step_autoreset_ignores_the_next_action(tiny_tokenizer, local_verifier):
    venv = make_vec(tiny_tokenizer, local_verifier, n=2, autoreset_mode=AutoresetMode.NEXT_STEP)
    _, infos = venv.reset(seed=0)
    eos = tiny_tokenizer.eos_token_id
    obs, r, te, tr, inf = venv.step(np.array([eos, 5]))
    assert list(te) == [True, False] and inf["_status"][0] and not inf["_status"][1]
    assert obs["response_len"][0] == 1  # final observation, not reset yet
    obs, r, te, tr, inf = venv.step(np.array([7, 7]))
    assert obs["response_len"].tolist() == [0, 2]  # env 0 was reset, its action ignored
    assert inf["_problem"].tolist() == [True, False] and inf["episode_index"][0] == 1
    assert inf["tokens_consumed"].tolist() == [0, 1]


def test_disabled_autoreset_needs_reset_mask(tiny_tokenizer, local_verifier):
    venv = make_vec(tiny_tokenizer, local_verifier, n=2, autoreset_mode="Disabled")
    venv.reset(seed=0)
    eos = tiny_tokenizer.eos_token_id
    venv.step_tokens([[eos], [5]])
    with pytest.raises(ResetNeeded, match=r"\[0\]"):
        venv.step(np.array([5, 5]))
    obs, r, te, tr, inf = venv.step_tokens([[], [6]])  # ended env 0 gets nothing: fine
    assert obs["response_len"].tolist() == [1, 2] and not te.any()
    obs, infos = venv.reset(options={"reset_mask": np.array([True, False])})
    assert obs["response_len"].tolist() == [0, 2] and infos["_problem"].tolist() == [True, False]
    venv.step(np.array([5, 5]))
    with pytest.raises(ValueError, match="reset_mask"):
        venv.reset(options={"reset_mask": np.array([1, 0])})


def test_groups_share_problems_whatever_the_pace(tiny_tokenizer, local_verifier):
    venv = make_vec(tiny_tokenizer, local_verifier, n=6, group_size=3, max_response_tokens=6)
    _, infos = venv.reset(seed=2)
    assert infos["group"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(set(infos["canonical"][:3])) == 1 and len(set(infos["canonical"][3:])) == 1
    eos = tiny_tokenizer.eos_token_id
    seen: dict[tuple[int, int], set[str]] = {}
    rng = np.random.default_rng(0)
    for _ in range(40):  # members end at different times (random stop tokens)
        acts = np.where(rng.random(6) < 0.3, eos, 5)
        _, _, _, _, inf = venv.step(acts)
        for i in np.flatnonzero(inf.get("_canonical", np.zeros(6, bool))):
            seen.setdefault((int(inf["group"][i]), int(inf["episode_index"][i])), set()).add(
                inf["canonical"][i]
            )
    assert len(seen) > 6
    assert all(len(v) == 1 for v in seen.values())  # k-th episode of a group: one problem
    with pytest.raises(ValueError, match="group_size"):
        make_vec(tiny_tokenizer, local_verifier, n=4, group_size=3)


def test_bad_step_tokens_input_is_a_clear_error(tiny_tokenizer, local_verifier):
    venv = make_vec(tiny_tokenizer, local_verifier, n=2)
    with pytest.raises(ResetNeeded):
        venv.step(np.array([1, 1]))
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="must hold 2 sequences"):
        venv.step_tokens([[1]])
    with pytest.raises(ValueError, match=r"token_ids\[1\] holds token id"):
        venv.step_tokens([[1], [10**6]])
    with pytest.raises(ValueError, match="lengths"):
        venv.step_tokens(np.ones((2, 3), dtype=np.int64), lengths=[4, 1])
    with pytest.raises(ValueError, match="actions must be 2 token ids"):
        venv.step(np.array([1.0, 2.0]))
    # Nothing was written by the rejected calls.
    obs, *_ = venv.step_tokens(np.ones((2, 3), dtype=np.int64), lengths=[2, 0])
    assert obs["response_len"].tolist() == [2, 0]


class FailingScorer:
    """A verifier whose service is down."""

    def score(self, items):
        raise ConnectionError("reward server unreachable")


def test_verifier_failure_is_a_clear_error_and_needs_reset(tiny_tokenizer, local_verifier):
    eos = tiny_tokenizer.eos_token_id
    venv = make_vec(tiny_tokenizer, FailingScorer(), n=2)
    venv.reset(seed=0)
    with pytest.raises(RuntimeError, match="reward server unreachable.*call reset"):
        venv.step_tokens([[eos], [5]])
    with pytest.raises(ResetNeeded, match="verifier call failed"):
        venv.step_tokens([[5], [5]])
    venv.verifier = local_verifier  # the service is back
    venv.reset()
    assert venv.step_tokens([[eos], [5]])[2].tolist() == [True, False]

    env = gym.make(fipo_env.ENV_ID, tokenizer=tiny_tokenizer, verifier=FailingScorer())
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match="failed to score 1 finished episode"):
        env.step(eos)
    with pytest.raises(ResetNeeded):
        env.step(5)


@pytest.mark.parametrize("mode", ["SameStep", "NextStep"])
def test_padded_array_and_list_inputs_give_identical_steps(tiny_tokenizer, local_verifier, mode):
    n = 5
    eos = tiny_tokenizer.eos_token_id
    a = make_vec(tiny_tokenizer, local_verifier, n=n, autoreset_mode=mode, max_response_tokens=12)
    b = make_vec(tiny_tokenizer, local_verifier, n=n, autoreset_mode=mode, max_response_tokens=12)
    a.reset(seed=8)
    b.reset(seed=8)
    rng = np.random.default_rng(1)
    n_ended = 0
    for _ in range(15):
        t = int(rng.integers(0, 7))
        toks = rng.integers(0, len(tiny_tokenizer), size=(n, t))
        toks[rng.random((n, t)) < 0.1] = eos
        lens = rng.integers(0, t + 1, size=n)
        out_a = a.step_tokens(toks, lengths=lens)  # vectorised padded path
        out_b = b.step_tokens([toks[i, : lens[i]].tolist() for i in range(n)])  # per-row path
        for key in out_a[0]:
            assert np.array_equal(out_a[0][key], out_b[0][key]), key
        for x, y in zip(out_a[1:4], out_b[1:4], strict=True):
            assert np.array_equal(x, y)
        assert np.array_equal(out_a[4]["tokens_consumed"], out_b[4]["tokens_consumed"])
        assert sorted(out_a[4]) == sorted(out_b[4])
        ends = out_a[4].get("final_info", out_a[4])
        ends_b = out_b[4].get("final_info", out_b[4])
        for key in ("status", "response"):
            if key in ends:
                assert list(ends[key]) == list(ends_b[key])
                n_ended += int(ends[f"_{key}"].sum())
        if "problem" in out_a[4]:
            assert list(out_a[4]["problem"]) == list(out_b[4]["problem"])
    assert n_ended > 4
