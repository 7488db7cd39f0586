from __future__ import annotations

import pytest

from chatobs import Telemetry
from chatobs.settings import ConfigError, load_settings
from chatpipe.settings import PipelineSettings, load_pipeline_settings


def test_defaults_need_no_environment():
    settings = load_settings({})
    assert settings.otel.metrics_exporter == ("prometheus",)
    assert settings.otel.traces_exporter == ()
    assert settings.chatobs.metrics_path == "/metrics"
    assert settings.chatobs.expose_scope_labels is False


def test_values_are_parsed():
    settings = load_settings(
        {
            "OTEL_METRICS_EXPORTER": "prometheus, otlp",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=chat%20ops",
            "CHATOBS_LLM_MODELS": "gpt-4o, sim-large",
            "CHATOBS_METRICS_PORT": "9464",
        }
    )
    assert settings.otel.metrics_exporter == ("prometheus", "otlp")
    assert settings.otel.resource_attribute_map == {"deployment.environment": "prod", "team": "chat ops"}
    assert settings.chatobs.llm_models == ("gpt-4o", "sim-large")
    assert settings.chatobs.metrics_port == 9464


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CHATOBS_METRICS_PORT": "abc"}, "CHATOBS_METRICS_PORT"),
        ({"CHATOBS_METRICS_PORT": "70000"}, "CHATOBS_METRICS_PORT"),
        ({"CHATOBS_MAX_LABEL_VALUES": "0"}, "CHATOBS_MAX_LABEL_VALUES"),
        ({"CHATOBS_METRICS_PATH": "metrics"}, "CHATOBS_METRICS_PATH"),
        ({"CHATOBS_TENANTS": "acme,other"}, "CHATOBS_TENANTS"),
        ({"CHATOBS_EXPOSE_TARGET_INFO": "perhaps"}, "CHATOBS_EXPOSE_TARGET_INFO"),
        ({"OTEL_METRICS_EXPORTER": "prometheus,carrier-pigeon"}, "OTEL_METRICS_EXPORTER"),
        ({"OTEL_METRICS_EXPORTER": "none,otlp"}, "OTEL_METRICS_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "abc"}, "OTEL_METRIC_EXPORT_INTERVAL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "no-equals-sign"}, "OTEL_RESOURCE_ATTRIBUTES"),
        ({"OTEL_METRICS_EXEMPLAR_FILTER": "sometimes"}, "OTEL_METRICS_EXEMPLAR_FILTER"),
        ({"CHATOBS_METRICS_HOST": "metrics host"}, "CHATOBS_METRICS_HOST"),
        ({"CHATOBS_DATA_DIR": "/nonexistent/chatobs"}, "CHATOBS_DATA_DIR"),
        ({"CHATOBS_HEALTH_PATHS": "/health,ready"}, "CHATOBS_HEALTH_PATHS"),  # never matches a request path
        ({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "redis,aiokafak"}, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"),
        # Read as Path("."), these turned multiprocess mode on in the working directory.
        ({"CHATOBS_MULTIPROCESS_DIR": ""}, "CHATOBS_MULTIPROCESS_DIR"),
        ({"CHATOBS_DATA_DIR": " "}, "CHATOBS_DATA_DIR"),
        # Accepted, these killed the push thread (a wait past time_t) or raised OverflowError unnamed.
        ({"OTEL_METRIC_EXPORT_INTERVAL": "9999999999999"}, "OTEL_METRIC_EXPORT_INTERVAL"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "99999999999999999999"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "9999999999999999999"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
        ({"CHATOBS_SHUTDOWN_TIMEOUT_SECONDS": "nan"}, "CHATOBS_SHUTDOWN_TIMEOUT_SECONDS"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(env, variable):
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.variables == (variable,)
    assert str(caught.value).startswith(variable)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHATPIPE_TOOL_TIMEOUT_SECONDS", "inf"),  # a Redis BLPOP timeout of inf on every tool call
        ("CHATPIPE_BREAKER_RESET_SECONDS", "inf"),  # a breaker that never closes again
        ("CHATPIPE_ANSWERED_TTL_SECONDS", "99999999999999999999"),  # an expiry Redis refuses, every message
        ("CHATPIPE_BUDGET_WINDOW_SECONDS", "99999999999999999999"),
        ("CHATPIPE_ATTACHMENT_DIR", ""),  # uploads into the working directory
    ],
)
def test_a_pipeline_value_that_would_fail_at_run_time_is_refused_at_start(variable, value):
    with pytest.raises(ConfigError) as caught:
        load_pipeline_settings({variable: value})
    assert caught.value.variables == (variable,)


def test_a_malformed_url_is_echoed_without_its_password():
    from chatpipe.settings import load_backend_settings

    with pytest.raises(ConfigError) as caught:
        load_backend_settings(
            {"DATABASE_URL": "postgress://app:S3cretPW@db/chat", "REDIS_URL": "redis://h:6379/0",
             "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}
        )  # fmt: skip
    assert caught.value.variables == ("DATABASE_URL",)
    assert "S3cretPW" not in str(caught.value)
    assert "DATABASE_URL='postgress://app:<hidden>@db/chat'" in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "postgresql://app:Zq8/Xk7@db:5432/chat"),
        ("REDIS_URL", "redis://:Zq8/Xk7@h:6379/0"),
        ("REDIS_URL", "redis://user:Zq8#Xk7@h:6379/0"),
        ("DATABASE_URL", "postgresql://app:Zq8?Xk7@db/chat"),
        ("DATABASE_URL", "postgresql://us/er:Zq8Xk7@db:5432/chat"),  # the user's `/`: the echo hid nothing
        ("DATABASE_URL", "postgresql://app:Zq8?a=Xk7@db/chat"),  # `?` then `=`: read as a query value's `@`
        ("REDIS_URL", "redis://:Zq8#a=Xk7@h:6379/0"),
        ("REDIS_URL", "redis://u:1234#a=Xk7@h:6379/0"),  # a password's digits read as a port
        ("DATABASE_URL", "postgresql://app:1234?a=Xk7@db/chat"),
    ],
)
def test_a_password_that_needs_percent_encoding_is_refused_without_showing_any_of_it(variable, value):
    # Its clients read the password's start as a port; the message must not quote that either.
    from chatpipe.settings import load_backend_settings

    with pytest.raises(ConfigError, match="percent-encode") as caught:
        load_backend_settings({**_BACKENDS, variable: value})
    assert caught.value.variables == (variable,)
    assert not any(part in str(caught.value) for part in ("Zq8", "Xk7", "1234")), str(caught.value)


