"""Frames and messages: round trips, versions, signatures, topics. No broker needed."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest

from device_profiles.plan import TrainingPlan
from edge_runtime.wire import (
    COORDINATOR_SENDER,
    MAGIC,
    PROTOCOL_VERSION,
    Acknowledgement,
    AckStatus,
    AssignmentDecline,
    ChunkHeader,
    CoordinatorStatus,
    DeviceChannel,
    DeviceState,
    EnrollmentRequest,
    EnrollmentResponse,
    FrameError,
    InboxChannel,
    LimitExceededError,
    Limits,
    MessageKind,
    ModelManifest,
    PowerSource,
    ProtocolError,
    SchemaError,
    SecAggEnvelope,
    SecAggStep,
    SignatureError,
    TaskAssignment,
    TaskSpec,
    TransferStatus,
    TransferStatusRequest,
    UnsupportedVersionError,
    Update,
    UpdateEncoding,
    coordinator_status_topic,
    coordinator_subscriptions,
    decode_frame,
    device_subscriptions,
    device_topic,
    encode_frame,
    from_json_fields,
    generate_private_key,
    inbox_topic,
    model_blob_topic,
    model_manifest_topic,
    parse_device_topic,
    public_key_hex,
    to_json_fields,
    update_id,
    verify_enrollment_request,
    verify_frame,
)

KEY = generate_private_key()
SHA = "0f" * 32


def all_messages() -> list[object]:
    """One valid instance of every message kind (the fuzz tests reuse this)."""
    plan = TrainingPlan(
        scheme="nf4", rank=8, batch_size=4, seq_len=128, local_steps=20, learning_rate=1e-3
    )
    spec = TaskSpec("classification", "minilm-l6", ("neg", "pos"), 16.0)
    return [
        EnrollmentRequest("fleet", "dev-1", "req-1", "t" * 32, public_key_hex(KEY), SHA),
        EnrollmentResponse("fleet", "dev-1", "req-1", True, "", public_key_hex(KEY)),
        DeviceState(
            "fleet",
            "dev-1",
            17,
            True,
            False,
            0.5,
            2**30,
            PowerSource.BATTERY,
            SHA,
            ("on battery",),
            42.0,
        ),
        CoordinatorStatus("fleet", 3, True, public_key_hex(KEY)),
        TaskAssignment(
            "fleet", "task", 4, "dev-1", 0, plan, 1.8e9, SHA, spec, UpdateEncoding.INT8, 0.1, 42.5
        ),
        AssignmentDecline("fleet", "task", 4, "dev-1", 0, ("on battery",)),
        Update("fleet", "task", 4, "dev-1", 1, SHA, 100, 20, UpdateEncoding.INT8, {"loss": 0.3}),
        Acknowledgement(
            "fleet", "dev-1", update_id("fleet", "task", 4, "dev-1", 1), AckStatus.DUPLICATE, "seen"
        ),
        ModelManifest("fleet", "task", SHA, 4, 1000, 300, 4, UpdateEncoding.FP32, SHA),
        ChunkHeader("transfer-1", 2, 4, 300, 1000, SHA),
        TransferStatusRequest("transfer-1", "q-1"),
        TransferStatus("transfer-1", "q-1", True, False, (0, 2, 3, 4)),
        SecAggEnvelope(
            "fleet-1", "task-1", 3, "device-1", SecAggStep.MASKED_INPUT, 12, 4, {"train_loss": 0.5}
        ),
    ]


def _plan_from_wire(**fields: object) -> TrainingPlan:
    """A plan decoded as the wire decodes one: a valid plan's JSON with `fields` changed."""
    wire_fields = to_json_fields(TrainingPlan(rank=8, batch_size=1, seq_len=1, local_steps=1))
    return from_json_fields(TrainingPlan, {**wire_fields, **fields}, "plan")


def example(cls: type) -> object:
    """The `all_messages()` instance of `cls`."""
    return next(m for m in all_messages() if type(m) is cls)


def sign_for(message: object) -> dict[str, object]:
    kind = message.KIND  # type: ignore[attr-defined]
    return {"signing_key": KEY} if kind.requires_signature else {}


def test_every_kind_has_an_example() -> None:
    assert {type(m).KIND for m in all_messages()} == set(MessageKind)  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", all_messages(), ids=lambda m: type(m).__name__)
