"""The dispatchers' check of ``suppress_instrumentation``: the contrib utility's answers, read
from the context once (chatobs.instrumentation.dispatch), or the utility itself when the two
could disagree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import pytest
from opentelemetry import context
from opentelemetry.instrumentation.utils import (
    is_http_instrumentation_enabled,
    is_instrumentation_enabled,
    suppress_http_instrumentation,
    suppress_instrumentation,
)

from chatobs.instrumentation.dispatch import (
    _enabled_check,
    http_instrumentation_enabled,
    instrumentation_enabled,
    instrumentation_enabled_unless,
)


@contextlib.contextmanager
def _value(key: str, value: object) -> Iterator[None]:
    token = context.attach(context.set_value(key, value))
    try:
        yield
    finally:
        context.detach(token)


SCOPES = {
    "nothing suppressed": contextlib.nullcontext,
    "suppress_instrumentation": suppress_instrumentation,
    "suppress_http_instrumentation": suppress_http_instrumentation,
    "the plain-string key alone, as older code sets it": lambda: _value("suppress_instrumentation", True),
    "the plain-string key set false": lambda: _value("suppress_instrumentation", False),
    "an unrelated key": lambda: _value("tenant", "acme"),
}


@pytest.mark.parametrize("scope", SCOPES.values(), ids=SCOPES.keys())
def test_the_checks_answer_as_the_contrib_utilities_do(scope):
    with scope():
        assert instrumentation_enabled() is is_instrumentation_enabled()
        assert http_instrumentation_enabled() is is_http_instrumentation_enabled()
    assert instrumentation_enabled is not is_instrumentation_enabled  # the learned check is in use


def test_a_suppressor_whose_keys_cannot_be_learned_leaves_the_utility_in_charge():
    assert _enabled_check(is_instrumentation_enabled, contextlib.nullcontext) is is_instrumentation_enabled


def test_a_utility_that_answers_otherwise_than_the_learned_keys_is_asked_itself():
    def never_suppressed() -> bool:  # a release that suppresses some other way, say
        return True

    assert _enabled_check(never_suppressed, suppress_instrumentation) is never_suppressed


FLAG: ContextVar[bool] = ContextVar("test_flag", default=False)


@contextlib.contextmanager
def _flagged() -> Iterator[None]:
    token = FLAG.set(True)
    try:
        yield
    finally:
        FLAG.reset(token)


@pytest.mark.parametrize("scope", SCOPES.values(), ids=SCOPES.keys())
def test_a_check_with_a_flag_of_its_own_answers_as_the_utility_and_no_while_the_flag_is_set(scope):
    enabled = instrumentation_enabled_unless(FLAG)
    with scope():
        assert enabled() is is_instrumentation_enabled()
        with _flagged():
            assert enabled() is False


def test_a_flag_is_still_honoured_when_the_utility_is_left_in_charge():
    def never_suppressed() -> bool:
        return True

    enabled = _enabled_check(never_suppressed, suppress_instrumentation, unless=FLAG)
    assert enabled() is True
    with _flagged():
        assert enabled() is False
