"""Property tests: no recording helper, and no setting, ever breaks the host.

Every public method of every recorder on a :class:`Telemetry` is found by introspection (a
new recorder or method is fuzzed without touching this file) and called with arbitrary
values: ``None``, huge, unicode and surrogate strings, ints, NaN, infinities, -0.0, negative
amounts, bytes, lists, ``Decimal``, and objects on which every operation raises. Each call
runs on a fresh ``Telemetry`` and is judged by what a scrape shows:

* no exception reaches the caller (a timed block's own exception still propagates);
* a bad amount, flag, enum or backend counts one ``chatobs_recording_errors_total`` and
  records nothing else (all or nothing per call);
* a good call records something, and every ``other`` label value in what it recorded is
  matched by ``chatobs_label_rejections_total{metric, label}``, and the other way round;
* both exposition formats parse with prometheus_client's parsers.

The same calls also go to one long-lived ``Telemetry`` with a tiny label cap, whose
exposition must pass ``chatobs check`` and ``promtool check metrics`` at the end of the run.
The setup path (``load_settings`` / ``setup()`` and the ``/metrics`` route) is fuzzed with
arbitrary label and resource-attribute settings: ``ConfigError`` naming the variable is the
only exception allowed, and a service that starts serves a valid exposition.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, Literal, get_args, get_origin, get_type_hints
from unittest import mock

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

import chatobs.telemetry as telemetry_module
from chatobs import ConfigError, Telemetry, llm_error_code, load_settings
from chatobs.catalogue import CATALOGUE, OVERFLOW_VALUE, SERVICES, allowed_fixed_values, get
from chatobs.check import check_exposition
from chatobs.recorders._base import Recorder, Timer
from chatobs.recorders.clients import BoundFailures, BoundOperation
from chatobs.settings import ChatobsSettings, Settings

OPENMETRICS = "application/openmetrics-text"
MAX_LABEL_LENGTH = 64
# The one line `promtool check metrics` reports by design (the roadmap's metric name).
ACCEPTED_LINT = {"sse_clients_gauge metric name should not include type 'gauge'"}
EXAMPLES_PER_METHOD = 20
SELF_METRICS = ("chatobs_label_rejections_total", "chatobs_recording_errors_total")
ENV = {"CHATOBS_PROCESS_METRICS": "false", "CHATOBS_MAX_LABEL_LENGTH": str(MAX_LABEL_LENGTH)}


class Hostile:
    """A value on which everything Python may call raises (but ``repr``, for the failure report)."""

    def _fail(self, *args: object) -> Any:
        raise RuntimeError("hostile value")

    __str__ = __format__ = __bool__ = __hash__ = __eq__ = __lt__ = __le__ = __gt__ = __ge__ = _fail  # type: ignore[assignment]
    __float__ = __int__ = __index__ = __len__ = __iter__ = _fail  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Hostile()"


class Mode(str, enum.Enum):  # noqa: UP042 - not StrEnum: this kind is the one whose str() misleads
    """A str-mixin enum: ``str()`` gives ``Mode.NORMAL``, its value is ``normal``."""

    NORMAL = "normal"


class BlockError(Exception):
    """Raised inside a timed block: it must come out unchanged."""


# -- value strategies -----------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc80", "\udfff"])
TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)
SPECIAL_TEXT = st.sampled_from(
    ["", " ", OVERFLOW_VALUE, "\n", '"', "\\", "\x00", '\\"\n', "\u2028", "é", "😀", "le", "__name__", "{x}"]
)
HUGE_TEXT = st.builds(lambda char, size: char * size, st.characters(exclude_categories=()), st.integers(65, 200_000))
WITH_SURROGATE = st.builds(lambda a, s, b: a + s + b, TEXT, SURROGATES, TEXT)
JUNK = st.one_of(
    st.none(),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.builds(Hostile),
    st.builds(object),
    st.builds(lambda: mock.MagicMock(spec=str)),  # claims `__class__` str (an int or float claim is unprintable here)
)
FIXED_LABEL_VALUES = sorted(
    {value for m in CATALOGUE for label in m.labels for value in allowed_fixed_values(m, label)}
)
LABELS = st.one_of(
    st.sampled_from(FIXED_LABEL_VALUES),
    TEXT,
    SPECIAL_TEXT,
    HUGE_TEXT,
    WITH_SURROGATE,
    st.integers(),
    st.booleans(),
    st.floats(),
    st.decimals(),
    st.just(Mode.NORMAL),
    JUNK,
)
AMOUNTS = st.one_of(
    st.integers(0, 10_000),
    st.floats(0, 1e4),
    st.integers(),
    st.floats(),
    st.decimals(),
    st.fractions(),
    st.booleans(),
    st.sampled_from([-0.0, -1, 2**53, 2**53 + 1, 10**400, float("nan"), float("inf"), Decimal("sNaN")]),
    st.text(max_size=4),
    JUNK,
)
FLAGS = st.one_of(st.booleans(), st.integers(), st.text(max_size=3), JUNK)
SPANS = st.one_of(
    st.none(),
    st.builds(
        SpanContext,
        trace_id=st.integers(0, 2**128 - 1),
        span_id=st.integers(0, 2**64 - 1),
        is_remote=st.booleans(),
        trace_flags=st.sampled_from([TraceFlags(TraceFlags.DEFAULT), TraceFlags(TraceFlags.SAMPLED)]),
    ),
    st.builds(  # the API takes any number for an id, and calls a float one valid
        SpanContext,
        trace_id=st.floats(1, 2**64),
        span_id=st.integers(1, 2**64 - 1),
        is_remote=st.booleans(),
        trace_flags=st.just(TraceFlags(TraceFlags.SAMPLED)),
    ),
    st.builds(Context),
    st.text(max_size=3),
    st.integers(),
    JUNK,
)


def is_amount(value: object) -> bool:
    """The documented rule: a finite real number from 0 to 2**53."""
    if value is None or isinstance(value, (str, bytes, bytearray)):
        return False
    if type(value) is int:
        return 0 <= value <= 2**53
    try:
        number = float(value)  # type: ignore[arg-type]
    except Exception:
        return False
    return 0 <= number <= 2**53


#: Labels that list `other` among their values (an unclassified LLM failure): there it is a
#: value of its own, recorded with no rejection.
DECLARING_OTHER = {(m.name, label.name) for m in CATALOGUE for label in m.labels if OVERFLOW_VALUE in label.values}


def surely_rejected(value: object, *, other_declared: bool = False) -> bool:
    """A label value ``other`` must replace whatever the label's allowed set."""
    if other_declared and type(value) is str and value == OVERFLOW_VALUE:
        return False
    if issubclass(type(value), str):  # not isinstance(): a `Mock(spec=str)` passes that
        text = str.__str__(value)
    elif type(value) is int:
        text = str(value) if value.bit_length() < 10_000 else "x" * (MAX_LABEL_LENGTH + 1)
    else:
        return True
    if len(text) > MAX_LABEL_LENGTH or text == OVERFLOW_VALUE:
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def succeeds(check: Callable[[], object]) -> bool:
    try:
        check()
    except Exception:  # the question is only whether it raised
        return False
    return True


