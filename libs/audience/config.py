"""Configuration read once at start from ``AUDIENCE_*`` environment variables.

Every service builds one frozen config from the environment and fails fast, naming the
variable, when a value is wrong. :class:`CommonConfig` holds what every process needs; a
service embeds it in its own frozen dataclass and reads its own variables with the same
:class:`Env` reader::

    @dataclass(frozen=True)
    class IngestConfig:
        common: CommonConfig
        dedup_window: timedelta

        @classmethod
        def from_env(cls, environ: Mapping[str, str]) -> IngestConfig:
            env = Env(environ)
            return cls(
                common=CommonConfig.from_env(environ),
                dedup_window=env.duration("AUDIENCE_INGEST_DEDUP_WINDOW", timedelta(hours=24)),
            )

``python -m audience.config --check`` validates the current environment, as a service run
alone reads it (API keys and TLS files included), and prints the effective configuration
(secrets redacted), or one line naming the bad variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OTEL_MODES",
    "Address",
    "CommonConfig",
    "ConfigError",
    "Env",
    "Keepalive",
    "LogFormat",
    "LogLevel",
    "OtelMode",
    "main",
    "redact_url",
]

PREFIX = "AUDIENCE_"

OtelMode = Literal["off", "console", "otlp"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
OTEL_MODES: tuple[OtelMode, ...] = ("off", "console", "otlp")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

_C = TypeVar("_C", bound=str)

_DURATION = re.compile(r"(?P<amount>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_PASSWORD_PARAM = re.compile(r"(password=)[^&;\s]*", re.IGNORECASE)
_ANY_HOST = frozenset({"0.0.0.0", "::"})


class ConfigError(Exception):
    """A configuration variable is missing or has a value that cannot be used."""


@dataclass(frozen=True)
class Address:
    """A ``host:port`` to listen on or connect to; port 0 asks the OS for a free port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def for_local_clients(self) -> Address:
        """Where a client on the same machine reaches a server listening here: a wildcard
        host (``0.0.0.0``, ``::``) names no address to connect to, so it becomes
        ``127.0.0.1``, which an IPv4 or a dual-stack wildcard listener both accept."""
        if self.host in _ANY_HOST:
            return Address("127.0.0.1", self.port)
        return self


def redact_url(value: str) -> str:
    """Returns ``value`` with any password replaced by ``***``, for logs and error messages."""
    value = _PASSWORD_PARAM.sub(r"\1***", value)
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    if not password:
        return value
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


