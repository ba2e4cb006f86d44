"""Authentication: the key file, the scope of every RPC, and the datasets every request
names, checked against the service descriptors so that a new RPC or field cannot slip by."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pkgutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

import audience.v1
from audience.auth import (
    RESOURCE_FIELDS,
    RPC_SCOPES,
    ApiKey,
    AuthConfig,
    KeyRing,
    generate_api_key,
    hash_api_key,
    load_or_create_dev_key,
    parse_api_keys,
    read_dev_key,
    requested_datasets,
    top_level_resource_fields,
)
from audience.config import CommonConfig, ConfigError
from audience.errors import AudienceError
from audience.security import Security
from audience.v1 import (
    export_pb2,
    export_service_pb2,
    ingest_service_pb2,
    profile_service_pb2,
    rule_pb2,
    segment_pb2,
    segment_service_pb2,
)

ROOT = Path(__file__).resolve().parents[2]

# Every string field a request can carry that is *not* a resource name, with why. A new
# string field reachable from a request fails `test_every_string_field_..._is_classified`
# until it is put here or in audience.auth.RESOURCE_FIELDS.
NOT_RESOURCE_NAMES = frozenset(
    {
        # Ids of new resources, under a parent that is checked.
        "audience.v1.CreateDestinationRequest.destination_id",
        "audience.v1.CreateExportJobRequest.export_job_id",
        "audience.v1.CreateScheduleRequest.schedule_id",
        "audience.v1.CreateSegmentRequest.segment_id",
        "audience.v1.CreateWebhookSubscriptionRequest.webhook_subscription_id",
        # Opaque tokens and checksums; the services tie them to the request's resource (a
        # resume token carries its dataset's checksum).
        "audience.v1.DeleteDestinationRequest.etag",
        "audience.v1.DeleteScheduleRequest.etag",
        "audience.v1.DeleteSegmentRequest.etag",
        "audience.v1.DeleteWebhookSubscriptionRequest.etag",
        "audience.v1.Destination.etag",
        "audience.v1.Schedule.etag",
        "audience.v1.Segment.etag",
        "audience.v1.WebhookSubscription.etag",
        "audience.v1.ListAccountProfilesRequest.page_token",
        "audience.v1.ListAggregatesRequest.page_token",
        "audience.v1.ListDestinationsRequest.page_token",
        "audience.v1.ListExportJobsRequest.page_token",
        "audience.v1.ListFailedEventsRequest.page_token",
        "audience.v1.ListMembershipsRequest.page_token",
        "audience.v1.ListProfileEventsRequest.page_token",
        "audience.v1.ListSchedulesRequest.page_token",
        "audience.v1.ListSegmentMembersRequest.page_token",
        "audience.v1.ListSegmentsRequest.page_token",
        "audience.v1.ListWebhookDeliveriesRequest.page_token",
        "audience.v1.ListWebhookSubscriptionsRequest.page_token",
        "audience.v1.WatchMembershipChangesRequest.resume_token",
        # Ids within the dataset of the request (profiles, identities, members).
        "audience.v1.Event.account_id",
        "audience.v1.Event.anonymous_id",
        "audience.v1.Event.event_id",
        "audience.v1.Event.user_id",
        "audience.v1.Identity.type",
        "audience.v1.Identity.value",
        "audience.v1.ImportedIds.ids",
        "audience.v1.ProfileIdList.profile_ids",
        "audience.v1.AggregateSpec.aggregate_id",
        "audience.v1.ExportColumn.identity_type",
        # Rule text: the rule validator keeps its segment references in the dataset.
        "audience.v1.PreviewSegmentRequest.rule_text",
        "audience.v1.Segment.rule_text",
        "audience.v1.ValidateRuleRequest.rule_text",
        # Rule and aggregate vocabulary: event names, attribute paths, values.
        "audience.v1.AffinityCondition.value",
        "audience.v1.AggregateSpec.event_name",
        "audience.v1.AggregateSpec.property",
        "audience.v1.AttributeCondition.path",
        "audience.v1.BehaviorCondition.event_name",
        "audience.v1.BehaviorCondition.property",
        "audience.v1.CampaignCondition.campaign_id",
        "audience.v1.PropertyFilter.path",
        "audience.v1.RandomBucketCondition.salt",
        "audience.v1.Value.string_value",
        "audience.v1.ValueMap.FieldsEntry.key",
        "audience.v1.ListProfileEventsRequest.event_name",
        "audience.v1.ListFailedEventsRequest.reason",
        "audience.v1.ReplayFailedEventsRequest.reason",
        "google.protobuf.FieldMask.paths",
        # Event payload.
        "audience.v1.AccountUpdate.TraitsEntry.key",
        "audience.v1.CampaignInteraction.campaign_id",
        "audience.v1.CampaignInteraction.creative_id",
        "audience.v1.Cart.currency",
        "audience.v1.CartItem.brand",
        "audience.v1.CartItem.category",
        "audience.v1.CartItem.name",
        "audience.v1.CartItem.product_id",
        "audience.v1.Context.ip",
        "audience.v1.Context.locale",
        "audience.v1.Context.session_id",
        "audience.v1.Context.source",
        "audience.v1.Context.user_agent",
        "audience.v1.Device.browser",
        "audience.v1.Device.browser_version",
        "audience.v1.Device.model",
        "audience.v1.Device.os",
        "audience.v1.Device.os_version",
        "audience.v1.Event.PropertiesEntry.key",
        "audience.v1.Event.name",
        "audience.v1.Identify.TraitsEntry.key",
        "audience.v1.Location.city",
        "audience.v1.Location.country",
        "audience.v1.Location.postal_code",
        "audience.v1.Location.region",
        "audience.v1.Location.time_zone",
        "audience.v1.Order.coupon",
        "audience.v1.Order.currency",
        "audience.v1.Order.order_id",
        "audience.v1.Page.path",
        "audience.v1.Page.referrer",
        "audience.v1.Page.search",
        "audience.v1.Page.title",
        "audience.v1.Page.url",
        "audience.v1.Utm.campaign",
        "audience.v1.Utm.content",
        "audience.v1.Utm.medium",
        "audience.v1.Utm.source",
        "audience.v1.Utm.term",
        # Labels, descriptions and output-only text of resources.
        "audience.v1.BackfillProgress.error",
        "audience.v1.Destination.display_name",
        "audience.v1.ExportJob.error",
        "audience.v1.ExportJob.file_path",
        "audience.v1.ExportJob.sha256",
        "audience.v1.Schedule.cron",
        "audience.v1.Schedule.display_name",
        "audience.v1.Schedule.time_zone",
        "audience.v1.Segment.LabelsEntry.key",
        "audience.v1.Segment.LabelsEntry.value",
        "audience.v1.Segment.description",
        "audience.v1.Segment.display_name",
        "audience.v1.WebhookSubscription.display_name",
        # Export settings; editing destinations needs the admin scope (see RPC_SCOPES).
        "audience.v1.ExportColumn.attribute_path",
        "audience.v1.ExportColumn.header",
        "audience.v1.ExportJob.file_name_template",
        "audience.v1.FolderTarget.path",
        "audience.v1.SftpTarget.credential_secret",
        "audience.v1.SftpTarget.host",
        "audience.v1.SftpTarget.known_host_key",
        "audience.v1.SftpTarget.path",
        "audience.v1.SftpTarget.username",
        "audience.v1.WebhookSubscription.secret",
        "audience.v1.WebhookSubscription.url",
    }
)


def _services() -> list[ServiceDescriptor]:
    found = []
    for module in pkgutil.iter_modules(audience.v1.__path__):
        if module.name.endswith("_service_pb2"):
            imported = importlib.import_module(f"audience.v1.{module.name}")
            found.extend(imported.DESCRIPTOR.services_by_name.values())
    return found


def _reachable(root: Descriptor) -> Iterator[Descriptor]:
    seen: set[str] = set()
    stack = [root]
    while stack:
        message_type = stack.pop()
        if message_type.full_name in seen:
            continue
        seen.add(message_type.full_name)
        yield message_type
        stack.extend(f.message_type for f in message_type.fields if f.message_type is not None)


def _string_fields(root: Descriptor) -> set[str]:
    return {
        f.full_name
        for message_type in _reachable(root)
        for f in message_type.fields
        if f.type == FieldDescriptor.TYPE_STRING
    }


def _requests() -> list[Descriptor]:
    return [method.input_type for service in _services() for method in service.methods]


def test_the_services_are_found() -> None:
    names = {service.full_name for service in _services()}

    assert names == {
        "audience.v1.IngestService",
        "audience.v1.ProfileService",
        "audience.v1.SegmentService",
        "audience.v1.MembershipService",
        "audience.v1.ExportService",
    }


def test_every_rpc_of_every_service_has_a_scope_and_no_scope_is_stale() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for service in _services()
        for method in service.methods
    }

    assert sorted(methods - set(RPC_SCOPES)) == []
    assert sorted(set(RPC_SCOPES) - methods) == []


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("/audience.v1.IngestService/SendEvents", "write"),
        ("/audience.v1.IngestService/ReplayFailedEvents", "admin"),
        ("/audience.v1.ProfileService/EraseProfile", "admin"),
        ("/audience.v1.ProfileService/MergeProfiles", "admin"),
        ("/audience.v1.ProfileService/QueryProfiles", "read"),
        ("/audience.v1.SegmentService/DeleteSegment", "admin"),
        ("/audience.v1.SegmentService/ImportSegmentMembers", "write"),
        ("/audience.v1.MembershipService/WatchMembershipChanges", "read"),
        ("/audience.v1.ExportService/ExportSegmentCsv", "read"),
        ("/audience.v1.ExportService/CreateDestination", "admin"),
        ("/audience.v1.ExportService/RunSchedule", "write"),
    ],
)
def test_scopes_follow_the_documented_rules(method: str, scope: str) -> None:
    assert RPC_SCOPES[method] == scope


def test_every_request_of_every_rpc_names_a_dataset_somewhere() -> None:
    for request in _requests():
        assert _string_fields(request) & RESOURCE_FIELDS, f"{request.full_name} names no dataset"


def test_every_string_field_a_request_can_carry_is_classified() -> None:
    reachable = set().union(*(_string_fields(request) for request in _requests()))

    assert not RESOURCE_FIELDS & NOT_RESOURCE_NAMES
    assert sorted(reachable - RESOURCE_FIELDS - NOT_RESOURCE_NAMES) == []
    assert sorted(RESOURCE_FIELDS - reachable) == [], "stale resource fields"
    assert sorted(NOT_RESOURCE_NAMES - reachable) == [], "stale classifications"


def _documented_resource_fields() -> set[str]:
    """Fields whose proto comment shows a `datasets/...` name, read from the sources."""
    include = files("grpc_tools") / "_proto"
    protos = sorted(
        str(path.relative_to(ROOT / "protos")) for path in (ROOT / "protos").rglob("*.proto")
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "protos"),
            "-I",
            str(include),
            "--include_source_info",
            "--descriptor_set_out=/dev/stdout",
            *protos,
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(result.stdout)
    documented: set[str] = set()
    for file in descriptors.file:
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}

        def visit(
            messages: list[descriptor_pb2.DescriptorProto],
            prefix: str,
            path: tuple[int, ...],
            comments: dict[tuple[int, ...], str] = comments,
        ) -> None:
            for index, message in enumerate(messages):
                here = (*path, index)
                for number, field in enumerate(message.field):
                    if "`datasets/" in comments.get((*here, 2, number), ""):
                        documented.add(f"{prefix}{message.name}.{field.name}")
                visit(list(message.nested_type), f"{prefix}{message.name}.", (*here, 3), comments)

        visit(list(file.message_type), f"{file.package}.", (4,))
    return documented


def test_fields_documented_as_resource_names_are_resource_fields() -> None:
    reachable = set().union(*(_string_fields(request) for request in _requests()))
    documented = _documented_resource_fields()

    assert "audience.v1.SegmentCondition.segment" in documented
    assert sorted((documented & reachable) - RESOURCE_FIELDS) == []


def test_datasets_are_found_at_any_depth_with_their_paths() -> None:
    rule = rule_pb2.Rule(
        all=rule_pb2.RuleGroup(
            rules=[
                rule_pb2.Rule(attribute=rule_pb2.AttributeCondition(path="attributes.plan")),
                rule_pb2.Rule(segment=rule_pb2.SegmentCondition(segment="datasets/b/segments/s")),
            ]
        )
    )
    request = segment_service_pb2.UpdateSegmentRequest(
        segment=segment_pb2.Segment(name="datasets/a/segments/x", rule=rule)
    )

    found = requested_datasets(request)

    assert ("segment.name", "a") in found
    assert len(found) == 2
    path = next(where for where, dataset in found if dataset == "b")
    assert path.startswith("segment.rule.")
    assert path.endswith(".segment.segment")


def test_repeated_and_nested_names_are_all_read_and_empty_ones_skipped() -> None:
    schedule = export_pb2.Schedule(
        job_template=export_pb2.ExportJob(
            segments=["datasets/a/segments/x", "datasets/c/segments/y"],
            destination="datasets/d/destinations/z",
        )
    )
    request = export_service_pb2.CreateScheduleRequest(parent="datasets/a", schedule=schedule)

    assert sorted(requested_datasets(request)) == [
        ("parent", "a"),
        ("schedule.job_template.destination", "d"),
        ("schedule.job_template.segments[0]", "a"),
        ("schedule.job_template.segments[1]", "c"),
    ]
    assert requested_datasets(ingest_service_pb2.SendEventsRequest()) == []
    merge = profile_service_pb2.MergeProfilesRequest(
        target="datasets/a/profiles/1", sources=["datasets/a/profiles/2", "datasets/e/profiles/3"]
    )
    assert [dataset for _, dataset in requested_datasets(merge)] == ["a", "a", "e"]


@pytest.mark.parametrize("name", ["shop", "projects/x", "datasets/", "/datasets/a", "datasets"])
def test_a_name_outside_any_dataset_is_an_invalid_argument(name: str) -> None:
    with pytest.raises(AudienceError) as caught:
        requested_datasets(segment_service_pb2.GetSegmentRequest(name=name))

    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_RESOURCE_NAME"
    assert [violation.field for violation in caught.value.violations] == ["name"]


def test_the_first_path_segment_is_the_dataset_whatever_follows() -> None:
    # The services read the dataset the same way, so a crafted name cannot make the two
    # disagree about which dataset it is in.
    request = segment_service_pb2.GetSegmentRequest(name="datasets/a/segments/../../datasets/b")

    assert requested_datasets(request) == [("name", "a")]


# --- keys ----------------------------------------------------------------------------------


def _entry(**overrides: object) -> dict[str, object]:
    return {
        "name": "crm",
        "sha256": hash_api_key("k" * 40),
        "datasets": ["shop"],
        "scopes": ["read", "write"],
        **overrides,
    }


def test_a_key_hash_is_the_sha256_that_sha256sum_prints() -> None:
    key = generate_api_key()

    assert key.startswith("aud_")
    assert len(key) >= 40
    assert hash_api_key(key) == hashlib.sha256(key.encode()).hexdigest()


def test_keys_are_parsed_with_their_datasets_and_scopes() -> None:
    keys = parse_api_keys(
        json.dumps(
            [
                _entry(),
                _entry(
                    name="ops",
                    sha256=hash_api_key("o" * 40).upper(),
                    datasets=["*"],
                    scopes=["admin"],
                ),
            ]
        ),
        "AUDIENCE_API_KEYS",
    )

    crm, ops = keys
    assert crm == ApiKey(
        "crm", hash_api_key("k" * 40), frozenset({"shop"}), frozenset({"read", "write"})
    )
    assert ops.datasets is None
    assert ops.may_use("anything")
    assert not crm.may_use("other")
    ring = KeyRing(keys)
    assert ring.find("o" * 40) == ops
    assert ring.find("x" * 40) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "invalid JSON"),
        ("{}", "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ("[1]", "key 0: expected an object"),
        (json.dumps([_entry(dataset=["shop"])]), "unknown field(s) 'dataset'"),
        (json.dumps([_entry(name="has space")]), "key 0: name must be"),
        (json.dumps([_entry(sha256="aud_the-key-itself")]), "not the key itself"),
        (json.dumps([_entry(datasets=[])]), "datasets must be a non-empty list"),
        (json.dumps([_entry(datasets=["*", "shop"])]), 'either ["*"] or a list'),
        (json.dumps([_entry(datasets=["Shop"])]), "dataset ids are"),
        (json.dumps([_entry(scopes=["delete"])]), "scopes must be a non-empty list"),
        (json.dumps([_entry(), _entry(sha256=hash_api_key("z" * 40))]), "used twice"),
        (json.dumps([_entry(), _entry(name="other")]), "same sha256"),
    ],
)
def test_bad_key_lists_are_refused_naming_the_variable_and_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_api_keys(text, "AUDIENCE_API_KEYS")

    assert str(caught.value).startswith("AUDIENCE_API_KEYS: ")
    assert message in str(caught.value)
    assert "aud_the-key-itself" not in str(caught.value)


def test_keys_come_from_the_variable_or_a_file_but_not_both(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([_entry()]))

    from_file = AuthConfig.from_env({"AUDIENCE_API_KEYS_FILE": str(path)})
    assert [key.name for key in from_file.keys] == ["crm"]
    assert from_file.keys_source == "AUDIENCE_API_KEYS_FILE"
    with pytest.raises(ConfigError, match="both set"):
        AuthConfig.from_env(
            {"AUDIENCE_API_KEYS_FILE": str(path), "AUDIENCE_API_KEYS": json.dumps([_entry()])}
        )
    with pytest.raises(ConfigError, match=r"^AUDIENCE_API_KEYS_FILE: cannot read"):
        AuthConfig.from_env({"AUDIENCE_API_KEYS_FILE": str(tmp_path / "missing.json")})
    path.write_text("not json")
    with pytest.raises(ConfigError, match=r"^AUDIENCE_API_KEYS_FILE \(.*\): expected a JSON"):
        AuthConfig.from_env({"AUDIENCE_API_KEYS_FILE": str(path)})


def test_the_internal_key_must_be_accepted_for_every_dataset_with_read_and_write() -> None:
    internal = "i" * 40
    accepted = _entry(name="internal", sha256=hash_api_key(internal), datasets=["*"])

    def config(*entries: dict[str, object], key: str | None = internal) -> AuthConfig:
        environ = {"AUDIENCE_API_KEYS": json.dumps(list(entries))}
        if key is not None:
            environ["AUDIENCE_INTERNAL_API_KEY"] = key
        return AuthConfig.from_env(environ)

    assert config(_entry(), accepted).internal_entry().name == "internal"
    with pytest.raises(ConfigError, match=r"^AUDIENCE_INTERNAL_API_KEY: required"):
        config(_entry(), key=None).internal_entry()
    with pytest.raises(ConfigError, match="not among the keys"):
        config(_entry()).internal_entry()
    with pytest.raises(ConfigError, match=r"needs datasets \[\"\*\"\]"):
        config(_entry(name="internal", sha256=hash_api_key(internal))).internal_entry()
    with pytest.raises(ConfigError, match="scopes read and write"):
        config({**accepted, "scopes": ["read"]}).internal_entry()
    with pytest.raises(ConfigError, match="at least 32 characters"):
        config(_entry(), key="short")


# --- the two ways to run ---------------------------------------------------------------------


def _security(environ: dict[str, str], *, embedded: bool) -> Security:
    common = CommonConfig.from_env(environ)
    return Security.from_env(environ, common, embedded=embedded)


def test_authentication_is_on_unless_disabled_by_name(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"^AUDIENCE_API_KEYS: required"):
        _security({}, embedded=False)
    embedded = _security({"AUDIENCE_DATA_DIR": str(tmp_path)}, embedded=True)
    assert embedded.keys is not None
    assert embedded.dev_key is not None
    assert embedded.dev_key.created

    with caplog.at_level(logging.WARNING):
        security = _security({"AUDIENCE_AUTH": "disabled"}, embedded=False)

    assert security.keys is None
    assert "AUTHENTICATION IS OFF (AUDIENCE_AUTH=disabled)" in caplog.text


def test_a_service_alone_with_authentication_enabled_needs_keys_and_the_internal_key() -> None:
    with pytest.raises(ConfigError, match=r"^AUDIENCE_API_KEYS: required"):
        _security({"AUDIENCE_AUTH": "enabled"}, embedded=False)
    with pytest.raises(ConfigError, match=r"^AUDIENCE_INTERNAL_API_KEY: required"):
        _security({"AUDIENCE_API_KEYS": json.dumps([_entry()])}, embedded=False)

    internal = "i" * 40
    keys = [_entry(), _entry(name="internal", sha256=hash_api_key(internal), datasets=["*"])]
    security = _security(
        {"AUDIENCE_API_KEYS": json.dumps(keys), "AUDIENCE_INTERNAL_API_KEY": internal},
        embedded=False,
    )
    assert security.keys is not None
    assert [key.name for key in security.keys] == ["crm", "internal"]
    assert security.channels.api_key == internal
    assert "auth = enabled; keys: crm (datasets shop; scopes read,write)" in security.describe()[0]


def test_disabled_authentication_ignores_configured_keys_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        security = _security(
            {"AUDIENCE_AUTH": "disabled", "AUDIENCE_API_KEYS": json.dumps([_entry()])},
            embedded=False,
        )

    assert security.keys is None
    assert "the configured keys are ignored" in caplog.text


def test_the_embedded_suite_makes_a_development_key_once_readable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    environ = {"AUDIENCE_AUTH": "enabled", "AUDIENCE_DATA_DIR": str(tmp_path / "data")}

    first = _security(environ, embedded=True)
    again = _security(environ, embedded=True)

    assert first.dev_key is not None
    assert again.dev_key is not None
    assert first.dev_key.created
    assert not again.dev_key.created
    assert first.dev_key.key == again.dev_key.key == read_dev_key(tmp_path / "data")
    assert stat.S_IMODE(os.stat(first.dev_key.path).st_mode) == 0o600
    assert first.keys is not None
    dev = first.keys.find(first.dev_key.key)
    assert dev is not None
    assert dev.datasets is None
    assert dev.scopes == {"read", "write", "admin"}
    # The services of the process call each other with a key of the run, never printed.
    assert first.channels.api_key is not None
    assert first.channels.api_key != again.channels.api_key
    internal = first.keys.find(first.channels.api_key)
    assert internal is not None
    assert internal.scopes == {"read", "write"}


def test_a_development_key_file_readable_by_others_is_made_private(tmp_path: Path) -> None:
    key, created = load_or_create_dev_key(tmp_path)
    (tmp_path / "dev-api-key").chmod(0o644)

    assert load_or_create_dev_key(tmp_path) == (key, False)
    assert stat.S_IMODE(os.stat(tmp_path / "dev-api-key").st_mode) == 0o600
    assert created


def test_the_embedded_suite_uses_configured_keys_instead_of_a_development_key(
    tmp_path: Path,
) -> None:
    security = _security(
        {"AUDIENCE_API_KEYS": json.dumps([_entry()]), "AUDIENCE_DATA_DIR": str(tmp_path)},
        embedded=True,
    )

    assert security.dev_key is None
    assert security.keys is not None
    assert [key.name for key in security.keys] == ["crm", "internal"]
    assert not (tmp_path / "dev-api-key").exists()


def test_check_command_validates_and_describes_security() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "audience.config", "--check"],
        env={**clean, "AUDIENCE_API_KEYS": json.dumps([_entry()]), "AUDIENCE_AUTH": "enabled"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr.strip() == (
        "configuration error: AUDIENCE_INTERNAL_API_KEY: required when authentication is "
        "enabled (the key this service presents to the others; its sha256 must be in "
        'AUDIENCE_API_KEYS with datasets ["*"] and scopes read and write)'
    )


def test_a_request_naming_no_dataset_is_told_the_field_even_when_it_wraps_its_resource() -> None:
    # DATASET_REQUIRED is an INVALID_ARGUMENT, whose field violations must name a field.
    for service in _services():
        for method in service.methods:
            request = GetMessageClass(method.input_type)()
            assert top_level_resource_fields(request), method.full_name
    wrapped = segment_service_pb2.UpdateSegmentRequest()
    assert top_level_resource_fields(wrapped) == ["segment.name"]
    assert top_level_resource_fields(segment_service_pb2.GetSegmentRequest()) == ["name"]
