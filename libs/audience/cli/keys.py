"""``audience keys``: make API keys and the entries that let the services accept them."""

from __future__ import annotations

import json
import sys

import click

from audience.auth import SCOPES, generate_api_key, hash_api_key, parse_api_keys
from audience.config import ConfigError


@click.group()
def keys() -> None:
    """API keys: the servers keep only their SHA-256 (see docs/security.md)."""


@keys.command()
@click.option("--name", required=True, help="A label for logs and errors, such as crm.")
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    required=True,
    help="A dataset the key may use (repeat for several), or * for every dataset.",
)
@click.option(
    "--scope",
    "scopes",
    type=click.Choice(SCOPES),
    multiple=True,
    required=True,
    help="What the key may do (repeat for several): read, write, admin.",
)
def create(name: str, datasets: tuple[str, ...], scopes: tuple[str, ...]) -> None:
    """Makes a new key: prints the key (give it to the caller, once) on stderr and its
    AUDIENCE_API_KEYS entry on stdout."""
    key = generate_api_key()
    entry = {
        "name": name,
        "sha256": hash_api_key(key),
        "datasets": list(dict.fromkeys(datasets)),
        "scopes": [scope for scope in SCOPES if scope in scopes],
    }
    try:
        parse_api_keys(json.dumps([entry]), "the new key")
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"API key (shown once; store it as a secret): {key}", err=True)
    click.echo(json.dumps(entry))


@keys.command("hash")
def hash_command() -> None:
    """Prints the SHA-256 of the key read from stdin, for an AUDIENCE_API_KEYS entry."""
    key = sys.stdin.readline().strip()
    if not key:
        raise click.UsageError("expected the key on stdin")
    click.echo(hash_api_key(key))
