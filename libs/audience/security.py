"""A process's security settings, put together from the environment: who may call it (API
keys), how it serves (TLS, mutual TLS) and how it calls the other services.

:meth:`Security.from_env` applies the rules of the two ways to run:

- **alone** (``python -m services.<name>``): the keys (``AUDIENCE_API_KEYS`` or
  ``AUDIENCE_API_KEYS_FILE``) and the internal key (``AUDIENCE_INTERNAL_API_KEY``) are
  required, and a missing one fails the start;
- **embedded** (``audience up``): with no keys configured, a development key is made once
  under the data directory and accepted for everything; the services of the one process
  call each other with a key made for the run.

Authentication is on unless ``AUDIENCE_AUTH=disabled`` turns it off, which is logged loudly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from audience.auth import (
    API_KEYS_VARIABLE,
    DEV_KEY_FILE,
    SCOPES,
    ApiKey,
    AuthConfig,
    AuthInterceptor,
    AuthMode,
    KeyRing,
    generate_api_key,
    hash_api_key,
    load_or_create_dev_key,
)
from audience.channels import ChannelSettings
from audience.config import CommonConfig, ConfigError
from audience.tls import ClientTls, ServerTls

__all__ = ["DevKey", "Security"]

_log = logging.getLogger(__name__)

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class DevKey:
    """The development key of ``audience up``."""

    key: str = field(repr=False)
    path: Path
    created: bool
    """Whether this run made it (else it was already in the data directory)."""


@dataclass(frozen=True)
class Security:
    """Authentication, the server's TLS, and how this process calls the others."""

    keys: KeyRing | None
    """The accepted keys; ``None`` when authentication is off."""
    server_tls: ServerTls | None
    channels: ChannelSettings
    dev_key: DevKey | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], common: CommonConfig, *, embedded: bool
    ) -> Security:
        """Reads and checks every security variable; fails with a :class:`ConfigError`
        naming the variable.

        Args:
            embedded: ``audience up`` (a development key when no keys are configured)
                rather than a service run alone (keys required).
        """
        auth = AuthConfig.from_env(environ)
        server_tls = ServerTls.from_env(environ)
        client_tls = ClientTls.from_env(environ)

        def channels(api_key: str | None) -> ChannelSettings:
            return ChannelSettings(
                api_key=api_key,
                tls=client_tls,
                max_message_bytes=common.max_message_bytes,
                keepalive=common.keepalive,
            )

        # On unless switched off by name: a forgotten variable must never leave data open.
        mode: AuthMode = auth.mode or "enabled"
        if mode == "disabled":
            _log.warning(
                "AUTHENTICATION IS OFF (AUDIENCE_AUTH=disabled): anyone who can reach %s may "
                "read and change every dataset. Unset AUDIENCE_AUTH and configure %s "
                "(docs/security.md)%s.",
                common.listen,
                API_KEYS_VARIABLE,
                "; the configured keys are ignored" if auth.keys else "",
            )
            return cls(None, server_tls, channels(auth.internal_key))
        if not server_tls and common.listen.host not in _LOOPBACK:
            _log.warning(
                "API keys travel in plaintext to %s: serve TLS with AUDIENCE_TLS_CERT_FILE "
                "and AUDIENCE_TLS_KEY_FILE unless the network encrypts (a service mesh).",
                common.listen,
            )
        if not embedded:
            if not auth.keys:
                raise ConfigError(
                    f"{API_KEYS_VARIABLE}: required, since authentication is on by default "
                    "(or AUDIENCE_API_KEYS_FILE; `audience keys create` makes a key and its "
                    "entry; AUDIENCE_AUTH=disabled runs without keys, open to every caller)"
                )
            auth.internal_entry()
            return cls(KeyRing(auth.keys), server_tls, channels(auth.internal_key))
        keys = list(auth.keys)
        dev: DevKey | None = None
        if not keys:
            key, created = load_or_create_dev_key(common.data_dir)
            dev = DevKey(key, common.data_dir / DEV_KEY_FILE, created)
            keys.append(ApiKey("dev", hash_api_key(key), None, frozenset(SCOPES)))
        # Every service runs in this process: the key they present to each other never has
        # to leave it, so a new one each run is enough.
        internal = generate_api_key()
        keys.append(ApiKey("internal", hash_api_key(internal), None, frozenset({"read", "write"})))
        return cls(KeyRing(keys), server_tls, channels(internal), dev)

    def server_interceptors(self, services: Iterable[str]) -> list[grpc.aio.ServerInterceptor]:
        """The authentication interceptor for a host serving ``services`` (none when off).

        Raises:
            ValueError: an RPC of ``services`` has no scope in ``audience.auth.RPC_SCOPES``.
        """
        if self.keys is None:
            return []
        interceptor = AuthInterceptor(self.keys)
        interceptor.require_policies(services)
        return [interceptor]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return None if self.server_tls is None else self.server_tls.credentials()

    def describe(self) -> list[str]:
        """One line per setting, without secrets, for logs and ``--check``."""
        if self.keys is None:
            auth = "auth = disabled"
        else:
            auth = "auth = enabled; keys: " + "; ".join(key.describe() for key in self.keys)
        if self.server_tls is None:
            tls = "tls = off"
        else:
            kind = "mutual TLS" if self.server_tls.mutual else "TLS"
            tls = f"tls = {kind} ({self.server_tls.source})"
        client = "client_tls = off" if self.channels.tls is None else "client_tls = on"
        internal = "set" if self.channels.api_key else "unset"
        return [auth, tls, client, f"internal_api_key = {internal}"]