_BACKENDS = {"REDIS_URL": "redis://h:6379/0", "DATABASE_URL": "postgresql://app@db/chat",
             "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}  # fmt: skip


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("REDIS_URL", "redis://", "names no host"),  # `redis://${HOST}`: redis-py would take localhost
        ("REDIS_URL", "redis://h:99999/0", "port of 'h:99999' must be 1-65535"),  # redis-py: at the first command
        ("REDIS_URL", "redis://h:0/0", "must be 1-65535"),  # parses everywhere, connects nowhere
        ("REDIS_URL", "redis://h:6379/x", "database must be a number"),  # redis-py: quietly database 0
        ("REDIS_URL", "redis://h:6379/0/1", "database must be a number"),  # redis-py: quietly database 1
        ("REDIS_URL", "http://h:6379", "must start with redis://"),
        ("DATABASE_URL", "postgresql://app@db:99999/chat", "must be 1-65535"),
        ("DATABASE_URL", "postgresql://app@a:5432,b:x/chat", "port of 'b:x' must be 1-65535"),
        ("DATABASE_URL", "postgresql://app@a,/chat", "empty host"),  # asyncpg: IndexError at connect
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka:0", "must be 1-65535"),
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka", "has no port"),
        ("KAFKA_BOOTSTRAP_SERVERS", "a:9092,,b:9092", "empty member"),
        ("KAFKA_BOOTSTRAP_SERVERS", ":9092", "has no host"),
    ],
)
def test_a_backend_address_its_client_would_misread_or_fail_on_is_refused_at_start(variable, value, problem):
    from chatpipe.settings import load_backend_settings

    with pytest.raises(ConfigError, match=problem) as caught:
        load_backend_settings({**_BACKENDS, variable: value})
    assert caught.value.variables == (variable,)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "rediss://user:pw@[::1]:6380/2"),
        ("REDIS_URL", "redis://h"),
        ("DATABASE_URL", "postgres:///chat?host=/var/run/postgresql"),  # the local socket
        ("DATABASE_URL", "postgresql://app:pw@a:5432,[::1]:5433/chat"),  # libpq's several hosts
        ("KAFKA_BOOTSTRAP_SERVERS", "a:9092, [::1]:9093"),  # aiokafka strips each member
        ("DATABASE_URL", "postgresql://app:pw@db:/chat"),  # asyncpg: the default port
        ("REDIS_URL", "redis://h:6379/0/"),  # redis-py: database 0
        ("DATABASE_URL", "postgresql://db:5432/chat?user=a@b"),  # an `@` in a query value
        ("DATABASE_URL", "postgresql:///chat?host=/run/pg&user=a@b"),
        ("REDIS_URL", "redis://h:6379/0?client_name=a@b"),
        ("REDIS_URL", "redis://[::1]/0?client_name=a@b"),
        ("DATABASE_URL", "postgresql://db:/chat?user=a@b"),
    ],
)
def test_a_backend_address_its_client_reads_is_accepted(variable, value):
    from chatpipe.settings import load_backend_settings

    assert getattr(load_backend_settings({**_BACKENDS, variable: value}), variable.lower()) == value


