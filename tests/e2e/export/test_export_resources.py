"""ExportService resources over gRPC: destinations, schedules, webhook subscriptions and the
errors a client gets for bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2

from audience.errors import decode
from audience.v1 import export_pb2, export_service_pb2, export_service_pb2_grpc, membership_pb2
from services.export.app import DEFINITION
from tests.e2e.conftest import RunningSuite, StartSuite, new_dataset

pytestmark = pytest.mark.e2e


@pytest.fixture
async def suite(start_suite: StartSuite, tmp_path: Path) -> AsyncIterator[RunningSuite]:
    async with start_suite([DEFINITION], {"AUDIENCE_EXPORT_ROOT": str(tmp_path)}) as running:
        yield running


def stub(suite: RunningSuite) -> export_service_pb2_grpc.ExportServiceStub:
    return export_service_pb2_grpc.ExportServiceStub(suite.channel)


async def folder(
    api: export_service_pb2_grpc.ExportServiceStub, dataset: str, path: Path, name: str = "out"
) -> export_pb2.Destination:
    response = await api.CreateDestination(
        export_service_pb2.CreateDestinationRequest(
            parent=f"datasets/{dataset}",
            destination_id=name,
            destination=export_pb2.Destination(
                display_name="Out", folder=export_pb2.FolderTarget(path=str(path))
            ),
        )
    )
    destination: export_pb2.Destination = response.destination
    return destination


async def test_destinations_are_created_read_listed_updated_and_deleted(
    suite: RunningSuite, tmp_path: Path
) -> None:
    api, dataset = stub(suite), new_dataset()
    created = await folder(api, dataset, tmp_path / "a")
    await folder(api, dataset, tmp_path / "b", "second")

    got = await api.GetDestination(export_service_pb2.GetDestinationRequest(name=created.name))
    first_page = await api.ListDestinations(
        export_service_pb2.ListDestinationsRequest(parent=f"datasets/{dataset}", page_size=1)
    )
    second_page = await api.ListDestinations(
        export_service_pb2.ListDestinationsRequest(
            parent=f"datasets/{dataset}", page_size=1, page_token=first_page.next_page_token
        )
    )
    changed = export_pb2.Destination(name=created.name, etag=created.etag, display_name="New")
    updated = await api.UpdateDestination(
        export_service_pb2.UpdateDestinationRequest(
            destination=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
        )
    )

    assert got.destination == created
    assert created.name == f"datasets/{dataset}/destinations/out"
    assert [d.name for d in [*first_page.destinations, *second_page.destinations]] == [
        created.name,
        f"datasets/{dataset}/destinations/second",
    ]
    assert second_page.next_page_token == ""
    assert updated.destination.display_name == "New"
    assert updated.destination.folder.path == str(tmp_path / "a")
    assert updated.destination.etag != created.etag

    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await api.DeleteDestination(
            export_service_pb2.DeleteDestinationRequest(name=created.name, etag=created.etag)
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED

    await api.DeleteDestination(export_service_pb2.DeleteDestinationRequest(name=created.name))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await api.GetDestination(export_service_pb2.GetDestinationRequest(name=created.name))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_folder_outside_the_export_root_is_refused_naming_the_field(
    suite: RunningSuite,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await folder(stub(suite), new_dataset(), Path("/etc"))

    error = decode(raised.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == ["destination.folder.path"]


async def test_an_sftp_destination_keeps_only_the_name_of_its_secret(suite: RunningSuite) -> None:
    response = await stub(suite).CreateDestination(
        export_service_pb2.CreateDestinationRequest(
            parent=f"datasets/{new_dataset()}",
            destination_id="partner",
            destination=export_pb2.Destination(
                sftp=export_pb2.SftpTarget(
                    host="sftp.example.com",
                    path="/incoming",
                    username="feed",
                    credential_secret="PARTNER",
                )
            ),
        )
    )

    assert response.destination.sftp.credential_secret == "AUDIENCE_SECRET_PARTNER"
    assert response.destination.sftp.port == 22


def template(dataset: str, destination: str) -> export_pb2.ExportJob:
    return export_pb2.ExportJob(
        segments=[f"datasets/{dataset}/segments/vip"],
        mode=export_pb2.EXPORT_MODE_DELTA,
        destination=destination,
        file_name_template="{segment}-{date}.csv",
    )


async def test_a_schedule_computes_its_next_run_and_holds_its_destination(
    suite: RunningSuite, tmp_path: Path
) -> None:
    api, dataset = stub(suite), new_dataset()
    destination = await folder(api, dataset, tmp_path)
    created = await api.CreateSchedule(
        export_service_pb2.CreateScheduleRequest(
            parent=f"datasets/{dataset}",
            schedule_id="nightly",
            schedule=export_pb2.Schedule(
                cron="0 2 * * *",
                time_zone="Europe/Paris",
                job_template=template(dataset, destination.name),
            ),
        )
    )
    schedule = created.schedule

    assert schedule.HasField("next_run_time")
    assert schedule.job_template.file_name_template == "{segment}-{date}.csv"
    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await api.DeleteDestination(
            export_service_pb2.DeleteDestinationRequest(name=destination.name)
        )
    assert decode(in_use.value).reason == "DESTINATION_IN_USE"

    paused = await api.UpdateSchedule(
        export_service_pb2.UpdateScheduleRequest(
            schedule=export_pb2.Schedule(name=schedule.name, paused=True),
            update_mask=field_mask_pb2.FieldMask(paths=["paused"]),
        )
    )
    assert paused.schedule.paused
    assert not paused.schedule.HasField("next_run_time")


@pytest.mark.parametrize(
    ("cron", "time_zone", "field"),
    [("0 2 * *", "UTC", "schedule.cron"), ("0 2 * * *", "Nowhere/City", "schedule.time_zone")],
)
async def test_a_schedule_with_a_bad_cron_or_zone_is_refused(
    suite: RunningSuite, tmp_path: Path, cron: str, time_zone: str, field: str
) -> None:
    api, dataset = stub(suite), new_dataset()
    destination = await folder(api, dataset, tmp_path)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.CreateSchedule(
            export_service_pb2.CreateScheduleRequest(
                parent=f"datasets/{dataset}",
                schedule_id="s",
                schedule=export_pb2.Schedule(
                    cron=cron, time_zone=time_zone, job_template=template(dataset, destination.name)
                ),
            )
        )

    error = decode(raised.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == [field]


async def test_a_job_for_a_missing_destination_is_not_found(suite: RunningSuite) -> None:
    dataset = new_dataset()

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub(suite).CreateExportJob(
            export_service_pb2.CreateExportJobRequest(
                parent=f"datasets/{dataset}",
                export_job=template(dataset, f"datasets/{dataset}/destinations/none"),
            )
        )

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_job_of_another_datasets_segment_is_refused(
    suite: RunningSuite, tmp_path: Path
) -> None:
    api, dataset = stub(suite), new_dataset()
    destination = await folder(api, dataset, tmp_path)
    job = template(dataset, destination.name)
    job.segments[:] = ["datasets/elsewhere/segments/vip"]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.CreateExportJob(
            export_service_pb2.CreateExportJobRequest(parent=f"datasets/{dataset}", export_job=job)
        )

    error = decode(raised.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == ["export_job.segments[0]"]


async def test_a_webhook_secret_is_never_returned(suite: RunningSuite) -> None:
    api, dataset = stub(suite), new_dataset()
    created = await api.CreateWebhookSubscription(
        export_service_pb2.CreateWebhookSubscriptionRequest(
            parent=f"datasets/{dataset}",
            webhook_subscription_id="crm",
            webhook_subscription=export_pb2.WebhookSubscription(
                url="https://crm.example.com/audience",
                secret="0123456789abcdef0123",
                kinds=[membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN],
            ),
        )
    )
    subscription = created.webhook_subscription
    got = await api.GetWebhookSubscription(
        export_service_pb2.GetWebhookSubscriptionRequest(name=subscription.name)
    )
    dead = await api.ListWebhookDeliveries(
        export_service_pb2.ListWebhookDeliveriesRequest(parent=subscription.name)
    )

    assert subscription.secret == got.webhook_subscription.secret == ""
    assert subscription.max_attempts == 8
    assert list(subscription.kinds) == [membership_pb2.MEMBERSHIP_CHANGE_KIND_JOIN]
    assert list(dead.webhook_deliveries) == []


async def test_a_webhook_with_a_short_secret_is_refused(suite: RunningSuite) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub(suite).CreateWebhookSubscription(
            export_service_pb2.CreateWebhookSubscriptionRequest(
                parent=f"datasets/{new_dataset()}",
                webhook_subscription_id="crm",
                webhook_subscription=export_pb2.WebhookSubscription(
                    url="https://crm.example.com/audience", secret="short"
                ),
            )
        )

    assert [v.field for v in decode(raised.value).violations] == ["webhook_subscription.secret"]


async def test_a_display_name_over_200_characters_is_refused(suite: RunningSuite) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub(suite).CreateDestination(
            export_service_pb2.CreateDestinationRequest(
                parent=f"datasets/{new_dataset()}",
                destination_id="partner",
                destination=export_pb2.Destination(
                    display_name="x" * 201,
                    sftp=export_pb2.SftpTarget(
                        host="h", path="/in", username="u", credential_secret="S"
                    ),
                ),
            )
        )

    assert [v.field for v in decode(raised.value).violations] == ["destination.display_name"]