# -- the recorders, by introspection ----------------------------------------------------
@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # label, amount, flag, enum, literal, span
    annotation: Any

    def strategy(self) -> st.SearchStrategy[Any]:
        if self.kind == "label":
            return LABELS
        if self.kind == "amount":
            return AMOUNTS
        if self.kind == "flag":
            return FLAGS
        if self.kind == "span":
            return SPANS
        good = list(self.annotation) if self.kind == "enum" else list(get_args(self.annotation))
        return st.one_of(st.sampled_from(good), AMOUNTS, LABELS)

    def valid(self, value: object) -> bool:
        """Whether a value of this (non-label) parameter is acceptable."""
        if self.kind == "amount":
            return is_amount(value)
        if self.kind == "flag":
            return succeeds(lambda: bool(value))
        if self.kind == "span":
            return value is None or isinstance(value, SpanContext)
        if self.kind == "enum":
            return succeeds(lambda: self.annotation(value))
        return succeeds(lambda: value in get_args(self.annotation)) and value in get_args(self.annotation)


@dataclass(frozen=True)
class Method:
    recorder: str
    name: str
    params: tuple[Param, ...]
    timer: bool

    def __repr__(self) -> str:
        return f"{self.recorder}.{self.name}"


def _kind(annotation: Any) -> str:
    if annotation is str:
        return "label"
    if annotation in (int, float):
        return "amount"
    if annotation is bool:
        return "flag"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "enum"
    if get_origin(annotation) is Literal:
        return "literal"
    if annotation == (SpanContext | None):
        return "span"
    raise AssertionError(f"no fuzz strategy for a parameter of type {annotation!r}: add one to this file")