def test_round_trip_every_message(message: object) -> None:
    body = b"\x00body\xff"
    if isinstance(message, ChunkHeader):
        body = b"x" * message.expected_body_bytes
    data = encode_frame(message, sender="dev-1", body=body, sent_at=12.5, **sign_for(message))  # type: ignore[arg-type]
    frame = decode_frame(data)
    assert frame.message == message
    assert frame.body == body
    assert frame.sender == "dev-1"
    assert frame.sent_at == 12.5
    assert frame.message_id == message.message_id  # type: ignore[attr-defined]
    if frame.kind.requires_signature:
        verify_frame(frame, KEY.public_key())


def test_update_id_is_fleet_task_round_device_attempt() -> None:
    update = example(Update)
    assert update.message_id == "update/fleet/task/4/dev-1/1"  # type: ignore[attr-defined]


def _raw_frame(
    header: dict[str, object], version: int = PROTOCOL_VERSION, body: bytes = b""
) -> bytes:
    header_bytes = json.dumps(header).encode()
    return struct.pack(">2sBBI", MAGIC, version, 0, len(header_bytes)) + header_bytes + body


def test_unknown_protocol_version_is_refused_clearly() -> None:
    data = bytearray(encode_frame(TransferStatusRequest("t-1", "q-1"), sender="d", signing_key=KEY))
    data[2] = 9
    with pytest.raises(UnsupportedVersionError, match="version 9.*understands \\[1\\].*upgrade"):
        decode_frame(bytes(data))


def test_header_version_must_match_prefix() -> None:
    header = {"v": 2, "kind": "chunk", "sender": "d", "sent_at": 0, "body": None, "msg": {}}
    with pytest.raises(UnsupportedVersionError, match="header says protocol version 2"):
        decode_frame(_raw_frame(header))


def test_unsigned_state_changing_frame_is_refused() -> None:
    update = example(Update)
    with pytest.raises(SignatureError, match="must be signed"):
        encode_frame(update, sender="dev-1")  # type: ignore[arg-type]
    header = {
        "v": 1,
        "kind": "update",
        "sender": "dev-1",
        "sent_at": 0,
        "body": None,
        "msg": json.loads(json.dumps(dataclasses.asdict(update), default=lambda e: e.value)),
    }
    with pytest.raises(SignatureError, match="unsigned"):
        decode_frame(_raw_frame(header))


def test_forged_and_tampered_frames_fail_verification() -> None:
    update = example(Update)
    forged = decode_frame(encode_frame(update, sender="dev-1", signing_key=generate_private_key()))  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_frame(forged, KEY.public_key())
    data = bytearray(encode_frame(update, sender="dev-1", body=b"abc", signing_key=KEY))  # type: ignore[arg-type]
    data[-1] ^= 0xFF  # body tampered: caught by the header's digest
    with pytest.raises(FrameError, match="sha256"):
        decode_frame(bytes(data))
    data = bytearray(encode_frame(update, sender="dev-1", signing_key=KEY))  # type: ignore[arg-type]
    position = data.index(b'"num_samples":100') + len('"num_samples":')
    data[position] = ord("9")  # header tampered: 100 -> 900
    with pytest.raises(SignatureError):
        verify_frame(decode_frame(bytes(data)), KEY.public_key())


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda h: h.update(kind="teleport"), SchemaError, "unknown message kind"),
        (lambda h: h["msg"].update(extra=1), SchemaError, "unknown field"),
        (lambda h: h["msg"].pop("request_id"), SchemaError, "missing required field"),
        (lambda h: h["msg"].update(request_id=5), SchemaError, "expected a string"),
        (lambda h: h["msg"].update(transfer_id="a/b"), SchemaError, "transfer_id must match"),
        (lambda h: h.update(sent_at="now"), SchemaError, "sent_at"),
        (lambda h: h.update(body={"bytes": 3}), FrameError, "body"),
        (lambda h: h.pop("sender"), FrameError, "header fields"),
    ],
)
def test_schema_errors_name_the_field(mutate, error, match) -> None:  # noqa: ANN001
    header = {
        "v": 1,
        "kind": "transfer_status_request",
        "sender": "d",
        "sent_at": 0,
        "body": None,
        "msg": {"transfer_id": "t-1", "request_id": "q-1"},
    }
    mutate(header)
    data = bytearray(_raw_frame(header))
    data[3] = 0x01  # claim signed ...
    data[8:8] = b"\0" * 64  # ... with a dummy signature so the schema is what fails
    with pytest.raises(error, match=match):
        decode_frame(bytes(data))


