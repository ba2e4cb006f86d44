"""Checks of destination settings, and the secret reference rule."""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
from collections.abc import Mapping
from pathlib import PurePosixPath

from audience.errors import FieldViolation, invalid_argument
from services.export.domain.model import FolderTarget, SftpTarget, Target

__all__ = [
    "SECRET_PREFIX",
    "normalize_secret_reference",
    "read_secret",
    "validate_target",
]

SECRET_PREFIX = "AUDIENCE_SECRET_"
_SECRET_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,127}")
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]{1,255}")
_KEY_TYPE = re.compile(r"(ssh|ecdsa|sk)-[A-Za-z0-9@.-]+")
MAX_PATH = 1024
MAX_HOST_KEY = 16_384


def _bad(field: str, description: str) -> Exception:
    return invalid_argument(f"{field}: {description}", FieldViolation(field, description))


def normalize_secret_reference(reference: str, field: str) -> str:
    """Returns the full variable name for ``AUDIENCE_SECRET_<NAME>`` or ``<NAME>``."""
    name = reference.removeprefix(SECRET_PREFIX)
    if not _SECRET_NAME.fullmatch(name):
        raise _bad(
            field,
            f"the name of a secret, {SECRET_PREFIX}<NAME> with NAME of upper-case letters, "
            f"digits and '_'; got {reference!r}",
        )
    return SECRET_PREFIX + name


def read_secret(environ: Mapping[str, str], reference: str) -> str | None:
    """The secret's value from the service's environment, or None when it is not set."""
    return environ.get(reference) or None


def _check_path(path: str, field: str, *, absolute: bool) -> str:
    if not path:
        raise _bad(field, "required")
    if len(path) > MAX_PATH or "\x00" in path:
        raise _bad(field, f"at most {MAX_PATH} characters, without NUL")
    if absolute and not path.startswith("/"):
        raise _bad(field, f"an absolute path, got {path!r}")
    if ".." in PurePosixPath(path).parts:
        raise _bad(field, f"must not contain '..', got {path!r}")
    return posixpath.normpath(path)


def _check_host_key(line: str, field: str) -> str:
    if len(line) > MAX_HOST_KEY:
        raise _bad(field, f"at most {MAX_HOST_KEY} characters")
    fields = line.split()
    if not fields:
        return ""
    if len(fields) == 3:
        fields = fields[1:]
    if len(fields) != 2 or not _KEY_TYPE.fullmatch(fields[0]):
        raise _bad(
            field,
            "a host key in known_hosts form, '[host] key-type base64' such as "
            "'ssh-ed25519 AAAAC3Nz...'",
        )
    try:
        base64.b64decode(fields[1], validate=True)
    except binascii.Error:
        raise _bad(field, "the key is not valid base64") from None
    return line.strip()


def validate_target(target: Target | None, export_root: str | None, field: str) -> Target:
    """Returns ``target`` normalized, or rejects it naming the bad fields.

    Folder paths must lie under ``export_root`` (lexically here; the folder adapter checks
    again with symbolic links resolved before it writes). Without a root, folder
    destinations are refused.
    """
    if target is None:
        raise _bad(field, "one of folder or sftp is required")
    if isinstance(target, FolderTarget):
        path = _check_path(target.path, f"{field}.folder.path", absolute=True)
        if export_root is None:
            raise _bad(
                f"{field}.folder",
                "folder destinations are disabled: the service has no AUDIENCE_EXPORT_ROOT",
            )
        root = posixpath.normpath(export_root)
        if posixpath.commonpath([root, path]) != root:
            raise _bad(f"{field}.folder.path", f"must be under the export root {root}")
        return FolderTarget(path)
    assert isinstance(target, SftpTarget)
    violations: list[FieldViolation] = []
    if not _HOST.fullmatch(target.host):
        violations.append(FieldViolation(f"{field}.sftp.host", "a host name or address"))
    port = target.port or 22
    if not 1 <= port <= 65535:
        violations.append(FieldViolation(f"{field}.sftp.port", "from 1 to 65535, or 0 for 22"))
    username = target.username
    if not username or len(username) > 128 or any(c.isspace() for c in username):
        violations.append(
            FieldViolation(f"{field}.sftp.username", "1-128 characters without spaces")
        )
    if violations:
        raise invalid_argument("The SFTP destination is not valid.", *violations)
    return SftpTarget(
        host=target.host,
        port=port,
        path=_check_path(target.path, f"{field}.sftp.path", absolute=False),
        username=target.username,
        credential_secret=normalize_secret_reference(
            target.credential_secret, f"{field}.sftp.credential_secret"
        ),
        known_host_key=_check_host_key(target.known_host_key, f"{field}.sftp.known_host_key"),
    )