#: Methods that take a value out of the scrape rather than record one: tested on their own
#: (tests/unit/test_backlog_gauges.py).
_FORGETTING = {("backlog", "unmeasured")}


def recorder_methods(telemetry: Telemetry) -> list[Method]:
    methods = []
    for attribute, recorder in vars(telemetry).items():
        if not isinstance(recorder, Recorder):
            continue
        for name, function in inspect.getmembers(type(recorder), inspect.isfunction):
            if name.startswith("_"):
                continue
            hints = get_type_hints(function)
            if hints.get("return") in (BoundOperation, BoundFailures, tuple[BoundOperation, ...]):  # binds handles
                continue
            if (attribute, name) in _FORGETTING:
                continue
            params = tuple(
                Param(p.name, _kind(hints[p.name]), hints[p.name])
                for p in inspect.signature(function).parameters.values()
                if p.name != "self"
            )
            methods.append(Method(attribute, name, params, hints.get("return") is Timer))
    return methods


def build(**env: str) -> Telemetry:
    return Telemetry(load_settings({**ENV, **env}), service="worker")


METHODS = recorder_methods(build())


def arguments_for(method: Method) -> st.SearchStrategy[tuple[dict[str, Any], bool]]:
    return st.tuples(
        st.fixed_dictionaries({param.name: param.strategy() for param in method.params}),
        st.booleans(),  # for a timer: whether the timed block raises
    )


def call(telemetry: Telemetry, method: Method, arguments: dict[str, Any], block_raises: bool) -> None:
    """Call the method as application code would; only a timed block's own exception may come out."""
    result = getattr(getattr(telemetry, method.recorder), method.name)(**arguments)
    if not method.timer:
        assert result is None
        return
    assert isinstance(result, Timer)
    if block_raises:
        with pytest.raises(BlockError), result:
            raise BlockError
    else:
        with result:
            pass


# -- reading the scrape ------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_both(telemetry: Telemetry) -> Samples:
    """Both formats must parse; the text format's samples are returned."""
    status, _, body = telemetry.scrape()
    assert status == 200
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in parse_text(body.decode())
        for sample in family.samples
    }
    status, _, body = telemetry.scrape(OPENMETRICS)
    assert status == 200
    list(parse_openmetrics(body.decode()))
    return samples


def metric_of(sample_name: str) -> str:
    for suffix in ("", "_bucket", "_count", "_sum"):
        base = sample_name.removesuffix(suffix) if suffix else sample_name
        try:
            return get(base).name
        except KeyError:
            continue
    raise AssertionError(f"sample {sample_name} is no catalogue metric")


@pytest.fixture(scope="module")
def baseline() -> Samples:
    return {key: value for key, value in scrape_both(build()).items() if key[0] != "target_info"}


def test_introspection_finds_every_recorder_and_its_methods():
    recorders = {method.recorder for method in METHODS}
    assert recorders >= {"traffic", "llm", "somabrain", "backlog", "budgets", "health", "tools"}
    assert len(METHODS) >= 30
    assert any(method.timer for method in METHODS)