def test_limits_are_checked_before_parsing() -> None:
    lying = struct.pack(">2sBBI", MAGIC, 1, 0, 2**31) + b"{}"
    with pytest.raises(LimitExceededError, match="max_header_bytes"):
        decode_frame(lying)
    big = encode_frame(ChunkHeader("t", 0, 1, 2000, 2000, SHA), sender="d", body=b"x" * 2000)
    with pytest.raises(LimitExceededError, match="max_frame_bytes"):
        decode_frame(big, Limits(max_frame_bytes=1000))
    with pytest.raises(FrameError, match="bad magic"):
        decode_frame(b"XX" + big[2:])
    with pytest.raises(FrameError, match="shorter"):
        decode_frame(b"SF")
    with pytest.raises(FrameError, match="must be bytes"):
        decode_frame("text")  # type: ignore[arg-type]


def test_plan_and_message_validation_messages() -> None:
    with pytest.raises(SchemaError, match="TrainingPlan.rank is 0"):
        _plan_from_wire(rank=0)
    with pytest.raises(SchemaError, match="chunk_count must be ceil"):
        ModelManifest("f", "t", SHA, 0, 1000, 300, 3)
    with pytest.raises(SchemaError, match="increasing"):
        TransferStatus("t", "q", True, False, (3, 2))
    status = TransferStatus("t", "q", True, False, (0, 2, 5, 9))
    with pytest.raises(SchemaError, match="reach 9"):
        status.missing_indices(8)
    assert status.missing_indices(9) == [0, 1, 5, 6, 7, 8]
    assert isinstance(SchemaError("x"), ProtocolError)


def test_topics() -> None:
    assert device_topic("f", "d-1", DeviceChannel.UPDATE) == "schoolfl/f/dev/d-1/update"
    assert inbox_topic("f", "d-1", InboxChannel.ACK) == "schoolfl/f/to/d-1/ack"
    assert coordinator_status_topic("f") == "schoolfl/f/coord/status"
    assert model_manifest_topic("f", "t") == "schoolfl/f/coord/model/t/manifest"
    assert model_blob_topic("f", SHA, 3) == f"schoolfl/f/coord/blob/{SHA}/3"
    assert parse_device_topic("schoolfl/f/dev/d-1/chunk") == ("f", "d-1", DeviceChannel.CHUNK)
    assert "schoolfl/f/dev/+/state" in coordinator_subscriptions("f")
    assert device_subscriptions("f", "d-1")[0] == "schoolfl/f/to/d-1/#"
    for bad in ("a/b", "+", "#", "", "x" * 65, " d"):
        with pytest.raises(SchemaError):
            device_topic("f", bad, DeviceChannel.STATE)
    for bad_topic in ("schoolfl/f/to/d/ack", "schoolfl/f/dev/d/teleport", "x/f/dev/d/state"):
        with pytest.raises(SchemaError):
            parse_device_topic(bad_topic)


def test_frame_expect_refuses_other_kinds() -> None:
    frame = decode_frame(encode_frame(TransferStatusRequest("t", "q"), sender="d", signing_key=KEY))
    assert frame.expect(TransferStatusRequest).transfer_id == "t"
    with pytest.raises(SchemaError, match="expected a Update frame"):
        frame.expect(Update)


def test_coordinator_sender_name_is_allowed() -> None:
    status = example(CoordinatorStatus)
    frame = decode_frame(encode_frame(status, sender=COORDINATOR_SENDER, signing_key=KEY))  # type: ignore[arg-type]
    assert frame.sender == COORDINATOR_SENDER


def test_enrollment_request_proves_possession_of_its_key() -> None:
    request = example(EnrollmentRequest)
    good = decode_frame(encode_frame(request, sender="dev-1", signing_key=KEY))  # type: ignore[arg-type]
    assert verify_enrollment_request(good) == request
    other = decode_frame(encode_frame(request, sender="dev-1", signing_key=generate_private_key()))  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_enrollment_request(other)
    wrong_sender = decode_frame(encode_frame(request, sender="dev-2", signing_key=KEY))  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="sent by 'dev-2'"):
        verify_enrollment_request(wrong_sender)


