"""protos/buf.gen.yaml generates clients that build: TypeScript and Python, here and in CI.

Their plugins come from the project's own installs (protoc-gen-es from clients/node by
``make node-deps``, the protoc inside grpcio-tools from the venv), so this needs no network.
The Go, Java and Python-gRPC entries need plugins from elsewhere (protos/README.md,
"Generating clients") and are left out, by name, of the template run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
BIN = Path(sys.executable).parent
BUF = BIN / "buf"
NODE_BIN = ROOT / "clients" / "node" / "node_modules" / ".bin"
PROTOS_IN_API = sorted(path.stem for path in (PROTOS / "audience" / "v1").glob("*.proto"))

# The entries of buf.gen.yaml run here, by plugin, with the output folder each must use.
OFFLINE = {
    ("local", "protoc-gen-es"): "gen/ts",
    ("protoc_builtin", "python"): "gen/python",
    ("protoc_builtin", "pyi"): "gen/python",
}

# Builds a request with the generated TypeScript, so the compiler checks more than the
# generated files themselves: that a client can use them as written in the README.
TYPESCRIPT_USE = """
import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { EventType } from "./ts/audience/v1/event_pb";
import { SendEventRequestSchema } from "./ts/audience/v1/ingest_service_pb";
import { MembershipService } from "./ts/audience/v1/membership_service_pb";

const request = create(SendEventRequestSchema, {
  parent: "datasets/shop",
  event: {
    eventId: "e-1",
    type: EventType.CART_UPDATED,
    userId: "shopper",
    timestamp: timestampFromDate(new Date()),
    payload: { case: "cart", value: { currency: "USD", items: [{ price: 40, quantity: 1n }] } },
  },
});
export const bytes: Uint8Array = toBinary(SendEventRequestSchema, request);
export const watch: string = MembershipService.method.watchMembershipChanges.name;
"""

PYTHON_USE = """
import importlib
import sys
from pathlib import Path

for stem in sys.argv[2:]:
    module = importlib.import_module(f"audience.v1.{stem}_pb2")
    assert Path(module.__file__).is_relative_to(sys.argv[1]), module.__file__
from audience.v1 import segment_pb2, segment_service_pb2

request = segment_service_pb2.CreateSegmentRequest(
    parent="datasets/shop",
    segment_id="cart-under-100",
    segment=segment_pb2.Segment(rule_text="cart.value < 100"),
)
assert segment_service_pb2.CreateSegmentRequest.FromString(request.SerializeToString()) == request
"""


def _plugin_key(plugin: dict[str, Any]) -> tuple[str, str]:
    kind = "local" if "local" in plugin else "protoc_builtin"
    return kind, str(plugin[kind])


def _offline_template(out: Path) -> dict[str, Any]:
    """buf.gen.yaml with only the offline entries, writing under ``out``."""
    template: dict[str, Any] = yaml.safe_load((PROTOS / "buf.gen.yaml").read_text())
    kept = [plugin for plugin in template["plugins"] if _plugin_key(plugin) in OFFLINE]
    assert sorted(_plugin_key(plugin) for plugin in kept) == sorted(OFFLINE)
    for plugin in kept:
        assert plugin["out"] == OFFLINE[_plugin_key(plugin)], plugin
        plugin["out"] = str(out / Path(plugin["out"]).name)
    return {**template, "plugins": kept}


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (NODE_BIN / "protoc-gen-es").exists():
        pytest.fail(f"{NODE_BIN.relative_to(ROOT)}/protoc-gen-es is missing: run `make node-deps`")
    out = tmp_path_factory.mktemp("clients")
    env = {**os.environ, "PATH": os.pathsep.join((str(NODE_BIN), str(BIN), os.environ["PATH"]))}
    _run(BUF, "generate", "--template", json.dumps(_offline_template(out)), cwd=PROTOS, env=env)
    return out


def test_buf_gen_yaml_generates_every_api_file_for_typescript_and_python(
    generated: Path,
) -> None:
    v1 = Path("audience") / "v1"
    assert sorted(p.name for p in (generated / "ts" / v1).iterdir()) == sorted(
        f"{stem}_pb.ts" for stem in PROTOS_IN_API
    )
    assert sorted(p.name for p in (generated / "python" / v1).iterdir()) == sorted(
        f"{stem}_pb2.{suffix}" for stem in PROTOS_IN_API for suffix in ("py", "pyi")
    )


def test_generated_typescript_type_checks_with_a_request_built_from_it(generated: Path) -> None:
    (generated / "use.ts").write_text(TYPESCRIPT_USE)
    (generated / "tsconfig.json").write_text(
        json.dumps(
            {
                "compilerOptions": {
                    "strict": True,
                    "noEmit": True,
                    "target": "es2022",
                    "module": "esnext",
                    "moduleResolution": "bundler",
                    "types": [],
                },
                "include": ["ts/**/*.ts", "use.ts"],
            }
        )
    )
    # The runtime the generated code imports is the client's own @bufbuild/protobuf.
    modules = generated / "node_modules"
    if not modules.exists():
        modules.symlink_to(NODE_BIN.parent, target_is_directory=True)
    _run(NODE_BIN / "tsc", "--project", generated / "tsconfig.json", cwd=generated)


def test_generated_python_imports_and_round_trips_a_request(generated: Path) -> None:
    python = generated / "python"
    # Regular packages first on the path, so that they shadow the repo's own audience.v1.
    (python / "audience" / "__init__.py").touch()
    (python / "audience" / "v1" / "__init__.py").touch()
    env = {**os.environ, "PYTHONPATH": str(python)}
    _run(sys.executable, "-c", PYTHON_USE, python, *PROTOS_IN_API, cwd=generated, env=env)
