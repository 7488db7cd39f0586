"""The tools the assistant may call: their OpenAI function specs and implementations.

* ``calculator``: arithmetic on numbers (+ - * / ** and parentheses), parsed with ``ast``,
  never ``eval``;
* ``clock``: the current UTC time;
* ``summarize``: a summary of a text by the LLM (so the tool executor calls the LLM too).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

__all__ = ["MAX_DIGITS", "TOOL_SPECS", "ToolError", "calculate", "clock"]


class ToolError(Exception):
    """The tool cannot do what it was asked (bad arguments): a `rejected` call."""


def _spec(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(properties)}}}  # fmt: skip


TOOL_SPECS: list[dict[str, Any]] = [
    _spec("calculator", "Evaluate an arithmetic expression.", {"expression": {"type": "string"}}),
    _spec("clock", "The current date and time in UTC.", {}),
    _spec("summarize", "Summarize a text in one sentence.", {"text": {"type": "string"}}),
]

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Mod: operator.mod,
}  # fmt: skip


#: The most digits a result (and every step towards it) may have. The evaluation runs in the
#: tool executor's event loop, where no timeout can stop it: `(((9**99)**99)**99)**99` is 23
#: characters and minutes of CPU, and ints over 4,300 digits cannot even be written as JSON.
MAX_DIGITS = 100


def _checked(value: Any) -> float | int:
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ToolError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is not a finite number")
    if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
        raise ToolError(f"the result has more than {MAX_DIGITS} digits")
    return value


def _power(base: float | int, exponent: float | int) -> float | int:
    # An int power is refused before it is computed: the check after would come minutes late. A
    # float's overflows (OverflowError, or inf) at once, and is refused after.
    if type(base) is int and type(exponent) is int and abs(base) > 1 and exponent * math.log10(abs(base)) > MAX_DIGITS:
        raise ToolError(f"the result has more than {MAX_DIGITS} digits")
    return base**exponent


def calculate(expression: str) -> float | int:
    """``calculate("6*7") == 42``; anything but numbers and arithmetic raises :class:`ToolError`,
    and so does a result (or a step towards it) of more than :data:`MAX_DIGITS` digits."""
    if len(expression) > 200:
        raise ToolError("expression too long")

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not True, not complex
            return _checked(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                return _checked(_power(left, right))
            return _checked(_OPERATORS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _checked(_OPERATORS[type(node.op)](walk(node.operand)))
        raise ToolError(f"not arithmetic: {ast.dump(node)[:60]}")

    try:
        return walk(ast.parse(expression, mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError) as error:
        raise ToolError(str(error)) from error


def clock() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


Summarizer = Callable[[str], Awaitable[str]]