class Env:
    """Typed reads of ``AUDIENCE_*`` variables; every failure is a :class:`ConfigError`.

    A variable set to the empty string counts as unset, because manifests and shells often
    set a variable to nothing rather than leave it out.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        if not name.startswith(PREFIX):
            raise ValueError(f"configuration variables are named {PREFIX}*, not {name!r}")
        value = self._environ.get(name, "").strip()
        return value or None

    @staticmethod
    def _fail(name: str, expected: str, value: str) -> ConfigError:
        return ConfigError(f"{name}: expected {expected}, got {value!r}")

    def optional_string(self, name: str) -> str | None:
        return self._raw(name)

    def required(self, name: str, expected: str) -> str:
        """Returns the variable's value; ``expected`` describes it in the error when unset."""
        value = self._raw(name)
        if value is None:
            raise ConfigError(f"{name}: required but not set (expected {expected})")
        return value

    def string(
        self,
        name: str,
        default: str,
        *,
        pattern: re.Pattern[str] | None = None,
        expected: str = "a string",
    ) -> str:
        value = self._raw(name)
        if value is None:
            return default
        if pattern is not None and not pattern.fullmatch(value):
            raise self._fail(name, expected, value)
        return value

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self._raw(name)
        if value is None:
            return default
        expected = "an integer" + _bounds(minimum, maximum)
        try:
            result = int(value, 10)
        except ValueError:
            raise self._fail(name, expected, value) from None
        if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
            raise self._fail(name, expected, value)
        return result

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self._raw(name)
        if value is None:
            return default
        expected = "a number" + _bounds(minimum, maximum)
        try:
            result = float(value)
        except ValueError:
            raise self._fail(name, expected, value) from None
        if (
            not math.isfinite(result)
            or (minimum is not None and result < minimum)
            or (maximum is not None and result > maximum)
        ):
            raise self._fail(name, expected, value)
        return result

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise self._fail(name, "a boolean (true/false, yes/no, on/off, 1/0)", value)

    def duration(
        self,
        name: str,
        default: timedelta,
        *,
        minimum: timedelta | None = None,
        maximum: timedelta | None = None,
    ) -> timedelta:
        """Reads ``250ms``, ``30s``, ``5m``, ``2h``, ``1d`` or plain seconds (``1.5``)."""
        value = self._raw(name)
        if value is None:
            return default
        expected = (
            f"a duration{_bounds(minimum, maximum)} "
            "(such as 250ms, 30s, 5m, 2h, 1d or plain seconds)"
        )
        match = _DURATION.fullmatch(value)
        if match is None:
            raise self._fail(name, expected, value)
        seconds = float(match["amount"]) * _UNIT_SECONDS[match["unit"] or "s"]
        try:
            result = timedelta(seconds=seconds)
        except OverflowError:
            raise self._fail(name, expected, value) from None
        if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
            raise self._fail(name, expected, value)
        return result

    def choice(self, name: str, choices: Sequence[_C], default: _C) -> _C:
        """Reads one of ``choices``, ignoring case."""
        value = self._raw(name)
        if value is None:
            return default
        for candidate in choices:
            if candidate == value.lower():
                return candidate
        raise self._fail(name, "one of " + ", ".join(choices), value)

    def optional_address(self, name: str) -> Address | None:
        """Reads an optional ``host:port``, like :meth:`address`."""
        if self._raw(name) is None:
            return None
        return self.address(name, Address("", 0))

    def address(self, name: str, default: Address) -> Address:
        """Reads ``host:port``; an IPv6 host is written in brackets (``[::1]:50051``)."""
        value = self._raw(name)
        if value is None:
            return default
        expected = "host:port with a port from 0 to 65535"
        host, sep, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or (":" in host and not value.startswith("[")):
            raise self._fail(name, expected, value)
        if not port.isdigit() or int(port) > 65535:
            raise self._fail(name, expected, value)
        return Address(host, int(port))

    def url(self, name: str, schemes: Sequence[str]) -> str | None:
        """Reads an optional URL whose scheme is one of ``schemes``; errors hide its password."""
        value = self._raw(name)
        if value is None:
            return None
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        if scheme not in schemes:
            expected = "a URL starting with " + " or ".join(f"{s}://" for s in schemes)
            raise self._fail(name, expected, redact_url(value))
        return value


