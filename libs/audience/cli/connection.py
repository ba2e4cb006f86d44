"""How every CLI command reaches the suite: one set of options and one channel factory.

A command that calls the suite is decorated with :func:`connection_options`, which gives it
``address`` and takes, without passing them on, the API key and TLS options; inside the
command :func:`connect` opens the channel with all of them::

    @click.command()
    @connection_options
    def get(address: str, name: str) -> None:
        async def run() -> None:
            async with connect(address) as channel:
                ...

The key comes from ``--api-key``, else ``AUDIENCE_API_KEY``, else the development key that
``audience up`` keeps under ``AUDIENCE_DATA_DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc.aio

from audience.auth import read_dev_key
from audience.channels import ChannelSettings, open_channel
from audience.config import CommonConfig, ConfigError
from audience.tls import ClientTls

__all__ = ["connect", "connection_options"]

_META = "audience.connection"
_OPTIONS = ("api_key", "tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Given:
    api_key: str | None
    tls: bool | None
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    tls_server_name: str | None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    given: dict[str, Any] = ctx.meta.setdefault(_META, {})
    if param.name is not None:
        given[param.name] = value
    return value


def _path_option(flag: str, envvar: str, help_text: str) -> Callable[[F], F]:
    return click.option(
        flag,
        envvar=envvar,
        type=click.Path(exists=True, dir_okay=False),
        expose_value=False,
        callback=_remember,
        help=help_text,
    )


def connection_options(command: F) -> F:
    """Adds ``--address`` (passed on) and the API key and TLS options (kept for
    :func:`connect`)."""
    decorators: list[Callable[[F], F]] = [
        click.option(
            "--address",
            default="127.0.0.1:50051",
            show_default=True,
            envvar="AUDIENCE_ADDRESS",
            help="Where the suite answers.",
        ),
        click.option(
            "--api-key",
            envvar="AUDIENCE_API_KEY",
            expose_value=False,
            callback=_remember,
            help="The API key to call with (default: AUDIENCE_API_KEY, else the development "
            "key of `audience up` in AUDIENCE_DATA_DIR).",
        ),
        click.option(
            "--tls/--no-tls",
            default=None,
            expose_value=False,
            allow_from_autoenv=False,
            callback=_remember,
            help="Connect with TLS (implied by --tls-ca and --tls-cert); without --tls-ca, "
            "the system's trusted CAs check the server.",
        ),
        _path_option(
            "--tls-ca", "AUDIENCE_TLS_CA_FILE", "PEM file of the CAs that sign the server."
        ),
        _path_option(
            "--tls-cert",
            "AUDIENCE_TLS_CLIENT_CERT_FILE",
            "PEM client certificate, for servers that require one (mutual TLS).",
        ),
        _path_option("--tls-key", "AUDIENCE_TLS_CLIENT_KEY_FILE", "PEM key of --tls-cert."),
        click.option(
            "--tls-server-name",
            envvar="AUDIENCE_TLS_SERVER_NAME",
            expose_value=False,
            callback=_remember,
            help="The name to expect in the server's certificate, if not the address's.",
        ),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def _given() -> _Given:
    values: dict[str, Any] = click.get_current_context().meta.get(_META, {})
    return _Given(**{name: values.get(name) for name in _OPTIONS})


def _settings() -> ChannelSettings:
    given = _given()
    try:
        common = CommonConfig.from_env(os.environ)
        tls: ClientTls | None = None
        wants_tls = given.tls_ca is not None or given.tls_cert is not None
        if given.tls is True or (given.tls is None and wants_tls):
            tls = ClientTls.from_files(
                given.tls_ca,
                given.tls_cert,
                given.tls_key,
                given.tls_server_name,
                variables=("--tls-ca", "--tls-cert", "--tls-key"),
            )
        elif given.tls_server_name is not None:
            raise ConfigError("--tls-server-name: needs TLS (--tls or --tls-ca)")
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    api_key = given.api_key or read_dev_key(Path(common.data_dir))
    return ChannelSettings(
        api_key=api_key,
        tls=tls,
        max_message_bytes=common.max_message_bytes,
        keepalive=common.keepalive,
    )


def connect(address: str) -> grpc.aio.Channel:
    """Opens a channel to ``address`` with the command's key and TLS options.

    Call it inside a command decorated with :func:`connection_options`.
    """
    return open_channel(address, _settings())
