"""Problem sources: arithmetic generator, hash splits, reasoning-gym adapter, file loader."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import numpy as np
import pytest

from fipo_env.tasks import (
    ArithmeticTask,
    ListTask,
    Problem,
    ReasoningGymTask,
    load_problems,
    make_task,
    sample_problems,
    split_of,
)
from fipo_env.tasks.arithmetic import MAX_LEVEL, latex_number
from fipo_env.tasks.files import last_boxed
from server.types import AnswerFormat


def _eval_expr(expr: str) -> Fraction:
    """Exact value of an arithmetic expression written with + - * / ( ) and integers."""
    py = re.sub(r"(\d+)", r"Fraction(\1)", expr)
    return eval(py, {"Fraction": Fraction})  # the expression comes from our own generator


@pytest.mark.parametrize("level", range(MAX_LEVEL + 1))
def test_levels_are_deterministic_and_golds_exact(level):
    task = ArithmeticTask(level, split="all")
    a = [task.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [task.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(level)
    for _ in range(200):
        p = task.sample(rng)
        assert p.source == f"arithmetic/level{level}" and p.meta["level"] == level
        key = p.canonical.split(":", 1)[1]
        if key.startswith("expand"):
            a_, b_ = (int(v) for v in re.findall(r"-?\d+", key))
            # Check the polynomial gold at a few points against (x + a)(x + b).
            gold = p.gold.replace("x^{2}", "x**2").replace("x", "*x").lstrip("*")
            gold = gold.replace("+*x", "+x").replace("-*x", "-x")
            for x in (-3, 0, 2, 5):
                assert eval(gold, {"x": x}) == (x + a_) * (x + b_), p
        elif "=" in key:  # a x + b = c
            a_, b_, c_ = (int(v) for v in re.findall(r"-?\d+", key))
            x = Fraction(c_ - b_, a_)
            assert p.gold == latex_number(x) and a_ * x + b_ == c_
        else:
            assert p.gold == latex_number(_eval_expr(key)), p


def test_level0_is_one_digit_addition_and_covers_all_pairs():
    task = ArithmeticTask(0, split="all")
    rng = np.random.default_rng(0)
    seen = {task.sample(rng).canonical for _ in range(3000)}
    assert seen == {f"arith:{a}+{b}" for a in range(10) for b in range(10)}


def test_fraction_golds_are_reduced_latex():
    assert latex_number(Fraction(6, 8)) == "\\frac{3}{4}"
    assert latex_number(Fraction(-5, 2)) == "-\\frac{5}{2}"
    assert latex_number(Fraction(4, 2)) == "2"


def test_train_and_eval_never_overlap():
    levels = (0, 1, 2, 4, 5, 6)
    train = ArithmeticTask(levels, split="train", eval_fraction=0.2)
    evals = ArithmeticTask(levels, split="eval", eval_fraction=0.2)
    tr = {p.canonical for p in sample_problems(train, 1500, seed=1)}
    ev = {p.canonical for p in sample_problems(evals, 400, seed=2)}
    assert tr and ev and not tr & ev
    # The split is a function of the canonical problem only.
    assert all(split_of(c, 0.2) == "train" for c in tr)
    assert all(split_of(c, 0.2) == "eval" for c in ev)
    # Level 0 has 100 problems; about eval_fraction of them are eval.
    ev0 = {
        p.canonical
        for p in sample_problems(ArithmeticTask(0, split="eval", eval_fraction=0.2), 10, 0)
    }
    assert (
        5
        <= sum(split_of(f"arith:{a}+{b}", 0.2) == "eval" for a in range(10) for b in range(10))
        <= 40
    )
    assert ev0 <= {f"arith:{a}+{b}" for a in range(10) for b in range(10)}


def test_same_expression_at_two_levels_is_one_problem_in_one_split():
    for split in ("train", "eval"):
        task = ArithmeticTask((0, 1), split=split, eval_fraction=0.5)
        probs = sample_problems(task, 100, seed=3)
        assert all(split_of(p.canonical, 0.5) == split for p in probs)
    # Level 1's additions are level 0's problems: same canonical key, hence same split.
    l0 = {p.canonical for p in sample_problems(ArithmeticTask(0, split="all"), 100, 0)}
    l1 = {p.canonical for p in sample_problems(ArithmeticTask(1, split="all"), 300, 0)}
    assert l0 < l1 and len(l0 | l1) == 300


def test_empty_split_and_too_few_problems_are_clear_errors():
    with pytest.raises(ValueError, match="no 'eval' problem"):
        ArithmeticTask(0, split="eval", eval_fraction=0.0, max_attempts=200).sample(
            np.random.default_rng(0)
        )
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        sample_problems(ArithmeticTask(0, split="all"), 101, seed=0, max_attempts=5000)
    with pytest.raises(ValueError, match="level"):
        ArithmeticTask(9)
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask(0, split="test")


def test_make_task_specs():
    t = make_task("arithmetic:0,1", split="eval", eval_fraction=0.5)
    assert isinstance(t, ArithmeticTask) and t.levels == (0, 1) and t.split == "eval"
    assert make_task(t) is t
    with pytest.raises(ValueError, match="unknown task spec"):
        make_task("gsm8k")
    with pytest.raises(ValueError, match="bad arithmetic levels"):
        make_task("arithmetic:a")


def test_problem_validation():
    with pytest.raises(ValueError, match="golds"):
        Problem(question="q", golds="4", canonical="k")  # a str, not a tuple
    with pytest.raises(ValueError, match="question"):
        Problem(question=" ", golds=("4",), canonical="k")


def test_reasoning_gym_adapter_is_deterministic_and_split():
    train = ReasoningGymTask("basic_arithmetic", size=500, seed=3, split="train", eval_fraction=0.3)
    evals = ReasoningGymTask("basic_arithmetic", size=500, seed=3, split="eval", eval_fraction=0.3)
    a = sample_problems(train, 20, seed=0)
    assert a == sample_problems(train, 20, seed=0)
    ev = sample_problems(evals, 20, seed=0)
    assert not {p.canonical for p in a} & {p.canonical for p in ev}
    p = a[0]
    assert p.source == "reasoning_gym/basic_arithmetic" and p.golds[0].lstrip("-").isdigit()
    assert "Calculate" in p.question or "=" in p.question or "?" in p.question
    with pytest.raises(ValueError, match="could not create"):
        ReasoningGymTask("no_such_generator")


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_file_loader_formats(tmp_path):
    math_rows = [
        {"problem": "What is $1+1$?", "solution": "Clearly $1+1=\\boxed{2}$."},
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    ]
    gsm_rows = [
        {"question": "Tom has 3 apples and buys 1,000 more.", "answer": "3+1000\n#### 1,003"}
    ]
    dapo_rows = [
        {
            "prompt": [{"role": "user", "content": "Find x if x+2=5."}],
            "reward_model": {"ground_truth": "3", "style": "rule"},
        }
    ]
    _write_jsonl(tmp_path / "math.jsonl", math_rows)
    _write_jsonl(tmp_path / "gsm.jsonl", gsm_rows)
    (tmp_path / "dapo.json").write_text(json.dumps(dapo_rows))
    m = load_problems(tmp_path / "math.jsonl")
    assert [p.gold for p in m] == ["2", "\\frac{1}{2}"]
    assert m[0].question == "What is $1+1$?" and m[0].answer_format is AnswerFormat.LATEX
    assert load_problems(tmp_path / "gsm.jsonl")[0].gold == "1003"
    d = load_problems(tmp_path / "dapo.json")[0]
    assert (d.question, d.gold) == ("Find x if x+2=5.", "3")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"problem": ["2+2?", "3*3?"], "answer": ["4", "9"]}), tmp_path / "p.parquet"
    )
    assert [p.gold for p in load_problems(tmp_path / "p.parquet")] == ["4", "9"]

    import datasets

    ds = datasets.Dataset.from_dict({"question": ["5-1?", "6/2?"], "answer": ["#### 4", "#### 3"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    assert [p.gold for p in load_problems(tmp_path / "hf")] == ["4", "3"]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hfdict"))
    with pytest.raises(ValueError, match="hf_split"):
        load_problems(tmp_path / "hfdict")
    assert len(load_problems(tmp_path / "hfdict", hf_split="test")) == 2


def test_file_loader_splits_dedups_and_errors(tmp_path):
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(300)]
    rows.append({"problem": "what is 1  +  1?", "answer": "2"})  # duplicate of row 1
    _write_jsonl(tmp_path / "a.jsonl", rows)
    all_ = load_problems(tmp_path / "a.jsonl")
    assert len(all_) == 300
    tr = load_problems(tmp_path / "a.jsonl", split="train", eval_fraction=0.25)
    ev = load_problems(tmp_path / "a.jsonl", split="eval", eval_fraction=0.25)
    assert len(tr) + len(ev) == 300 and 30 < len(ev) < 120
    assert not {p.canonical for p in tr} & {p.canonical for p in ev}

    _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "x?"}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 2: no answer column"):
        load_problems(tmp_path / "bad.jsonl")
    with pytest.warns(UserWarning, match=r"skipped 1 bad row"):
        assert len(load_problems(tmp_path / "bad.jsonl", on_bad_row="skip")) == 1
    (tmp_path / "broken.jsonl").write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl row 2: invalid JSON"):
        load_problems(tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_problems(tmp_path / "x.csv")
    _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no problems"):
        make_task(f"file:{tmp_path / 'empty.jsonl'}", split="all")


def test_bad_rows_one_numbering_full_path_and_skip_means_skip(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"problem": "1+1?", "answer": "2"}\n'
        b"\n"  # a blank line still counts as a line
        b"{oops\n"  # row 3: invalid JSON
        b'["not", "an", "object"]\n'  # row 4
        b'{"problem": "\xff\xfe?", "answer": "1"}\n'  # row 5: not UTF-8
        b'{"problem": "x?"}\n'  # row 6: no answer column
        b'{"problem": "2+2?", "answer": "4"}\n'  # row 7
    )
    with pytest.raises(ValueError) as e:
        load_problems(path)
    assert str(e.value).startswith(f"{path} row 3: invalid JSON")
    with pytest.warns(UserWarning, match=r"skipped 4 bad row\(s\).*first: row 3: invalid JSON"):
        problems = load_problems(path, on_bad_row="skip")
    assert [(p.question, p.meta["row"]) for p in problems] == [("1+1?", 1), ("2+2?", 7)]
    # Rows of non-line formats are numbered from 1 as well.
    (tmp_path / "rows.json").write_text(json.dumps([{"problem": "a?", "answer": "1"}, 5]))
    with pytest.raises(ValueError, match=r"rows.json row 2: expected an object, got int"):
        load_problems(tmp_path / "rows.json")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(load_problems(tmp_path / "rows.json", on_bad_row="skip")) == 1


def test_list_task_and_last_boxed():
    t = ListTask([Problem("q1", ("1",), "a"), Problem("q2", ("2",), "b")])
    rng = np.random.default_rng(0)
    assert {t.sample(rng).canonical for _ in range(50)} == {"a", "b"}
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