def _bounds(minimum: object | None, maximum: object | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {_show(minimum)} to {_show(maximum)}"
    if minimum is not None:
        return f" of at least {_show(minimum)}"
    if maximum is not None:
        return f" of at most {_show(maximum)}"
    return ""


def _show(bound: object) -> str:
    if isinstance(bound, timedelta):
        return f"{bound.total_seconds():g}s"
    return str(bound)


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive: the server pings idle connections and polices client pings."""

    time: timedelta
    """How long a connection stays quiet before the server pings it."""
    timeout: timedelta
    """How long the server waits for a ping's answer before closing the connection."""
    permit_without_calls: bool
    """Whether pings are allowed (both ways) on a connection with no RPC in flight."""
    min_ping_interval: timedelta
    """The shortest interval between client pings the server accepts before it says GOAWAY."""


@dataclass(frozen=True)
class CommonConfig:
    """What every Audience process reads; services embed it in their own config."""

    listen: Address
    health_listen: Address | None
    """A second, plaintext address serving only health, for probes that cannot use TLS."""
    postgres_dsn: str | None
    """Unset means ``audience up`` starts the embedded PostgreSQL (see ``require_postgres_dsn``)."""
    redis_url: str | None
    """Unset means ``audience up`` starts the embedded Redis (see ``require_redis_url``)."""
    redis_namespace: str
    """Prefix of every Redis key, so several deployments can share one Redis."""
    bus_partitions: int
    data_dir: Path
    """Where the embedded PostgreSQL and Redis keep their data."""
    max_message_bytes: int
    """Largest gRPC message received or sent."""
    keepalive: Keepalive
    max_connection_age: timedelta
    """How long a client connection lives before the server asks the client to reconnect
    (GOAWAY): behind a Kubernetes Service, a connection stays on the pod it first reached,
    so without an age replicas added later would get no calls. Calls in flight, streams
    included, finish on the old connection."""
    shutdown_grace: timedelta
    """How long in-flight RPCs may run after a shutdown starts."""
    otel: OtelMode
    otel_endpoint: str | None
    """OTLP gRPC endpoint; unset means the exporter's own default (``OTEL_EXPORTER_OTLP_*``)."""
    log_level: LogLevel
    log_format: LogFormat

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> CommonConfig:
        env = Env(environ)
        return cls(
            listen=env.address("AUDIENCE_LISTEN", Address("127.0.0.1", 50051)),
            health_listen=env.optional_address("AUDIENCE_HEALTH_LISTEN"),
            postgres_dsn=env.url("AUDIENCE_POSTGRES_DSN", ("postgresql", "postgres")),
            redis_url=env.url("AUDIENCE_REDIS_URL", ("redis", "rediss", "unix")),
            redis_namespace=env.string(
                "AUDIENCE_REDIS_NAMESPACE",
                "audience",
                pattern=_NAMESPACE,
                expected="letters, digits and . _ : - (starting with a letter or digit)",
            ),
            bus_partitions=env.integer("AUDIENCE_BUS_PARTITIONS", 8, minimum=1, maximum=1024),
            data_dir=Path(env.string("AUDIENCE_DATA_DIR", "./data")),
            max_message_bytes=env.integer(
                "AUDIENCE_MAX_MESSAGE_BYTES", 8 * 1024 * 1024, minimum=1024, maximum=2**31 - 1
            ),
            keepalive=Keepalive(
                time=env.duration(
                    "AUDIENCE_KEEPALIVE_TIME", timedelta(seconds=60), minimum=timedelta(seconds=1)
                ),
                timeout=env.duration(
                    "AUDIENCE_KEEPALIVE_TIMEOUT",
                    timedelta(seconds=20),
                    minimum=timedelta(seconds=1),
                ),
                permit_without_calls=env.boolean("AUDIENCE_KEEPALIVE_PERMIT_WITHOUT_CALLS", True),
                min_ping_interval=env.duration(
                    "AUDIENCE_KEEPALIVE_MIN_PING_INTERVAL",
                    timedelta(seconds=10),
                    minimum=timedelta(seconds=1),
                ),
            ),
            max_connection_age=env.duration(
                "AUDIENCE_MAX_CONNECTION_AGE",
                timedelta(minutes=5),
                minimum=timedelta(seconds=1),
                maximum=timedelta(days=1),
            ),
            shutdown_grace=env.duration(
                "AUDIENCE_SHUTDOWN_GRACE",
                timedelta(seconds=10),
                minimum=timedelta(0),
                maximum=timedelta(hours=1),
            ),
            otel=env.choice("AUDIENCE_OTEL", OTEL_MODES, "off"),
            otel_endpoint=env.optional_string("AUDIENCE_OTEL_ENDPOINT"),
            log_level=env.choice("AUDIENCE_LOG_LEVEL", LOG_LEVELS, "info"),
            log_format=env.choice("AUDIENCE_LOG_FORMAT", LOG_FORMATS, "text"),
        )

    def require_postgres_dsn(self) -> str:
        """Returns the DSN, or fails for a service started alone without one."""
        if self.postgres_dsn is None:
            raise ConfigError(
                "AUDIENCE_POSTGRES_DSN: required when a service runs alone "
                "(only `audience up` starts an embedded PostgreSQL)"
            )
        return self.postgres_dsn

    def require_redis_url(self) -> str:
        """Returns the Redis URL, or fails for a service started alone without one."""
        if self.redis_url is None:
            raise ConfigError(
                "AUDIENCE_REDIS_URL: required when a service runs alone "
                "(only `audience up` starts an embedded Redis)"
            )
        return self.redis_url


def _describe(config: DataclassInstance, prefix: str = "") -> list[str]:
    lines: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Keepalive):
            lines.extend(_describe(value, f"{prefix}{field.name}."))
        elif isinstance(value, timedelta):
            lines.append(f"{prefix}{field.name} = {value.total_seconds():g}s")
        elif isinstance(value, str):
            lines.append(f"{prefix}{field.name} = {redact_url(value)}")
        else:
            lines.append(f"{prefix}{field.name} = {value}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m audience.config",
        description="Validate the AUDIENCE_* environment and print the effective configuration.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        required=True,
        help="read the configuration; print it, or the first error and exit 2",
    )
    parser.parse_args(argv)
    # Imported here: the security modules build on this one.
    from audience.security import Security

    try:
        config = CommonConfig.from_env(os.environ)
        security = Security.from_env(os.environ, config, embedded=False)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    print("\n".join([*_describe(config), *security.describe()]))
    return 0


if __name__ == "__main__":
    # Run as `python -m`, this file is `__main__`; the package's own module is the one the
    # security modules import, so its ConfigError is the one they raise.
    from audience.config import main as package_main

    sys.exit(package_main())
