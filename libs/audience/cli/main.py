"""The ``audience`` command-line tool for people.

Commands that talk to a running suite take ``--address`` (default ``127.0.0.1:50051``, or
``AUDIENCE_ADDRESS``), where ``audience up`` serves every service, and the API key and TLS
options of :mod:`audience.cli.connection`.
"""

from __future__ import annotations

import click

from audience.cli.events import events, failed_events
from audience.cli.export import export
from audience.cli.keys import keys
from audience.cli.profiles import accounts, profiles
from audience.cli.segments import explain, members, segments, watch
from audience.cli.suite import health, migrate, up


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="audience")
def cli() -> None:
    """Audience: real-time audience segments."""


cli.add_command(up)
cli.add_command(health)
cli.add_command(migrate)
cli.add_command(export)
cli.add_command(segments)
cli.add_command(watch)
cli.add_command(explain)
cli.add_command(members)
cli.add_command(profiles)
cli.add_command(accounts)
cli.add_command(keys)
cli.add_command(events)
cli.add_command(failed_events)


def main() -> None:
    cli(auto_envvar_prefix="AUDIENCE")