@pytest.mark.parametrize(
    ("load", "variable", "value"),
    [
        ("pipeline", "CHATPIPE_GATEWAY_HOST", "local host"),  # uvicorn: at bind, in its own words
        ("pipeline", "CHATPIPE_TOOL_TOPIC", "chat tools"),  # the broker refuses every send
        ("pipeline", "CHATPIPE_TOOL_TOPIC", ".."),
        ("chatobs", "CHATOBS_WAL_TOPIC", "chat/wal"),
        ("chatobs", "OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme%0Ax-evil=1"),  # every export refused
        ("chatobs", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "bad name=1"),
    ],
)
def test_a_name_the_server_or_exporter_would_refuse_later_is_refused_at_start(load, variable, value):
    with pytest.raises(ConfigError) as caught:
        (load_pipeline_settings if load == "pipeline" else load_settings)({variable: value})
    assert caught.value.variables == (variable,)


def test_a_gateway_host_in_brackets_is_the_address_and_a_header_tab_is_allowed():
    assert load_pipeline_settings({"CHATPIPE_GATEWAY_HOST": "[::]"}).gateway_host == "::"
    settings = load_settings({"OTEL_EXPORTER_OTLP_HEADERS": "x-note=a%09b"})
    assert settings.otel.otlp_headers == {"x-note": "a\tb"}


def test_a_scrape_path_that_is_a_probe_path_is_refused():
    # Served there, the scrape would replace the gateway's health check.
    with pytest.raises(ConfigError) as caught:
        load_settings({"CHATOBS_METRICS_PATH": "/health"})
    assert caught.value.variables == ("CHATOBS_METRICS_PATH", "CHATOBS_HEALTH_PATHS")


def test_a_misspelt_variable_is_reported_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"CHATOBS_METRIC_PORT: unknown variable \(did you mean CHATOBS_METRICS_PORT\?\)"
    ):
        load_settings({"CHATOBS_METRIC_PORT": "9464"})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load_settings({"CHATOBS_METRICS_PORT": "abc", "OTEL_METRICS_EXPORTER": "bogus"})
    assert set(caught.value.variables) == {"CHATOBS_METRICS_PORT", "OTEL_METRICS_EXPORTER"}


def test_disabled_instrumentations_of_other_distributions_are_accepted():
    # With `opentelemetry-instrument`, the variable also names other packages' instrumentations.
    names = load_settings({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "requests,sqlalchemy,redis"})
    assert names.otel.python_disabled_instrumentations == ("requests", "sqlalchemy", "redis")


def test_a_malformed_otlp_header_value_is_never_shown():
    # Header values are usually credentials; the member at fault is one too.
    with pytest.raises(ConfigError) as caught:
        load_settings({"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret,=t0ken"})
    assert caught.value.variables == ("OTEL_EXPORTER_OTLP_HEADERS",)
    assert "s3cret" not in str(caught.value) and "t0ken" not in str(caught.value)


def test_a_bracketed_ipv6_metrics_host_is_the_address():
    assert load_settings({"CHATOBS_METRICS_HOST": "[::1]"}).chatobs.metrics_host == "::1"


def test_a_metrics_host_not_of_this_machine_is_an_error_naming_the_host():
    from chatobs import Telemetry

    telemetry = Telemetry(load_settings({"CHATOBS_METRICS_HOST": "192.0.2.1", "CHATOBS_METRICS_PORT": "0"}),
                          service="worker")  # fmt: skip  # 192.0.2.1: TEST-NET-1, on no machine
    with pytest.raises(ConfigError) as caught:
        telemetry.serve()
    assert caught.value.variables == ("CHATOBS_METRICS_HOST",)
    telemetry.shutdown()


def test_an_empty_otel_variable_is_unset_as_the_specification_says():
    # Compose files write `VAR: ${X:-}`: an empty value must keep the default, not change it.
    blank = {name: value for name, value in (
        ("OTEL_METRICS_EXPORTER", ""), ("OTEL_SDK_DISABLED", ""), ("OTEL_EXPORTER_OTLP_ENDPOINT", " "),
        ("OTEL_TRACES_SAMPLER", ""), ("OTEL_METRIC_EXPORT_INTERVAL", ""), ("OTEL_EXPORTER_OTLP_PROTOCOL", ""),
    )}  # fmt: skip
    settings = load_settings(blank)
    assert settings.otel.metrics_exporter == ("prometheus",), "an empty value turned /metrics off"
    assert settings.otel.sdk_disabled is False
    assert settings.otel.exporter_otlp_endpoint is None
    assert settings.otel.traces_sampler == "parentbased_always_on"
    telemetry = Telemetry(settings, service="worker")
    try:
        assert telemetry.scrape()[0] == 200
    finally:
        telemetry.shutdown()