def test_recorders_never_raise_count_bad_input_and_keep_the_exposition_valid(baseline, promtool):
    shared = build(CHATOBS_MAX_LABEL_VALUES="3")  # every call, a tiny cap: overflow all the time

    def one_call(method: Method, example: tuple[dict[str, Any], bool]) -> None:
        arguments, block_raises = example
        telemetry = build()
        try:
            call(telemetry, method, arguments, block_raises)
            call(shared, method, arguments, block_raises)
            after = {key: value for key, value in scrape_both(telemetry).items() if key[0] != "target_info"}
        finally:
            telemetry.shutdown()

        errors = sum(v for (name, _), v in after.items() if name == "chatobs_recording_errors_total")
        rejections = {
            (dict(labels)["metric"], dict(labels)["label"])
            for (name, labels), value in after.items()
            if name == "chatobs_label_rejections_total" and value > 0
        }
        changed = {
            key for key in after.keys() | baseline.keys() if not key[0].startswith(SELF_METRICS)
            and after.get(key) != baseline.get(key)
        }  # fmt: skip
        bad = [p.name for p in method.params if p.kind != "label" and not p.valid(arguments[p.name])]
        if bad:
            assert errors == 1, f"bad {bad}: one recording error expected, got {errors}"
            assert not changed, f"bad {bad}, yet recorded: {sorted(changed)}"
            return
        assert errors == 0, "a good call was counted as a recording error"
        assert changed, "a good call recorded nothing"
        others = {(metric_of(name), label) for name, labels in changed for label, v in labels if v == OVERFLOW_VALUE}
        assert others - DECLARING_OTHER <= rejections, "every `other` not declared must be a counted rejection"
        assert rejections <= others, "every rejection must be an `other`"
        declaring = {label for _, label in DECLARING_OTHER}
        labels = [(arguments[p.name], p.name in declaring) for p in method.params if p.kind == "label"]
        if any(surely_rejected(value, other_declared=declared) for value, declared in labels):
            assert rejections, f"an invalid label value among {labels!r} was not rejected"

    def fuzz(method: Method) -> Callable[[], None]:
        @settings(max_examples=EXAMPLES_PER_METHOD)
        @given(arguments_for(method))
        def examples(example: tuple[dict[str, Any], bool]) -> None:
            one_call(method, example)

        return examples

    for method in METHODS:  # each one, so none is left to chance
        fuzz(method)()

    # Everything the long-lived handle saw: still a catalogue-conformant, promtool-clean exposition.
    options = shared.settings.chatobs
    for accept, openmetrics in ((None, False), (OPENMETRICS, True)):
        text = shared.scrape(accept)[2].decode()
        problems = [p for family in check_exposition(text, openmetrics, options) for p in family.problems]
        assert problems == [], problems
    text = shared.scrape()[2].decode()
    assert "otel_metric_overflow" not in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    lint = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()}
    assert lint <= ACCEPTED_LINT, lint
    assert _sum(text, "chatobs_recording_errors_total") > 0 and _sum(text, "chatobs_label_rejections_total") > 0
    shared.shutdown()


def _sum(text: str, name: str) -> float:
    return sum(s.value for family in parse_text(text) for s in family.samples if s.name == name)


# -- the other public helpers ---------------------------------------------------------------
CODES = {"timeout", "connection", "rate_limited", "http_4xx", "http_5xx", OVERFLOW_VALUE}


@settings(max_examples=200)
@given(status=st.one_of(st.integers(), AMOUNTS, LABELS), timeout=FLAGS, connection=FLAGS)
def test_llm_error_code_always_answers_a_bounded_code(status, timeout, connection):
    assert llm_error_code(status, timeout=timeout, connection=connection) in CODES
    # And always one the `code` label declares: `other` too, the spec's unclassified failure.
    assert set(get("llm_errors_total").label("code").values) == CODES


def _traceparent() -> tuple[list[tuple[str, bytes]], int]:
    with TracerProvider().get_tracer("producer").start_as_current_span("send") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    headers = [(key, value.encode()) for key, value in carrier.items()]
    return headers, span.get_span_context().trace_id


HEADERS = st.one_of(
    st.lists(st.tuples(st.one_of(st.sampled_from(["traceparent", "baggage"]), TEXT), st.one_of(st.binary(), JUNK))),
    TEXT,
    st.integers(),
    JUNK,
)
RECORDS = st.one_of(
    st.builds(SimpleNamespace, headers=HEADERS, topic=LABELS, partition=LABELS, offset=LABELS),
    st.builds(SimpleNamespace, topic=LABELS),
    JUNK,
)


