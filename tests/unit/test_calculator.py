"""The calculator tool: arithmetic answered, and what would take the executor's event loop for
minutes (or cannot be written as JSON) refused at once."""

from __future__ import annotations

import time

import pytest

from chatpipe.tools.catalog import MAX_DIGITS, ToolError, calculate


@pytest.mark.parametrize(
    "expression, result",
    [("6*7", 42), ("2**101", 2**101), ("1.01**365", 1.01**365), ("0.5**1000", 0.5**1000), ("10.0**150", 1e150),
     ("7 % (10**99)", 7), ("1**(10**99)", 1), ("(10**99)**0.5", (10**99) ** 0.5), ("2**-3", 0.125)],
)  # fmt: skip
def test_arithmetic_within_the_bounds_is_answered(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize(
    "expression",
    ["(((9**99)**99)**99)**99", "(9**99)**99", f"10**{MAX_DIGITS}", "9**99*9**99", "2**(10**99)", "(-8)**0.5",
     "1e308*10", "1.01**1000000", "0**-1", "True+1", "__import__('os')"],
)  # fmt: skip
def test_what_is_too_large_or_not_arithmetic_is_refused_at_once(expression):
    started = time.perf_counter()
    with pytest.raises(ToolError):
        calculate(expression)
    assert time.perf_counter() - started < 0.1
