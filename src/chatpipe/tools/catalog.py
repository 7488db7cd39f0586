"""The tools the assistant may call: their OpenAI function specs and implementations.

* ``calculator``: arithmetic on numbers (+ - * / ** and parentheses), parsed with ``ast``,
  never ``eval``;
* ``clock``: the current UTC time;
* ``summarize``: a summary of a text by the LLM (so the tool executor calls the LLM too).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

__all__ = ["TOOL_SPECS", "ToolError", "calculate", "clock"]


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


def calculate(expression: str) -> float | int:
    """``calculate("6*7") == 42``; anything but numbers and arithmetic raises :class:`ToolError`."""
    if len(expression) > 200:
        raise ToolError("expression too long")

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ToolError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        raise ToolError(f"not arithmetic: {ast.dump(node)[:60]}")

    try:
        return walk(ast.parse(expression, mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError) as error:
        raise ToolError(str(error)) from error


def clock() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


Summarizer = Callable[[str], Awaitable[str]]
