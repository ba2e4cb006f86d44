"""TLS and mutual TLS from configuration, with certificates made for the test; and the CLI
reaching a server that wants TLS and a key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from click.testing import CliRunner, Result
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audience import errors
from audience.auth import DEV_KEY_FILE
from audience.channels import ChannelSettings, open_channel
from audience.cli.main import cli
from audience.config import CommonConfig, ConfigError
from audience.tls import ClientTls, ServerTls
from audience.v1 import segment_pb2, segment_service_pb2, segment_service_pb2_grpc
from tests.auth_support import AUTH_ENVIRONMENT, SHOP_READER, Authority, Seen, secured_host

pytestmark = pytest.mark.integration

GET = segment_service_pb2.GetSegmentRequest(name="datasets/shop/segments/vip")


@dataclass(frozen=True)
class Pki:
    """A CA with a server certificate for localhost and a client certificate, and a second,
    unrelated CA with a client certificate of its own."""

    directory: Path
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger_ca: Path
    stranger: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ours = Authority.create("ours")
    other = Authority.create("other")
    return Pki(
        directory=directory,
        ca=ours.write(directory),
        server=ours.issue(directory, "server", hosts=("localhost", "127.0.0.1")),
        client=ours.issue(directory, "client", client=True),
        stranger_ca=other.write(directory),
        stranger=other.issue(directory, "stranger", client=True),
    )


def _tls_environment(pki: Pki, *, mutual: bool = False) -> dict[str, str]:
    environ = {
        **AUTH_ENVIRONMENT,
        "AUDIENCE_TLS_CERT_FILE": str(pki.server[0]),
        "AUDIENCE_TLS_KEY_FILE": str(pki.server[1]),
    }
    if mutual:
        environ["AUDIENCE_TLS_CLIENT_CA_FILE"] = str(pki.ca)
    return environ


def _settings(tls: ClientTls | None, api_key: str | None = SHOP_READER) -> ChannelSettings:
    common = CommonConfig.from_env({})
    return ChannelSettings(api_key, tls, common.max_message_bytes, common.keepalive)


async def _get(address: str, settings: ChannelSettings) -> segment_pb2.Segment:
    async with open_channel(address, settings) as channel:
        stub = segment_service_pb2_grpc.SegmentServiceStub(channel)
        response = await stub.GetSegment(GET, timeout=5)
        segment: segment_pb2.Segment = response.segment
        return segment


async def _refused(address: str, settings: ChannelSettings) -> errors.DecodedError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _get(address, settings)
    return errors.decode(caught.value)


@pytest.fixture
async def tls_address(pki: Pki) -> AsyncIterator[str]:
    async with secured_host(_tls_environment(pki)) as (host, security):
        assert security.server_tls is not None
        assert not security.server_tls.mutual
        yield f"127.0.0.1:{host.port}"


@pytest.fixture
async def mtls_address(pki: Pki) -> AsyncIterator[str]:
    async with secured_host(_tls_environment(pki, mutual=True)) as (host, security):
        assert security.server_tls is not None
        assert security.server_tls.mutual
        yield f"127.0.0.1:{host.port}"


async def test_a_tls_server_answers_a_client_that_trusts_its_ca(tls_address: str, pki: Pki) -> None:
    segment = await _get(tls_address, _settings(ClientTls.from_files(str(pki.ca))))

    assert segment.name == GET.name


async def test_a_tls_server_refuses_plaintext_and_clients_that_do_not_trust_it(
    tls_address: str, pki: Pki
) -> None:
    plaintext = await _refused(tls_address, _settings(None))
    distrustful = await _refused(tls_address, _settings(ClientTls.from_files(str(pki.stranger_ca))))

    assert plaintext.code == grpc.StatusCode.UNAVAILABLE
    assert distrustful.code == grpc.StatusCode.UNAVAILABLE


async def test_the_key_is_still_required_over_tls(tls_address: str, pki: Pki) -> None:
    refused = await _refused(tls_address, _settings(ClientTls.from_files(str(pki.ca)), None))

    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")


async def test_the_expected_server_name_can_differ_from_the_address(
    tmp_path: Path, pki: Pki
) -> None:
    authority = Authority.create("named")
    cert, key = authority.issue(tmp_path, "ingest", hosts=("ingest.audience.svc",))
    environ = {
        **AUTH_ENVIRONMENT,
        "AUDIENCE_TLS_CERT_FILE": str(cert),
        "AUDIENCE_TLS_KEY_FILE": str(key),
    }
    ca = str(authority.write(tmp_path))
    async with secured_host(environ) as (host, _):
        address = f"127.0.0.1:{host.port}"
        named = await _get(
            address, _settings(ClientTls.from_files(ca, None, None, "ingest.audience.svc"))
        )
        mismatch = await _refused(address, _settings(ClientTls.from_files(ca)))

    assert named.name == GET.name
    assert mismatch.code == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_serves_a_client_certificate_from_its_ca_only(
    mtls_address: str, pki: Pki
) -> None:
    signed = ClientTls.from_files(str(pki.ca), str(pki.client[0]), str(pki.client[1]))
    foreign = ClientTls.from_files(str(pki.ca), str(pki.stranger[0]), str(pki.stranger[1]))

    assert (await _get(mtls_address, _settings(signed))).name == GET.name
    assert (await _refused(mtls_address, _settings(ClientTls.from_files(str(pki.ca))))).code == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert (await _refused(mtls_address, _settings(foreign))).code == grpc.StatusCode.UNAVAILABLE


def test_tls_configuration_errors_name_the_variable(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cert, key = str(pki.server[0]), str(pki.server[1])

    with pytest.raises(ConfigError, match=r"^AUDIENCE_TLS_KEY_FILE: required with"):
        ServerTls.from_env({"AUDIENCE_TLS_CERT_FILE": cert})
    with pytest.raises(ConfigError, match=r"^AUDIENCE_TLS_CERT_FILE: required with"):
        ServerTls.from_env({"AUDIENCE_TLS_CLIENT_CA_FILE": str(pki.ca)})
    with pytest.raises(ConfigError, match=r"^AUDIENCE_TLS_CERT_FILE/AUDIENCE_TLS_KEY_FILE: "):
        ServerTls.from_env(
            {"AUDIENCE_TLS_CERT_FILE": cert, "AUDIENCE_TLS_KEY_FILE": str(pki.client[1])}
        )
    with pytest.raises(ConfigError, match=r"^AUDIENCE_TLS_CLIENT_CA_FILE: .* is not a PEM file"):
        ServerTls.from_env(
            {
                "AUDIENCE_TLS_CERT_FILE": cert,
                "AUDIENCE_TLS_KEY_FILE": key,
                "AUDIENCE_TLS_CLIENT_CA_FILE": str(not_pem),
            }
        )
    with pytest.raises(ConfigError, match=r"^AUDIENCE_TLS_CA_FILE: .* no usable CA certificate"):
        ClientTls.from_env({"AUDIENCE_TLS_CA_FILE": key})
    with pytest.raises(ConfigError, match=r"^AUDIENCE_TLS_CA_FILE: cannot read"):
        ClientTls.from_env({"AUDIENCE_TLS_CA_FILE": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match=r"^AUDIENCE_TLS_CA_FILE: required with"):
        ClientTls.from_env({"AUDIENCE_TLS_SERVER_NAME": "x"})
    assert ServerTls.from_env({}) is None
    assert ClientTls.from_env({}) is None


async def _cli(*args: str, env: dict[str, str]) -> Result:
    # The CLI runs its own event loop: off this one's thread.
    return await asyncio.to_thread(
        CliRunner().invoke, cli, list(args), env=env, catch_exceptions=False
    )


async def test_the_cli_reaches_a_mutual_tls_server_with_a_key(tmp_path: Path, pki: Pki) -> None:
    data = tmp_path / "data"
    env = {"AUDIENCE_API_KEY": "", "AUDIENCE_DATA_DIR": str(data)}
    seen = Seen()
    async with secured_host(_tls_environment(pki, mutual=True), seen) as (host, _):
        tls = [
            "--address",
            f"localhost:{host.port}",
            "--tls-ca",
            str(pki.ca),
            "--tls-cert",
            str(pki.client[0]),
            "--tls-key",
            str(pki.client[1]),
        ]
        with_key = await _cli(
            "segments", "get", "vip", "--dataset", "shop", *tls, "--api-key", SHOP_READER, env=env
        )
        without_key = await _cli("segments", "get", "vip", "--dataset", "shop", *tls, env=env)
        data.mkdir()
        (data / DEV_KEY_FILE).write_text(SHOP_READER + "\n")
        dev_key = await _cli("segments", "get", "vip", "--dataset", "shop", *tls, env=env)
        health = await _cli("health", *tls, env=env)
        no_cert = await _cli(
            "health", "--address", f"localhost:{host.port}", "--tls-ca", str(pki.ca), env=env
        )

    assert with_key.exit_code == 0, with_key.output
    assert "From the stand-in" in with_key.output
    assert without_key.exit_code != 0
    assert "UNAUTHENTICATED" in without_key.output
    assert dev_key.exit_code == 0, dev_key.output
    assert len(seen.requests) == 2
    assert health.exit_code == 1  # the suite's other services are not hosted here
    assert "audience.v1.SegmentService" in health.output
    assert "SERVING" in health.output
    assert "UNAVAILABLE" in no_cert.output


async def test_a_plaintext_health_port_serves_probes_beside_mutual_tls(pki: Pki) -> None:
    environ = {**_tls_environment(pki, mutual=True), "AUDIENCE_HEALTH_LISTEN": "127.0.0.1:0"}
    async with secured_host(environ) as (host, _):
        assert host.health_port is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{host.health_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="audience.v1.SegmentService"), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await segment_service_pb2_grpc.SegmentServiceStub(channel).GetSegment(
                    GET, timeout=5
                )

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