def test_task_spec_and_plan_validation() -> None:
    with pytest.raises(SchemaError, match="kind must be one of"):
        TaskSpec("regression", "minilm-l6")
    with pytest.raises(SchemaError, match="adapter_alpha"):
        TaskSpec("causal-lm", "smollm2-135m", adapter_alpha=float("nan"))
    with pytest.raises(SchemaError, match="learning_rate"):
        _plan_from_wire(learning_rate=0.0)
    with pytest.raises(SchemaError, match="scheme"):
        _plan_from_wire(scheme="nf4/evil")


def _assignment_frame_with(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """The example assignment's frame, its header's message changed by `mutate` (the old
    signature stays: decoding, not verification, is what must refuse it)."""
    frame = decode_frame(encode_frame(example(TaskAssignment), sender="c", signing_key=KEY))  # type: ignore[arg-type]
    header = json.loads(frame.signed_bytes)
    mutate(header["msg"])
    header_bytes = json.dumps(header).encode()
    prefix = struct.pack(">2sBBI", MAGIC, PROTOCOL_VERSION, 0x01, len(header_bytes))
    return prefix + (frame.signature or b"") + header_bytes + frame.body


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("rank", 5000, "plan: TrainingPlan.rank is 5000"),
        ("rank", 0, "TrainingPlan.rank is 0"),
        ("rank", 8.5, "plan.rank: expected an integer"),
        ("seq_len", 0, "TrainingPlan.seq_len is 0"),
        ("seq_len", 1_000_001, "TrainingPlan.seq_len"),
        ("local_steps", 2_000_000, "TrainingPlan.local_steps"),
        ("batch_size", 65537, "TrainingPlan.batch_size"),
        ("learning_rate", 11.0, "TrainingPlan.learning_rate"),
        ("learning_rate", 0.0, "TrainingPlan.learning_rate"),
        ("scheme", "fp8", "TrainingPlan.scheme is 'fp8'"),
        ("scheme", "nf4/evil", "TrainingPlan.scheme"),
        ("target_modules", [], "TrainingPlan.target_modules"),
        ("target_modules", ["q", "lm_head"], "TrainingPlan.target_modules"),
        ("target_modules", ["q"] * 1000, "TrainingPlan.target_modules"),
        ("optimizer_states", 99, "TrainingPlan.optimizer_states"),
    ],
)
def test_assignment_with_an_out_of_bounds_plan_is_refused(
    field: str, value: object, match: str
) -> None:
    frame = _assignment_frame_with(lambda message: message["plan"].update({field: value}))
    with pytest.raises(SchemaError, match=match):
        decode_frame(frame)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda message: message["plan"].pop("rank"), "plan: missing required field 'rank'"),
        (lambda message: message["plan"].pop("seq_len"), "plan: missing required field"),
        (lambda message: message["plan"].update(adapter_rank=8), "plan: unknown field"),
        (lambda message: message.update(update_encoding="zip"), "update_encoding: expected"),
        (lambda message: message.update(top_k_fraction=2.0), "top_k_fraction must be in"),
        (lambda message: message.update(predicted_round_seconds=-1.0), "predicted_round_sec"),
    ],
    ids=["no-rank", "no-seq-len", "old-field-name", "encoding", "top-k", "prediction"],
)
def test_assignment_plan_fields_are_required_and_terms_checked(
    mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    with pytest.raises(SchemaError, match=match):
        decode_frame(_assignment_frame_with(mutate))


def test_assignment_plan_json_uses_the_plan_field_names() -> None:
    frame = decode_frame(encode_frame(example(TaskAssignment), sender="c", signing_key=KEY))  # type: ignore[arg-type]
    message = json.loads(frame.signed_bytes)["msg"]
    # The memory levers are left out at their defaults, so an agent that predates them
    # still accepts a plan that does not use them.
    always = {
        f.name for f in dataclasses.fields(TrainingPlan) if not f.metadata.get("omit_if_default")
    }
    assert set(message["plan"]) == always
    assert always | {"gradient_checkpointing", "micro_batch_size"} == {
        field.name for field in dataclasses.fields(TrainingPlan)
    }
    assert message["update_encoding"] == "int8" and message["predicted_round_seconds"] == 42.5