@settings(max_examples=150)
@given(record=RECORDS, with_parent=st.booleans(), block_raises=st.booleans())
def test_consumer_span_takes_any_record(record, with_parent, block_raises):
    telemetry = build()
    parent_trace_id = None
    if with_parent and isinstance(record, SimpleNamespace):
        record.headers, parent_trace_id = _traceparent()
    try:
        if block_raises:
            with pytest.raises(BlockError), telemetry.consumer_span(record):
                raise BlockError
            return
        with telemetry.consumer_span(record) as span:
            assert span.get_span_context().is_valid
            assert trace.get_current_span() is span
        if parent_trace_id is not None:
            assert span.get_span_context().trace_id == parent_trace_id
    finally:
        telemetry.shutdown()


# -- the setup path ------------------------------------------------------------------------------
def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four."""
    return st.integers(0, 3).flatmap(lambda draw: bad if draw == 3 else good)  # 0, the simplest, is good


TEXT_LIST = st.lists(st.one_of(TEXT, SPECIAL_TEXT.filter(lambda text: text != OVERFLOW_VALUE)), max_size=4)
NASTY_LIST = st.lists(st.one_of(TEXT, SPECIAL_TEXT, WITH_SURROGATE, HUGE_TEXT.map(lambda s: s[:300])), max_size=4)
KEY_VALUES = st.lists(st.tuples(TEXT, TEXT), max_size=4).map(lambda pairs: ",".join(f"{k}={v}" for k, v in pairs))
ODD_ATTRIBUTES = st.sampled_from(
    ["__name__=x", "service.name=a,service_name=b", "le=1,quantile=2,a.b=1,a_b=2", "%ZZ=%00", "1a=b", "k=", 'é=\n"']
)
BOOL_TEXT = st.sampled_from(["true", "false", "1", "0"])
# Each variable: (values that should be accepted, values that may not be).
SETUP_VARIABLES: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "OTEL_SERVICE_NAME": (st.one_of(TEXT, SPECIAL_TEXT), WITH_SURROGATE),
    "OTEL_RESOURCE_ATTRIBUTES": (st.one_of(KEY_VALUES, ODD_ATTRIBUTES), TEXT),
    # An empty OTEL_* value is unset; anything but `true` (any case) is false.
    "OTEL_SDK_DISABLED": (st.sampled_from(["false", "True", "true", "", "0", "yes", "maybe"]), st.nothing()),
    "OTEL_METRICS_EXPORTER": (
        st.sampled_from(["prometheus", "none", "", "Prometheus"]),
        st.sampled_from([",", "bogus", "prometheus,none"]),
    ),
    "CHATOBS_SERVICE": (st.sampled_from(SERVICES), TEXT),
    "CHATOBS_METRICS_PATH": (
        st.sampled_from(["/metrics", "/m", "/internal/metrics", "/a.b-c~d:e@f"]),
        st.one_of(TEXT, st.sampled_from(["/{x}", "/{x:bogus}", "/a b", "/a?b", "/a#b", "metrics"])),
    ),
    "CHATOBS_TENANTS": (TEXT_LIST.map(",".join), NASTY_LIST.map(",".join)),
    "CHATOBS_LLM_MODELS": (TEXT_LIST.map(",".join), NASTY_LIST.map(",".join)),
    "CHATOBS_LLM_PROVIDERS": (TEXT_LIST.map(",".join), NASTY_LIST.map(",".join)),
    "CHATOBS_TOOLS": (TEXT_LIST.map(",".join), NASTY_LIST.map(",".join)),
    "CHATOBS_MESSAGE_SOURCES": (TEXT_LIST.map(",".join), NASTY_LIST.map(",".join)),
    "CHATOBS_MAX_LABEL_VALUES": (st.integers(1, 10_000).map(str), st.one_of(st.integers().map(str), TEXT)),
    "CHATOBS_MAX_LABEL_LENGTH": (st.integers(300, 4096).map(str), st.one_of(st.integers().map(str), TEXT)),
    "CHATOBS_EXPOSE_TARGET_INFO": (BOOL_TEXT, TEXT),
    "CHATOBS_EXPOSE_SCOPE_LABELS": (BOOL_TEXT, TEXT),
    "CHATOBS_EXPOSE_UNCATALOGUED": (BOOL_TEXT, TEXT),
    "CHATOBS_PROCESS_METRICS": (BOOL_TEXT, TEXT),
}
GOOD_ENVS = st.fixed_dictionaries({}, optional={name: good for name, (good, _) in SETUP_VARIABLES.items()})
ANY_ENVS = st.tuples(
    st.fixed_dictionaries({}, optional={name: st.one_of(good, bad) for name, (good, bad) in SETUP_VARIABLES.items()}),
    st.dictionaries(TEXT.map(lambda name: f"CHATOBS_{name}"), TEXT, max_size=1),  # misspelt, or anything
).map(lambda pair: {**pair[1], **pair[0]})
ENVS = mostly(GOOD_ENVS, ANY_ENVS)


async def get_both(app: FastAPI, path: str) -> tuple[httpx.Response, httpx.Response]:
    """GET ``path`` from ``app`` over ASGI, as Prometheus would (text, then OpenMetrics)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        return await client.get(path), await client.get(path, headers={"Accept": OPENMETRICS})


