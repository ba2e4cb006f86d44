"""TLS and mutual TLS, from configuration, for the server and for its clients.

Server (``Host(credentials=…)``):

- ``AUDIENCE_TLS_CERT_FILE`` and ``AUDIENCE_TLS_KEY_FILE``: serve TLS with this certificate
  chain and (unencrypted) key, both PEM;
- ``AUDIENCE_TLS_CLIENT_CA_FILE``: also require a client certificate signed by one of these
  CAs (mutual TLS).

Client (the channels a service opens to another, and the CLI):

- ``AUDIENCE_TLS_CA_FILE``: connect with TLS, trusting these CAs;
- ``AUDIENCE_TLS_CLIENT_CERT_FILE`` and ``AUDIENCE_TLS_CLIENT_KEY_FILE``: present this
  certificate (for servers that require one);
- ``AUDIENCE_TLS_SERVER_NAME``: the name expected in the server's certificate, when the
  address does not carry it (an IP address, a port-forward).

Files are read and checked once, at start, with the standard library's ``ssl``: a
certificate that does not match its key, or a file that is not PEM, fails the start naming
the variable. Rotate certificates with a (rolling) restart.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from audience.config import ConfigError, Env

__all__ = ["ClientTls", "ServerTls"]


def _read(variable: str, path: str) -> bytes:
    """Reads a PEM file; called before the ``ssl`` checks, whose errors say less."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{variable}: cannot read {path!r}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{variable}: {path!r} is not a PEM file")
    return data


def _check_pair(cert_variable: str, cert: str, key_variable: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # An empty password makes an encrypted key fail here instead of prompting on a tty;
        # gRPC cannot use encrypted keys anyway.
        context.load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as error:
        raise ConfigError(
            f"{cert_variable}/{key_variable}: {cert!r} and {key!r} are not a certificate and "
            f"its unencrypted private key ({error.reason or error})"
        ) from None


def _check_ca(variable: str, path: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise ConfigError(
            f"{variable}: {path!r} holds no usable CA certificate ({error.reason or error})"
        ) from None


def _pair(env: Env, cert_variable: str, key_variable: str) -> tuple[str, str] | None:
    cert = env.optional_string(cert_variable)
    key = env.optional_string(key_variable)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = cert_variable if cert is None else key_variable
        present = key_variable if cert is None else cert_variable
        raise ConfigError(f"{missing}: required with {present}")
    return cert, key


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate, and the CAs of required client certificates (mutual TLS)."""

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(repr=False)
    source: str
    """Where the files came from, for logs."""

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @classmethod
    def from_files(cls, cert: str, key: str, client_ca: str | None = None) -> ServerTls:
        chain = _read("AUDIENCE_TLS_CERT_FILE", cert)
        private_key = _read("AUDIENCE_TLS_KEY_FILE", key)
        _check_pair("AUDIENCE_TLS_CERT_FILE", cert, "AUDIENCE_TLS_KEY_FILE", key)
        ca: bytes | None = None
        if client_ca is not None:
            ca = _read("AUDIENCE_TLS_CLIENT_CA_FILE", client_ca)
            _check_ca("AUDIENCE_TLS_CLIENT_CA_FILE", client_ca)
        return cls(
            certificate_chain=chain,
            private_key=private_key,
            client_ca=ca,
            source=cert if client_ca is None else f"{cert}, client CA {client_ca}",
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServerTls | None:
        """Returns the server's TLS, or ``None`` to serve plaintext."""
        env = Env(environ)
        pair = _pair(env, "AUDIENCE_TLS_CERT_FILE", "AUDIENCE_TLS_KEY_FILE")
        client_ca = env.optional_string("AUDIENCE_TLS_CLIENT_CA_FILE")
        if pair is None:
            if client_ca is not None:
                raise ConfigError(
                    "AUDIENCE_TLS_CERT_FILE: required with AUDIENCE_TLS_CLIENT_CA_FILE "
                    "(mutual TLS is TLS first)"
                )
            return None
        return cls.from_files(*pair, client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """How a client checks the server, and the certificate it presents, if any."""

    root_certificates: bytes | None = field(repr=False)
    """The CAs to trust; ``None`` trusts the system's (gRPC's bundled) roots."""
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        *,
        variables: tuple[str, str, str] = (
            "AUDIENCE_TLS_CA_FILE",
            "AUDIENCE_TLS_CLIENT_CERT_FILE",
            "AUDIENCE_TLS_CLIENT_KEY_FILE",
        ),
    ) -> ClientTls:
        """Reads and checks the files; ``variables`` name them in errors (the CLI passes
        its option names)."""
        ca_variable, cert_variable, key_variable = variables
        if (cert is None) != (key is None):
            missing, present = (
                (cert_variable, key_variable) if cert is None else (key_variable, cert_variable)
            )
            raise ConfigError(f"{missing}: required with {present}")
        roots: bytes | None = None
        if ca is not None:
            roots = _read(ca_variable, ca)
            _check_ca(ca_variable, ca)
        chain: bytes | None = None
        private_key: bytes | None = None
        if cert is not None and key is not None:
            chain = _read(cert_variable, cert)
            private_key = _read(key_variable, key)
            _check_pair(cert_variable, cert, key_variable, key)
        return cls(roots, private_key, chain, server_name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ClientTls | None:
        """Returns the client's TLS, or ``None`` to connect in plaintext (no CA file and no
        client certificate configured)."""
        env = Env(environ)
        ca = env.optional_string("AUDIENCE_TLS_CA_FILE")
        cert = env.optional_string("AUDIENCE_TLS_CLIENT_CERT_FILE")
        key = env.optional_string("AUDIENCE_TLS_CLIENT_KEY_FILE")
        server_name = env.optional_string("AUDIENCE_TLS_SERVER_NAME")
        if ca is None and cert is None and key is None:
            if server_name is not None:
                raise ConfigError(
                    "AUDIENCE_TLS_CA_FILE: required with AUDIENCE_TLS_SERVER_NAME "
                    "(the name is checked against the server's certificate)"
                )
            return None
        return cls.from_files(ca, cert, key, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the expected server name, when overridden."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]
