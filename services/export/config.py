"""The export service's configuration, read once from ``AUDIENCE_*`` variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from audience.config import Address, CommonConfig, ConfigError, Env
from services.export.jobs import JobSettings
from services.export.webhook_worker import WebhookSettings

__all__ = ["ExportConfig"]


def _path(env: Env, name: str) -> Path | None:
    value = env.optional_string(name)
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"{name}: expected an absolute path, got {value!r}")
    return path


@dataclass(frozen=True)
class ExportConfig:
    common: CommonConfig
    segment_engine: Address
    profile: Address
    export_root: Path | None
    """Folder destinations must lie under it; unset disables them."""
    jobs: JobSettings
    webhooks: WebhookSettings
    scheduler_interval: timedelta
    profile_concurrency: int
    """``GetProfile`` calls in flight at once for identity and attribute columns."""
    delta_timeout: timedelta
    """How long a delta run may take to read the change stream up to its start."""
    sftp_timeout: timedelta
    environ: Mapping[str, str]
    """Where ``AUDIENCE_SECRET_*`` references of SFTP destinations are read."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ExportConfig:
        env = Env(environ)
        common = CommonConfig.from_env(environ)
        # By default the peers are hosted beside this service, as `audience up` does; a
        # deployment that runs them apart names them.
        peer = common.listen.for_local_clients()
        positive = timedelta(milliseconds=1)
        return cls(
            common=common,
            segment_engine=env.address("AUDIENCE_SEGMENT_ENGINE_ADDRESS", peer),
            profile=env.address("AUDIENCE_PROFILE_ADDRESS", peer),
            export_root=_path(env, "AUDIENCE_EXPORT_ROOT"),
            jobs=JobSettings(
                workers=env.integer("AUDIENCE_EXPORT_WORKERS", 2, minimum=1, maximum=64),
                poll_interval=env.duration(
                    "AUDIENCE_EXPORT_POLL_INTERVAL", timedelta(seconds=1), minimum=positive
                ),
                lease=env.duration(
                    "AUDIENCE_EXPORT_JOB_LEASE",
                    timedelta(seconds=30),
                    minimum=timedelta(seconds=1),
                ),
                max_attempts=env.integer(
                    "AUDIENCE_EXPORT_UPLOAD_ATTEMPTS", 5, minimum=1, maximum=100
                ),
                backoff_base=env.duration(
                    "AUDIENCE_EXPORT_UPLOAD_BACKOFF", timedelta(seconds=2), minimum=positive
                ),
                backoff_cap=env.duration(
                    "AUDIENCE_EXPORT_UPLOAD_BACKOFF_MAX", timedelta(minutes=5), minimum=positive
                ),
                spool_dir=_path(env, "AUDIENCE_EXPORT_SPOOL_DIR"),
            ),
            webhooks=WebhookSettings(
                concurrency=env.integer(
                    "AUDIENCE_EXPORT_WEBHOOK_CONCURRENCY", 32, minimum=1, maximum=1024
                ),
                timeout=env.duration(
                    "AUDIENCE_EXPORT_WEBHOOK_TIMEOUT",
                    timedelta(seconds=10),
                    minimum=positive,
                    maximum=timedelta(minutes=5),
                ),
                backoff_base=env.duration(
                    "AUDIENCE_EXPORT_WEBHOOK_BACKOFF", timedelta(seconds=2), minimum=positive
                ),
                backoff_cap=env.duration(
                    "AUDIENCE_EXPORT_WEBHOOK_BACKOFF_MAX", timedelta(hours=1), minimum=positive
                ),
                poll_interval=env.duration(
                    "AUDIENCE_EXPORT_WEBHOOK_POLL_INTERVAL",
                    timedelta(milliseconds=500),
                    minimum=positive,
                ),
                lease=env.duration(
                    "AUDIENCE_EXPORT_WEBHOOK_LEASE",
                    timedelta(seconds=30),
                    minimum=timedelta(seconds=1),
                ),
                heartbeat_interval=env.duration(
                    "AUDIENCE_EXPORT_WEBHOOK_HEARTBEAT",
                    timedelta(seconds=10),
                    minimum=timedelta(seconds=1),
                    maximum=timedelta(minutes=10),
                ),
            ),
            scheduler_interval=env.duration(
                "AUDIENCE_EXPORT_SCHEDULER_INTERVAL", timedelta(seconds=1), minimum=positive
            ),
            profile_concurrency=env.integer(
                "AUDIENCE_EXPORT_PROFILE_CONCURRENCY", 64, minimum=1, maximum=1024
            ),
            delta_timeout=env.duration(
                "AUDIENCE_EXPORT_DELTA_TIMEOUT", timedelta(minutes=5), minimum=positive
            ),
            sftp_timeout=env.duration(
                "AUDIENCE_EXPORT_SFTP_TIMEOUT", timedelta(seconds=30), minimum=positive
            ),
            environ=environ,
        )