@pytest.fixture
def isolated_setup() -> Iterator[None]:
    """``setup()`` as a fresh process sees it, without making anything process-wide."""
    with (
        mock.patch.object(telemetry_module.metrics, "set_meter_provider"),
        mock.patch.object(telemetry_module.trace, "set_tracer_provider"),
        mock.patch.object(telemetry_module.atexit, "register"),
    ):
        yield


def _record_configured_values(telemetry: Telemetry, settings_: Settings) -> None:
    """Record every configured label value, so odd ones reach the exposition."""
    options = settings_.chatobs
    for tenant in options.tenants:
        telemetry.budgets.token_overrun(tenant)
    for model in options.llm_models or ("m",):
        for provider in options.llm_providers or ("p",):
            telemetry.llm.request(model, provider)
    for tool in options.tools:
        telemetry.tools.call(tool, "success", seconds=0.1)
    for source in options.message_sources:
        telemetry.traffic.message_in("user", source)


def test_setup_accepts_any_environment_or_names_the_bad_variable(isolated_setup, promtool):
    outcomes: Counter[str] = Counter()

    @settings(max_examples=120)
    @given(env=ENVS, service=mostly(st.sampled_from(SERVICES), st.none()))
    def start(env: dict[str, str], service: str | None) -> None:
        app = FastAPI()
        with mock.patch.object(telemetry_module, "_current", None):
            try:
                telemetry = telemetry_module.setup(service=service, app=app, env=env, instrument=False)
            except ConfigError as error:
                outcomes["ConfigError"] += 1
                assert error.variables, "a ConfigError must name the variable"
                named = set(env) | {"CHATOBS_SERVICE"}  # CHATOBS_SERVICE: when neither it nor service= is set
                assert set(error.variables) <= named, f"{error.variables} are not variables of {sorted(env)}"
                return
        try:
            _record_configured_values(telemetry, telemetry.settings)
            path = telemetry.settings.chatobs.metrics_path
            text_response, om_response = asyncio.run(get_both(app, path))
            if telemetry.scrape_reader is None:  # Prometheus export off, or the SDK disabled
                outcomes["export off"] += 1
                assert text_response.status_code == om_response.status_code == 404
                return
            assert text_response.status_code == om_response.status_code == 200
            outcomes["served"] += 1
            families = list(parse_text(text_response.text))
            list(parse_openmetrics(om_response.text))
            assert "otel_metric_overflow" not in text_response.text
            result = subprocess.run(
                [promtool, "check", "metrics"], input=text_response.text, capture_output=True, text=True, timeout=60
            )
            lint = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()}
            # Resource attribute keys are the operator's choice, kept as the OpenTelemetry-Prometheus
            # rules give them (invalid characters to `_`, no case change): `promtool` may call one
            # camelCase, a style lint. Anything else, a parse error above all, is a failure.
            lint -= {"target_info label names should be written in 'snake_case' not 'camelCase'"}
            assert lint <= ACCEPTED_LINT, lint
            if telemetry.settings.chatobs.expose_target_info:
                assert any(family.name == "target_info" for family in families)
        finally:
            telemetry.shutdown()

    start()
    print(f"setup outcomes: {dict(outcomes)}")
    # Enough environments start for the exposition side to be fuzzed, not only the validation.
    assert outcomes["served"] >= 40 and outcomes["export off"] >= 1 and outcomes["ConfigError"] >= 10, outcomes


