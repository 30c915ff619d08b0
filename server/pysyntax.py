"""Answers written in Python / sympy syntax (``10863*y**4 - 152*y``, ``sqrt(2)/2``), as LaTeX.

Datasets and generators used with other trainers (reasoning-gym among them) write golds the
way sympy prints them. math-verify reads those as LaTeX or as a bare expression and gets
them wrong: ``10863*y**4 + 568*y**3 - 2907*y**2 - 152*y`` has no LaTeX reading, and its
expression fallback keeps only the last number (``152``), so any answer whose last number
is 152 scored correct -- a reward that can be hacked. This module turns such text into the
LaTeX it means, so the verifier compares what the author meant.

How: the text is parsed with Python's own parser (``ast``, nothing is evaluated) and only a
whitelist of nodes is accepted -- numbers, symbols, ``+ - * / **`` (and ``^`` as power),
calls of a fixed set of sympy functions (``sqrt``, ``Rational``, ``exp``, ``log``, trig,
``Abs``, ...), tuples and one ``=``. Anything else (a call of another function, a string, an
attribute, a multi-letter name that is not a known constant or Greek letter) makes the text
ambiguous, and ``to_latex`` raises ``PySyntaxError``; the verifier then reports the gold as
GOLD_UNPARSABLE instead of guessing. Powers are size-checked like the guards check ``^``:
an exponent tower higher than 2 or a literal integer exponent above ``MAX_EXPONENT`` is
refused (the guards' caret checks do not see ``**``).
"""

from __future__ import annotations

import ast
import re

MAX_EXPONENT = 10_000
"""Largest literal integer exponent accepted after ``**``."""
MAX_TOWER = 2
"""Highest power tower accepted (``x**y**z`` is 3)."""
MAX_NODES = 2_000
"""Most syntax-tree nodes accepted in one answer."""

_FUNC_NAMES = (
    "sqrt|cbrt|root|Rational|Integer|Float|exp|log|ln|sin|cos|tan|cot|sec|csc|asin|acos|atan|"
    "sinh|cosh|tanh|Abs|factorial|binomial"
)
# Marks of Python / sympy syntax: a power `**`, a call of a sympy function (not a LaTeX
# command such as \sqrt), or a `*` between two operands.
_POWER = re.compile(r"\*\*")
_CALL = re.compile(rf"(?<![\\A-Za-z])(?:{_FUNC_NAMES})\s*\(")
_STAR = re.compile(r"[\w.)]\s*\*\s*[\w(]")
_BOXED = "\\boxed"

_GREEK = frozenset(
    [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
        "nu",
        "xi",
        "rho",
        "sigma",
        "tau",
        "upsilon",
        "phi",
        "chi",
        "psi",
        "omega",
        "Gamma",
        "Delta",
        "Theta",
        "Lambda",
        "Xi",
        "Sigma",
        "Upsilon",
        "Phi",
        "Psi",
        "Omega",
    ]
)
_CONSTANTS = {"pi": "\\pi", "E": "e", "I": "i", "oo": "\\infty"}
_TRIG = frozenset(["sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh"])
_ARC = {"asin": "\\arcsin", "acos": "\\arccos", "atan": "\\arctan"}
_INDEXED = re.compile(r"([A-Za-z])_?(\d+)")

# Precedence of what a LaTeX fragment is, for deciding where brackets are needed.
_SUM, _PRODUCT, _NEGATION, _POWER_PREC, _ATOM = 1, 2, 3, 4, 5


class PySyntaxError(ValueError):
    """Text that looks like Python / sympy syntax but cannot be read unambiguously."""


def looks_pythonic(text: str) -> bool:
    """Whether ``text`` is written in Python / sympy syntax rather than LaTeX.

    True for ``**``, a call of a sympy function such as ``sqrt(2)`` or ``Rational(3, 4)``,
    and, in text without LaTeX commands, a ``*`` between operands (``3*x``).
    """
    if _POWER.search(text) or _CALL.search(text):
        return True
    return "\\" not in text and bool(_STAR.search(text))