def test_an_exporter_list_of_nothing_but_commas_is_an_error():
    with pytest.raises(ConfigError, match=r"OTEL_METRICS_EXPORTER.*names no exporter") as raised:
        load_settings({"OTEL_METRICS_EXPORTER": " , "})
    assert raised.value.variables == ("OTEL_METRICS_EXPORTER",)


@pytest.mark.parametrize("value", ["1", "yes", "on", "enabled", "0", "maybe"])
def test_only_true_disables_the_sdk_and_anything_else_is_false_with_a_warning(value, caplog):
    # pydantic would take `1` or `yes` for true; the specification allows no true value but
    # `true`, and reads anything else as false (a warning unless it is `false`).
    assert load_settings({"OTEL_SDK_DISABLED": value}).otel.sdk_disabled is False
    assert f"OTEL_SDK_DISABLED={value!r} is not true or false" in caplog.text
    caplog.clear()
    assert load_settings({"OTEL_SDK_DISABLED": "TRUE"}).otel.sdk_disabled is True
    assert load_settings({"OTEL_SDK_DISABLED": "False"}).otel.sdk_disabled is False
    assert "OTEL_SDK_DISABLED" not in caplog.text


def test_enum_values_are_case_insensitive():
    otel = load_settings({"OTEL_TRACES_SAMPLER": "ALWAYS_ON", "OTEL_EXPORTER_OTLP_PROTOCOL": "GRPC",
                          "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "HTTP/Protobuf",
                          "OTEL_METRICS_EXEMPLAR_FILTER": "Trace_Based"}).otel  # fmt: skip
    assert (otel.traces_sampler, otel.exporter_otlp_protocol) == ("always_on", "grpc")
    assert (otel.exporter_otlp_traces_protocol, otel.metrics_exemplar_filter) == ("http/protobuf", "trace_based")


def test_a_pipeline_mapping_is_the_whole_truth(monkeypatch):
    # Validated from a mapping, a plain BaseSettings model still filled missing fields from os.environ.
    monkeypatch.setenv("CHATPIPE_LLM_MODEL", "from-the-shell")
    assert load_pipeline_settings({}).llm_model != "from-the-shell"
    assert load_pipeline_settings({"CHATPIPE_LLM_MODEL": "given"}).llm_model == "given"


@pytest.mark.parametrize(
    ("budgets", "problem"),
    [
        ("acme=\u00b2", "must be a whole number"),  # `isdigit` takes it, `int` does not: every message failed
        ("acme=1\u0663", "must be a whole number"),  # an Arabic-Indic digit
        ("acme=100,acme=5", "'acme' given more than one allowance"),
    ],
)
def test_a_tenant_allowance_is_ascii_digits_given_once(budgets, problem):
    with pytest.raises(ConfigError, match=problem) as raised:
        load_pipeline_settings({"CHATPIPE_TENANT_TOKEN_BUDGETS": budgets})
    assert raised.value.variables == ("CHATPIPE_TENANT_TOKEN_BUDGETS",)
    assert load_pipeline_settings({"CHATPIPE_TENANT_TOKEN_BUDGETS": "acme=100,beta=5"}).token_allowance("beta") == 5


def test_pipeline_settings_are_their_own_class():
    settings = load_pipeline_settings({})
    assert type(settings) is PipelineSettings
    assert settings == load_pipeline_settings({})


@pytest.mark.parametrize(("prefix", "group"), [("", "worker"), ("staging.", "staging.worker")])
def test_a_consumer_group_is_its_role_after_the_prefix(prefix, group):
    assert load_pipeline_settings({"CHATPIPE_CONSUMER_GROUP_PREFIX": prefix}).consumer_group("worker") == group


def test_a_consumer_group_prefix_outside_kafkas_characters_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError, match="CHATPIPE_CONSUMER_GROUP_PREFIX"):
        load_pipeline_settings({"CHATPIPE_CONSUMER_GROUP_PREFIX": "a b"})


def test_attachment_types_are_compared_in_lower_case_as_media_types_are_case_insensitive():
    from chatpipe.settings import load_pipeline_settings

    settings = load_pipeline_settings({"CHATPIPE_ATTACHMENT_TYPES": "Text/Plain, image/PNG"})
    assert settings.attachment_types == ("text/plain", "image/png")
