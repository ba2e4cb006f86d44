"""The container image's recipe, checked without a Docker engine.

hadolint lints the Dockerfile; BuildKit's own parser (the ``dockerfile`` package) reads it
so the tests can hold it to what the Kubernetes manifests rely on: a non-root numeric user,
no build tools in the final stage, bytecode compiled at build time, an entrypoint that
runs any service by name. The entrypoint script itself runs here against a stand-in
``python``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT_SCRIPT = ROOT / "scripts" / "container-entrypoint.sh"
SERVICE_MODULES = ("ingest", "profile", "segment_engine", "export")
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|yum|dnf)\s+(install|add)\b|\bpip3?\s+install\b|"
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libpq-dev)\b"
)


@dataclass(frozen=True)
class Stage:
    name: str
    base: str
    commands: tuple[Any, ...]

    def all(self, instruction: str) -> list[Any]:
        return [c for c in self.commands if c.cmd == instruction]


def _stages() -> list[Stage]:
    stages: list[Stage] = []
    current: list[Any] = []
    base = name = ""
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            if base:
                stages.append(Stage(name, base, tuple(current)))
            base = command.value[0]
            name = command.value[2] if len(command.value) == 3 else ""
            current = []
        elif base:
            current.append(command)
    stages.append(Stage(name, base, tuple(current)))
    return stages


def _global_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            key, _, value = command.value[0].partition("=")
            args[key] = value
    return args


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in stage.all("ENV"):
        values = command.value
        env.update(zip(values[::2], values[1::2], strict=True))
    return env


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_image_is_built_in_stages_on_slim_python_311() -> None:
    stages = _stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    # One base for both: the virtualenv's interpreter is a symlink into the base image.
    assert build.base == runtime.base == "${PYTHON_IMAGE}"
    assert re.fullmatch(
        r"python:3\.11-slim-\w+(@sha256:[0-9a-f]{64})?", _global_args()["PYTHON_IMAGE"]
    )


def test_final_stage_runs_as_the_numeric_non_root_user_the_manifests_expect() -> None:
    runtime = _stages()[-1]
    users = runtime.all("USER")
    assert users, "the final stage must switch away from root"
    user = users[-1].value[0]
    match = re.fullmatch(r"(\d+):(\d+)", user)
    assert match, f"USER {user}: numeric uid:gid, so runAsNonRoot can verify it"
    uid, gid = int(match[1]), int(match[2])
    assert uid > 0
    assert gid > 0
    # Nothing runs after the switch but metadata.
    after = runtime.commands[runtime.commands.index(users[-1]) + 1 :]
    assert {c.cmd for c in after} <= {"WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}

    ingest = yaml.safe_load_all((ROOT / "k8s" / "base" / "ingest.yaml").read_text())
    deployment = next(doc for doc in ingest if doc["kind"] == "Deployment")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)


def test_final_stage_installs_nothing_and_copies_the_built_environment() -> None:
    runtime = _stages()[-1]
    for command in runtime.all("RUN"):
        assert not BUILD_TOOLS.search(command.value[0]), command.original
    copies = [c for c in runtime.all("COPY") if any(f.startswith("--from=") for f in c.flags)]
    assert [(c.flags, c.value) for c in copies] == [
        (("--from=build",), ("/opt/audience", "/opt/audience"))
    ]


def test_dependencies_are_installed_from_wheels_only() -> None:
    build = _stages()[0]
    installs = [c.value[0] for c in build.all("RUN") if "pip install" in c.value[0]]
    assert installs
    assert "--only-binary=:all:" in installs[0], "sdists would need a compiler"


def test_bytecode_is_compiled_at_build_time_and_never_written_at_run_time() -> None:
    build, runtime = _stages()[0], _stages()[-1]
    build_runs = " ".join(c.value[0] for c in build.all("RUN"))
    assert re.search(
        r"compileall .*--invalidation-mode unchecked-hash /opt/audience/lib", build_runs
    )
    runtime_runs = " ".join(c.value[0] for c in runtime.all("RUN"))
    assert "compileall" in runtime_runs, "the standard library too"
    env = _env(runtime)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/audience/bin:")


def test_image_listens_where_the_manifests_probe() -> None:
    runtime = _stages()[-1]
    assert [c.value for c in runtime.all("EXPOSE")] == [("50051",)]
    assert _env(runtime)["AUDIENCE_LISTEN"] == "0.0.0.0:50051"


def test_entrypoint_and_default_command_are_exec_form() -> None:
    runtime = _stages()[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    assert entrypoint.json
    assert cmd.json
    assert entrypoint.value == ("/usr/local/bin/audience-entrypoint",)
    assert cmd.value[0] in SERVICE_MODULES
    (script,) = [c for c in runtime.all("COPY") if c.value[-1] == entrypoint.value[0]]
    assert script.value[0] == str(ENTRYPOINT_SCRIPT.relative_to(ROOT))
    assert "--chmod=0755" in script.flags


def test_image_has_no_healthcheck_because_orchestrators_probe_grpc() -> None:
    assert not any(c.cmd == "HEALTHCHECK" for c in dockerfile.parse_file(str(DOCKERFILE)))


def test_build_context_holds_only_what_the_dockerfile_copies() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert rules[0] == "*", "an allow-list: everything else stays out"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources = {
        source.rstrip("/")
        for stage in _stages()
        for command in stage.all("COPY")
        if not any(flag.startswith("--from=") for flag in command.flags)
        for source in command.value[:-1]
    }
    assert sources == allowed
    for source in sources:
        assert (ROOT / source).exists(), source


@pytest.fixture
def stand_in_python(tmp_path: Path) -> dict[str, str]:
    """A PATH whose ``python`` prints the arguments it was given, one per line."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\nfor arg in "$@"; do echo "$arg"; done\n')
    python.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


def _entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT_SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=30,
    )


@pytest.mark.parametrize("service", SERVICE_MODULES)
def test_entrypoint_runs_a_service_by_name(service: str, stand_in_python: dict[str, str]) -> None:
    result = _entrypoint(stand_in_python, service, "--extra")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["-m", f"services.{service}", "--extra"]


def test_entrypoint_runs_any_other_command_as_given(stand_in_python: dict[str, str]) -> None:
    result = _entrypoint(stand_in_python, "sh", "-c", "echo $0 $1", "audience", "migrate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "audience migrate"


def test_entrypoint_without_arguments_prints_usage(stand_in_python: dict[str, str]) -> None:
    result = _entrypoint(stand_in_python)
    assert result.returncode == 64
    assert "usage:" in result.stderr
    assert result.stdout == ""


def test_entrypoint_replaces_itself_so_signals_reach_the_service(tmp_path: Path) -> None:
    # exec keeps the process id: the service is the process the kubelet signals (PID 1 in
    # the container), not a child of a shell that would not pass SIGTERM on.
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho $$\n")
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        ["sh", str(ENTRYPOINT_SCRIPT), "ingest"], stdout=subprocess.PIPE, text=True, env=env
    )
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert int(stdout) == process.pid