def to_latex(text: str) -> str:
    """The LaTeX that the Python / sympy expression ``text`` means.

    Args:
        text: An expression such as ``-34*x**8/15 - 5*x/4 + C``; a top-level ``a, b`` (a
            tuple) and one ``lhs = rhs`` are allowed.

    Returns:
        LaTeX without delimiters, e.g. ``-\\frac{34 \\cdot x^{8}}{15} - ...``.

    Raises:
        PySyntaxError: The text does not parse as Python, uses something outside the
            whitelist, or holds a power too large to evaluate safely.
    """
    body = text.strip().rstrip(".").strip()
    if "\\" in body:
        raise PySyntaxError(f"mixes Python syntax with LaTeX commands: {_clip(body)!r}")
    if body.count("=") == 1 and not re.search(r"[<>!=]=|=[=<>]", body):
        lhs, rhs = body.split("=")
        return f"{to_latex(lhs)} = {to_latex(rhs)}"
    try:
        tree = ast.parse(body, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise PySyntaxError(
            f"not a Python expression ({type(e).__name__}): {_clip(body)!r}"
        ) from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_NODES:
        raise PySyntaxError(f"expression has {nodes} syntax nodes; limit is {MAX_NODES}")
    root = tree.body
    if isinstance(root, ast.Tuple):
        if not root.elts:
            raise PySyntaxError("empty tuple")
        return ", ".join(_Emitter().emit(e)[0] for e in root.elts)
    return _Emitter().emit(root)[0]


def last_boxed_span(text: str, commands: tuple[str, ...] = (_BOXED,)) -> tuple[int, int] | None:
    """Where the content of the last ``\\boxed{...}`` (or another of ``commands``) lies.

    Returns:
        ``(start, end)`` with ``text[start:end]`` the content between the balanced braces,
        or ``None`` when there is no such command or its braces never close.
    """
    start = max(text.rfind(command + "{") for command in commands)
    if start < 0:
        return None
    begin = text.index("{", start) + 1
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return begin, i
    return None


def _latex_or_none(text: str) -> str | None:
    """``to_latex(text)`` when ``text`` looks like Python syntax and reads unambiguously."""
    if not text or not looks_pythonic(text):
        return None
    try:
        return to_latex(text)
    except PySyntaxError:
        return None


def rewrite_boxed(response: str) -> tuple[str, bool]:
    """Rewrite the last ``\\boxed{...}`` of a response from Python syntax to LaTeX.

    Returns:
        ``(text, changed)``: the response with the box's content converted, or the response
        unchanged when it has no box, the box is not in Python syntax, or it cannot be read.
    """
    span = last_boxed_span(response)
    latex = _latex_or_none(response[span[0] : span[1]]) if span else None
    if span is None or latex is None:
        return response, False
    return f"{response[: span[0]]}{latex}{response[span[1] :]}", True


def rewrite_final_line(response: str) -> tuple[str, bool]:
    """Box the final answer of a response without ``\\boxed`` when it is in Python syntax.

    The final answer is the last non-empty line, after its last ``:`` (``Answer: 3*x**2``).
    """
    if _BOXED in response:
        return response, False
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    latex = (
        _latex_or_none(lines[-1].rsplit(":", 1)[-1].strip().strip("$`").strip()) if lines else None
    )
    if latex is None:
        return response, False
    return f"{response}\n\\boxed{{{latex}}}", True


def _clip(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


class _Emitter:
    """Whitelisted syntax-tree nodes -> (LaTeX fragment, precedence)."""

    def __init__(self) -> None:
        self.tower = 0

    def emit(self, node: ast.AST) -> tuple[str, int]:
        if isinstance(node, ast.Constant):
            return self._constant(node.value)
        if isinstance(node, ast.Name):
            return self._name(node.id), _ATOM
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner, prec = self.emit(node.operand)
            if prec < _PRODUCT:
                inner = _paren(inner)
            return (f"-{inner}" if isinstance(node.op, ast.USub) else inner), _NEGATION
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise PySyntaxError(f"unsupported syntax {type(node).__name__}")

    def _constant(self, value: object) -> tuple[str, int]:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PySyntaxError(f"unsupported constant {value!r}")
        if isinstance(value, int):
            return str(value), _ATOM
        text = repr(value)
        if "e" in text or "E" in text:
            mantissa, _, exp = text.lower().partition("e")
            return f"{mantissa} \\times 10^{{{int(exp)}}}", _PRODUCT
        if text in ("inf", "nan"):
            raise PySyntaxError(f"unsupported number {text}")
        return text, _ATOM

    def _name(self, name: str) -> str:
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if len(name) == 1 and name.isalpha():
            return name
        if name in _GREEK:
            return f"\\{name}"
        m = _INDEXED.fullmatch(name)
        if m:
            return f"{m.group(1)}_{{{m.group(2)}}}"
        raise PySyntaxError(f"ambiguous multi-letter name {name!r}")

    def _binop(self, node: ast.BinOp) -> tuple[str, int]:
        op = node.op
        if isinstance(op, ast.Pow | ast.BitXor):  # `^` as power, as people write it
            return self._power(node)
        left, lp = self.emit(node.left)
        right, rp = self.emit(node.right)
        if isinstance(op, ast.Add):  # a + (b + c) needs no brackets, a + (-b) does
            return f"{left} + {_paren(right) if rp == _NEGATION else right}", _SUM
        if isinstance(op, ast.Sub):
            return f"{left} - {_paren(right) if rp in (_SUM, _NEGATION) else right}", _SUM
        if isinstance(op, ast.Mult):
            left = _paren(left) if lp == _SUM else left
            right = _paren(right) if rp in (_SUM, _NEGATION) else right
            return f"{left} \\cdot {right}", _PRODUCT
        if isinstance(op, ast.Div):
            return f"\\frac{{{left}}}{{{right}}}", _PRODUCT
        raise PySyntaxError(f"unsupported operator {type(op).__name__}")

    def _power(self, node: ast.BinOp) -> tuple[str, int]:
        exp_node = node.right
        if isinstance(exp_node, ast.UnaryOp) and isinstance(exp_node.operand, ast.Constant):
            exp_value = exp_node.operand.value
        else:
            exp_value = exp_node.value if isinstance(exp_node, ast.Constant) else None
        if isinstance(exp_value, int | float) and abs(exp_value) > MAX_EXPONENT:
            raise PySyntaxError(f"exponent {exp_value} is above the limit {MAX_EXPONENT}")
        self.tower += 1
        try:
            if self.tower >= MAX_TOWER + 1:
                raise PySyntaxError(f"power tower higher than {MAX_TOWER}")
            base, bp = self.emit(node.left)
            exponent, _ = self.emit(exp_node)
        finally:
            self.tower -= 1
        base = base if bp == _ATOM and not base.startswith("-") else _paren(base)
        return f"{base}^{{{exponent}}}", _POWER_PREC

    def _call(self, node: ast.Call) -> tuple[str, int]:
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise PySyntaxError("only plain calls of sympy functions are supported")
        name, args = node.func.id, [self.emit(a)[0] for a in node.args]

        def arity(*allowed: int) -> None:
            if len(args) not in allowed:
                raise PySyntaxError(f"{name}() takes {' or '.join(map(str, allowed))} argument(s)")

        if name == "sqrt":
            arity(1)
            return f"\\sqrt{{{args[0]}}}", _ATOM
        if name in ("cbrt", "root"):
            arity(1) if name == "cbrt" else arity(2)
            n = "3" if name == "cbrt" else args[1]
            return f"\\sqrt[{n}]{{{args[0]}}}", _ATOM
        if name == "Rational":
            arity(1, 2)
            return (
                (f"\\frac{{{args[0]}}}{{{args[1]}}}", _PRODUCT)
                if len(args) == 2
                else (
                    args[0],
                    _ATOM,
                )
            )
        if name in ("Integer", "Float"):
            arity(1)
            return args[0], _ATOM if not args[0].startswith("-") else _NEGATION
        if name == "exp":
            arity(1)
            return f"e^{{{args[0]}}}", _POWER_PREC
        if name in ("log", "ln"):
            arity(1, 2)
            if len(args) == 2:
                return f"\\log_{{{args[1]}}}\\left({args[0]}\\right)", _PRODUCT
            return f"\\ln\\left({args[0]}\\right)", _PRODUCT
        if name in _TRIG or name in _ARC:
            arity(1)
            command = _ARC.get(name, f"\\{name}")
            return f"{command}\\left({args[0]}\\right)", _PRODUCT
        if name == "Abs":
            arity(1)
            return f"\\left|{args[0]}\\right|", _ATOM
        if name == "factorial":
            arity(1)
            return f"{_paren(args[0])}!", _POWER_PREC
        if name == "binomial":
            arity(2)
            return f"\\binom{{{args[0]}}}{{{args[1]}}}", _ATOM
        raise PySyntaxError(f"unknown function {name}()")


def _paren(s: str) -> str:
    return f"\\left({s}\\right)"
