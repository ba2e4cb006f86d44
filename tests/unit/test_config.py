from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from audience.auth import generate_api_key, hash_api_key
from audience.config import Address, CommonConfig, ConfigError, Env, redact_url
from services.export.config import ExportConfig
from services.profile.config import ProfileConfig
from services.segment_engine.config import SegmentEngineConfig


def test_defaults_when_nothing_is_set() -> None:
    config = CommonConfig.from_env({})

    assert config.listen == Address("127.0.0.1", 50051)
    assert str(config.listen) == "127.0.0.1:50051"
    assert config.postgres_dsn is None
    assert config.redis_url is None
    assert config.redis_namespace == "audience"
    assert config.bus_partitions == 8
    assert config.data_dir == Path("data")
    assert config.max_message_bytes == 8 * 1024 * 1024
    assert config.shutdown_grace == timedelta(seconds=10)
    assert config.keepalive.permit_without_calls is True
    assert config.otel == "off"
    assert config.otel_endpoint is None
    assert config.log_level == "info"
    assert config.log_format == "text"


def test_values_are_read_from_the_environment() -> None:
    config = CommonConfig.from_env(
        {
            "AUDIENCE_LISTEN": "[::]:0",
            "AUDIENCE_POSTGRES_DSN": "postgresql://postgres@127.0.0.1:5432/audience",
            "AUDIENCE_REDIS_URL": "redis://127.0.0.1:6379/0",
            "AUDIENCE_REDIS_NAMESPACE": "staging:audience",
            "AUDIENCE_BUS_PARTITIONS": "64",
            "AUDIENCE_SHUTDOWN_GRACE": "30s",
            "AUDIENCE_KEEPALIVE_PERMIT_WITHOUT_CALLS": "no",
            "AUDIENCE_OTEL": "OTLP",
            "AUDIENCE_OTEL_ENDPOINT": "http://collector:4317",
            "AUDIENCE_LOG_FORMAT": "json",
        }
    )

    assert config.listen == Address("::", 0)
    assert str(config.listen) == "[::]:0"
    assert config.require_postgres_dsn() == "postgresql://postgres@127.0.0.1:5432/audience"
    assert config.require_redis_url() == "redis://127.0.0.1:6379/0"
    assert config.redis_namespace == "staging:audience"
    assert config.bus_partitions == 64
    assert config.shutdown_grace == timedelta(seconds=30)
    assert config.keepalive.permit_without_calls is False
    assert config.otel == "otlp"
    assert config.otel_endpoint == "http://collector:4317"
    assert config.log_format == "json"


def test_an_empty_variable_counts_as_unset() -> None:
    config = CommonConfig.from_env({"AUDIENCE_BUS_PARTITIONS": "", "AUDIENCE_POSTGRES_DSN": " "})

    assert config.bus_partitions == 8
    assert config.postgres_dsn is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "AUDIENCE_BUS_PARTITIONS",
            "abc",
            "AUDIENCE_BUS_PARTITIONS: expected an integer from 1 to 1024, got 'abc'",
        ),
        (
            "AUDIENCE_BUS_PARTITIONS",
            "0",
            "AUDIENCE_BUS_PARTITIONS: expected an integer from 1 to 1024, got '0'",
        ),
        ("AUDIENCE_LISTEN", "localhost", "AUDIENCE_LISTEN: expected host:port"),
        ("AUDIENCE_LISTEN", "localhost:99999", "AUDIENCE_LISTEN: expected host:port"),
        ("AUDIENCE_LISTEN", "::1:50051", "AUDIENCE_LISTEN: expected host:port"),
        ("AUDIENCE_SHUTDOWN_GRACE", "soon", "AUDIENCE_SHUTDOWN_GRACE: expected a duration"),
        ("AUDIENCE_SHUTDOWN_GRACE", "2d", "AUDIENCE_SHUTDOWN_GRACE: expected a duration"),
        ("AUDIENCE_OTEL", "jaeger", "AUDIENCE_OTEL: expected one of off, console, otlp"),
        (
            "AUDIENCE_KEEPALIVE_PERMIT_WITHOUT_CALLS",
            "maybe",
            "AUDIENCE_KEEPALIVE_PERMIT_WITHOUT_CALLS: expected a boolean",
        ),
        ("AUDIENCE_REDIS_NAMESPACE", "has space", "AUDIENCE_REDIS_NAMESPACE: expected letters"),
        ("AUDIENCE_MAX_MESSAGE_BYTES", "10", "AUDIENCE_MAX_MESSAGE_BYTES: expected an integer"),
        ("AUDIENCE_REDIS_URL", "http://cache", "AUDIENCE_REDIS_URL: expected a URL starting"),
    ],
)
def test_a_bad_value_fails_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CommonConfig.from_env({name: value})

    assert str(caught.value).startswith(message)
    assert repr(value) in str(caught.value)