# -- what the fuzzing found, as plain regressions ------------------------------------------------------
def test_one_nan_or_negative_observation_no_longer_poisons_a_histogram():
    telemetry = build()
    for bad in (float("nan"), -1.5, float("inf"), None, "0.3"):
        telemetry.somabrain.context_build(bad)  # type: ignore[arg-type]
    telemetry.somabrain.context_build(0.25)
    telemetry.somabrain.context_build(Decimal("0.25"))  # type: ignore[arg-type]  # a number: converted
    text = telemetry.scrape()[2].decode()
    list(parse_openmetrics(telemetry.scrape(OPENMETRICS)[2].decode()))  # rejected a NaN or negative _sum
    assert "context_build_seconds_sum 0.5\n" in text
    assert "context_build_seconds_count 2\n" in text
    assert 'chatobs_recording_errors_total{metric="context_build_seconds"} 5' in text


def test_a_decimal_increment_no_longer_breaks_later_float_ones():
    telemetry = build()
    telemetry.llm.tokens("m", "p", prompt=Decimal("5"), completion=1)  # type: ignore[arg-type]
    telemetry.llm.tokens("m", "p", prompt=2.5, completion=1)  # type: ignore[arg-type]
    text = telemetry.scrape()[2].decode()
    assert 'llm_tokens_total{model="m",provider="p",direction="in"} 7.5' in text
    assert "chatobs_recording_errors_total{" not in text


def test_a_call_with_one_bad_number_records_nothing_of_it():
    telemetry = build()
    telemetry.llm.tokens("m", "p", prompt=10, completion=-1)
    telemetry.budgets.tokens("acme", allowed=100, used=float("nan"))
    text = telemetry.scrape()[2].decode()
    assert "llm_tokens_total{" not in text and "tenant_budget_tokens_allowed{" not in text
    assert 'chatobs_recording_errors_total{metric="llm_tokens_total"} 1' in text


def test_label_values_that_are_no_strings_are_other_not_their_repr():
    telemetry = build()
    telemetry.budgets.token_overrun(1)  # type: ignore[arg-type]  # an int id is a fine tenant: "1"
    telemetry.budgets.token_overrun(True)  # type: ignore[arg-type]  # equal to 1, but no tenant
    telemetry.budgets.token_overrun(None)  # type: ignore[arg-type]
    telemetry.budgets.token_overrun(["a"])  # type: ignore[arg-type]  # unhashable
    telemetry.budgets.token_overrun(Hostile())  # type: ignore[arg-type]
    telemetry.budgets.token_overrun(OVERFLOW_VALUE)
    telemetry.llm.request("m", "p", Mode.NORMAL)  # type: ignore[arg-type]
    text = telemetry.scrape()[2].decode()
    assert 'tenant_budget_tokens_overruns_total{tenant="1"} 1' in text
    assert 'tenant_budget_tokens_overruns_total{tenant="other"} 5' in text
    assert 'chatobs_label_rejections_total{metric="tenant_budget_tokens_overruns_total",label="tenant"} 5' in text
    assert 'llm_requests_total{model="m",provider="p",mode="normal"} 1' in text
    assert "chatobs_recording_errors_total{" not in text


def test_resource_attribute_keys_prometheus_reserves_or_forbids_are_renamed(promtool):
    telemetry = build(OTEL_RESOURCE_ATTRIBUTES="__name__=a,le=b,quantile=c,k8s:pod=d,1x=e")
    text = telemetry.scrape()[2].decode()
    [target] = [family for family in parse_text(text) if family.name == "target_info"]
    labels = target.samples[0].labels
    assert {labels[k] for k in ("key__name__", "key_le", "key_quantile", "k8s_pod", "_1x")} == set("abcde")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert {line for line in (result.stdout + result.stderr).splitlines() if line} <= ACCEPTED_LINT