def test_a_bad_url_is_reported_without_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        CommonConfig.from_env({"AUDIENCE_POSTGRES_DSN": "mysql://admin:hunter2@db/audience"})

    assert "hunter2" not in str(caught.value)
    assert "mysql://admin:***@db/audience" in str(caught.value)


def test_a_service_run_alone_needs_postgres_and_redis() -> None:
    config = CommonConfig.from_env({})

    with pytest.raises(ConfigError, match=r"^AUDIENCE_POSTGRES_DSN: required"):
        config.require_postgres_dsn()
    with pytest.raises(ConfigError, match=r"^AUDIENCE_REDIS_URL: required"):
        config.require_redis_url()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1.5", timedelta(seconds=1.5)),
        ("45", timedelta(seconds=45)),
        ("0.5m", timedelta(seconds=30)),
        ("0", timedelta(0)),
    ],
)
def test_durations_accept_units_and_plain_seconds(value: str, expected: timedelta) -> None:
    assert Env({"AUDIENCE_X": value}).duration("AUDIENCE_X", timedelta(seconds=1)) == expected


@pytest.mark.parametrize("value", ["-1s", "5 minutes", "1w", "s", "1.2.3", "1e3"])
def test_malformed_durations_are_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^AUDIENCE_X: expected a duration"):
        Env({"AUDIENCE_X": value}).duration("AUDIENCE_X", timedelta(seconds=1))


def test_typed_reads_and_their_bounds() -> None:
    env = Env(
        {
            "AUDIENCE_RATIO": "0.25",
            "AUDIENCE_FLAG": "ON",
            "AUDIENCE_SECRET": "s3cret",
        }
    )

    assert env.number("AUDIENCE_RATIO", 1.0, minimum=0.0, maximum=1.0) == 0.25
    assert env.boolean("AUDIENCE_FLAG", False) is True
    assert env.required("AUDIENCE_SECRET", "an API key") == "s3cret"
    assert env.optional_string("AUDIENCE_UNSET") is None
    assert env.integer("AUDIENCE_UNSET", 7) == 7
    with pytest.raises(ConfigError, match=r"^AUDIENCE_RATIO: expected a number of at most 0.1"):
        env.number("AUDIENCE_RATIO", 0.0, maximum=0.1)
    with pytest.raises(ConfigError, match=r"^AUDIENCE_TOKEN: required but not set"):
        env.required("AUDIENCE_TOKEN", "an API key")


def test_only_audience_variables_are_read() -> None:
    with pytest.raises(ValueError, match="AUDIENCE_"):
        Env({"HOME": "/root"}).string("HOME", "")


def test_passwords_are_redacted() -> None:
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("postgresql://h/db?password=pw") == "postgresql://h/db?password=***"
    assert redact_url("redis://h:6379") == "redis://h:6379"


def _check(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    return subprocess.run(
        [sys.executable, "-m", "audience.config", "--check"],
        env={**clean, **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_command_exits_with_one_line_naming_the_bad_variable() -> None:
    result = _check({"AUDIENCE_BUS_PARTITIONS": "abc"})

    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "configuration error: AUDIENCE_BUS_PARTITIONS: expected an integer from 1 to 1024, "
        "got 'abc'"
    ]


def test_check_command_prints_the_effective_config_without_secrets() -> None:
    internal = generate_api_key()
    keys = [
        {
            "name": "internal",
            "sha256": hash_api_key(internal),
            "datasets": ["*"],
            "scopes": ["read", "write"],
        }
    ]
    result = _check(
        {
            "AUDIENCE_POSTGRES_DSN": "postgresql://app:hunter2@db/audience",
            "AUDIENCE_API_KEYS": json.dumps(keys),
            "AUDIENCE_INTERNAL_API_KEY": internal,
        }
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "bus_partitions = 8" in lines
    assert "postgres_dsn = postgresql://app:***@db/audience" in lines
    assert "auth = enabled; keys: internal (datasets *; scopes read,write)" in lines
    assert "internal_api_key = set" in lines
    assert "hunter2" not in result.stdout
    assert internal not in result.stdout
    assert hash_api_key(internal) not in result.stdout


def test_check_command_refuses_a_service_without_keys() -> None:
    result = _check({})

    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: AUDIENCE_API_KEYS: required")


def test_peer_addresses_default_to_the_process_own_listen_address() -> None:
    # `audience up` hosts every service on one address, so a peer is wherever this process
    # listens; a wildcard listen address is reached on the loopback.
    for listen, expected in (
        ("127.0.0.1:6001", "127.0.0.1:6001"),
        ("0.0.0.0:6002", "127.0.0.1:6002"),
        ("[::]:6003", "127.0.0.1:6003"),
        ("[::1]:6004", "[::1]:6004"),
        ("localhost:6005", "localhost:6005"),
    ):
        environ = {"AUDIENCE_LISTEN": listen}
        assert str(SegmentEngineConfig.from_env(environ).profile_address) == expected
        export = ExportConfig.from_env(environ)
        assert str(export.profile) == str(export.segment_engine) == expected
        assert str(ProfileConfig.from_env(environ).segment_engine) == expected

    named = {
        "AUDIENCE_LISTEN": "0.0.0.0:50051",
        "AUDIENCE_PROFILE_ADDRESS": "profile:50051",
        "AUDIENCE_SEGMENT_ENGINE_ADDRESS": "segment-engine:50051",
    }
    assert str(SegmentEngineConfig.from_env(named).profile_address) == "profile:50051"
    export = ExportConfig.from_env(named)
    assert (str(export.profile), str(export.segment_engine)) == (
        "profile:50051",
        "segment-engine:50051",
    )
    assert str(ProfileConfig.from_env(named).segment_engine) == "segment-engine:50051"


def test_the_profile_cache_is_sized_in_memory_and_the_old_count_is_refused() -> None:
    assert ProfileConfig.from_env({}).cache_bytes == 128 << 20
    assert ProfileConfig.from_env({"AUDIENCE_PROFILE_CACHE_MB": "512"}).cache_bytes == 512 << 20
    with pytest.raises(ConfigError, match="AUDIENCE_PROFILE_CACHE_SIZE: replaced by"):
        ProfileConfig.from_env({"AUDIENCE_PROFILE_CACHE_SIZE": "5000"})


def test_the_segment_engine_state_cache_is_sized_in_memory() -> None:
    assert SegmentEngineConfig.from_env({}).state_cache_bytes == 64 << 20
    off = {"AUDIENCE_SEGMENT_ENGINE_STATE_CACHE_MB": "0"}
    assert SegmentEngineConfig.from_env(off).state_cache_bytes == 0
    with pytest.raises(ConfigError, match="AUDIENCE_SEGMENT_ENGINE_STATE_CACHE_MB"):
        SegmentEngineConfig.from_env({"AUDIENCE_SEGMENT_ENGINE_STATE_CACHE_MB": "-1"})