@pytest.mark.parametrize("path", ["/{x:bogus}", "/{x}", "/a b", "/a?b"])
def test_a_metrics_path_that_is_no_plain_path_is_a_config_error(path):
    with pytest.raises(ConfigError) as error:
        load_settings({"CHATOBS_METRICS_PATH": path})
    assert error.value.variables == ("CHATOBS_METRICS_PATH",)


def test_the_shortest_allowed_label_length_fits_every_catalogue_value():
    shortest = ChatobsSettings.model_fields["max_label_length"].metadata[0].ge
    assert max(len(value) for value in FIXED_LABEL_VALUES) <= shortest
    with pytest.raises(ConfigError) as error:
        load_settings({"CHATOBS_MAX_LABEL_LENGTH": "80", "CHATOBS_TENANTS": "acme," + "x" * 81})
    assert error.value.variables == ("CHATOBS_TENANTS",)


def test_an_unclassified_llm_failure_is_a_code_of_its_own_and_no_rejection():
    telemetry = build()
    try:
        telemetry.llm.error("openai", "other")
        telemetry.llm.error("openai", "exploded")  # not a code: `other` too, and one rejection
        status, _, body = telemetry.scrape()
    finally:
        telemetry.shutdown()
    assert status == 200
    text = body.decode()
    assert 'llm_errors_total{provider="openai",code="other"} 2' in text, text
    assert 'chatobs_label_rejections_total{metric="llm_errors_total",label="code"} 1' in text, text


def test_a_value_that_only_claims_to_be_a_string_or_an_int_is_other_and_every_scrape_renders():
    # A `Mock(spec=str)` says its `__class__` is str; stored, it was rendered (uncapped, or
    # raising) at every scrape from then on.
    telemetry = build()
    raising = mock.MagicMock(spec=str)
    raising.__str__.side_effect = RuntimeError("boom")
    long = mock.MagicMock(spec=str)
    long.__str__.return_value = "x" * 1000
    for claims in (raising, long, mock.MagicMock(spec=int)):
        telemetry.llm.request(claims, "p")
    text = telemetry.scrape()[2].decode()
    assert 'llm_requests_total{model="other",provider="p",mode="normal"} 3' in text
    assert 'chatobs_label_rejections_total{metric="llm_requests_total",label="model"} 3' in text
    list(parse_openmetrics(telemetry.scrape(OPENMETRICS)[2].decode()))


def test_an_exemplar_whose_ids_are_no_ints_is_left_out_and_the_openmetrics_scrape_renders():
    # The API takes a float id and calls its span valid: `{:032x}` of it failed every such scrape.
    telemetry = build()
    odd = SpanContext(trace_id=1.5, span_id=1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))  # type: ignore[arg-type]
    telemetry.backlog.wal_consumed(0.3, span=odd)
    body = telemetry.scrape(OPENMETRICS)[2]
    [family] = [f for f in parse_openmetrics(body.decode()) if f.name == "wal_consume_seconds"]
    assert [s.value for s in family.samples if s.name == "wal_consume_seconds_count"] == [1]
    assert all(s.exemplar is None for s in family.samples)


class AmbiguousFlag:
    """A flag whose truth test raises (a numpy array of two values, say)."""

    def __bool__(self) -> bool:
        raise ValueError("ambiguous truth value")


def test_a_bound_handle_given_a_flag_whose_truth_test_raises_records_nothing_and_raises_nothing():
    telemetry = build()
    telemetry.clients.bound("kafka", "consume").record(0.1, AmbiguousFlag())  # type: ignore[arg-type]
    telemetry.clients.bound_failures("kafka", "commit").record(0.1, AmbiguousFlag())  # type: ignore[arg-type]
    text = telemetry.scrape()[2].decode()
    assert 'kafka_operation_seconds_count{operation="consume"} 0\n' in text  # bound, so shown, at 0
    assert 'kafka_errors_total{operation="consume"} 0\n' in text
    assert 'kafka_errors_total{operation="commit"} 0' in text
    assert 'chatobs_recording_errors_total{metric="kafka_operation_seconds"} 1' in text
    assert 'chatobs_recording_errors_total{metric="kafka_errors_total"} 1' in text
