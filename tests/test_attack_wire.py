"""One hostile enrolled device against the wire layer (issue 16, findings 4 and 5).

4. It opens many transfers, or buffers many bytes, in the coordinator's one reassembler:
   its excess is refused with a reason naming it, honest uploads still complete, idle
   transfers expire at the configured timeout, and the daemon counts the refusals.
5. It sends an update body whose header declares a million tiny tensors (or huge ones, or
   lies about its length, names, dtypes): `decode_update` refuses it from the header, before
   any tensor is loaded; and it floods the coordinator's broker connection while the loop is
   busy: the receive queue stays bounded and the drops are counted (real Mosquitto).
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig, CoordinatorSettings, ScheduleConfig, TaskConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.mosquitto import MosquittoProcess
from device_profiles.profile import find_profile, profile_toml_text
from edge_runtime.wire import (
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    BrokerSettings,
    ChunkHeader,
    ChunkReassembler,
    ChunkSender,
    CodecConfig,
    CodecError,
    DeviceChannel,
    DeviceState,
    Ed25519PrivateKey,
    ExpiredTransfer,
    LimitExceededError,
    Limits,
    MqttTransport,
    PowerSource,
    ReceivedMessage,
    ReceiveQueue,
    ReceiveQueueConfig,
    ReconnectConfig,
    TransportConfig,
    UpdateEncoding,
    decode_frame,
    decode_update,
    device_topic,
    encode_frame,
    encode_update,
    generate_private_key,
    idle_timeout_for_deadlines,
    public_key_hex,
    tensor_shapes,
)
from edge_runtime.wire import update_codec as update_codec_module

DIGEST = "ab" * 32
WAIT_SECONDS = 15.0


def _first_chunk(transfer_id: str, sender: str, total_bytes: int = 200, chunk_bytes: int = 100):  # noqa: ANN202
    """(header, body) of chunk 0 of a transfer that will never be finished."""
    count = -(-total_bytes // chunk_bytes)
    header = ChunkHeader(transfer_id, 0, count, chunk_bytes, total_bytes, DIGEST)
    return header, b"x" * min(chunk_bytes, total_bytes)


def _upload(reassembler: ChunkReassembler, payload: bytes, transfer_id: str, sender: str):  # noqa: ANN202
    """Send every chunk of an honest upload; the completed transfer (or None)."""
    chunks = ChunkSender(payload, transfer_id=transfer_id, sender=sender, chunk_bytes=1000)
    completed = None
    for _, data in chunks.frames():
        frame = decode_frame(data)
        completed = reassembler.accept(frame.expect(ChunkHeader), frame.body, sender)
    return completed


# -- finding 4: one sender cannot starve the reassembler -----------------------------------


def test_many_open_transfers_from_one_sender_do_not_block_an_honest_upload() -> None:
    reassembler = ChunkReassembler()  # the coordinator's defaults
    refusals = []
    for index in range(64):  # the size of the receiver-wide cap
        header, body = _first_chunk(f"junk-{index}", "mallory")
        try:
            reassembler.accept(header, body, "mallory")
        except LimitExceededError as error:
            refusals.append(str(error))
    payload = bytes(range(256)) * 40  # 11 chunks
    completed = _upload(reassembler, payload, "honest-1", "alice")
    assert completed is not None and completed.payload == payload
    quota = Limits().max_open_transfers_per_sender
    assert quota < Limits().max_open_transfers
    assert reassembler.usage("mallory").open_transfers == quota
    assert reassembler.usage("alice").open_transfers == 0
    assert len(refusals) == 64 - quota == reassembler.quota_refused == reassembler.rejected
    assert "'mallory'" in refusals[0] and "max_open_transfers_per_sender" in refusals[0]


def test_many_buffered_bytes_from_one_sender_do_not_block_an_honest_upload() -> None:
    limits = Limits(
        max_chunk_bytes=1000,
        max_transfer_bytes=20_000,
        max_buffered_bytes=40_000,
        max_buffered_bytes_per_sender=10_000,
    )
    reassembler = ChunkReassembler(limits)
    held = 0
    refusals = []
    for index in range(4):  # each transfer declares 9 000 bytes and sends all but one chunk
        for chunk in range(8):
            header = ChunkHeader(f"junk-{index}", chunk, 9, 1000, 9000, DIGEST)
            try:
                reassembler.accept(header, b"x" * 1000, "mallory")
                held += 1000
            except LimitExceededError as error:
                refusals.append(str(error))
    assert reassembler.usage("mallory").buffered_bytes == held == 10_000
    assert refusals and all("max_buffered_bytes_per_sender" in reason for reason in refusals)
    assert "'mallory'" in refusals[0]
    payload = bytes(range(256)) * 39  # 9 984 bytes: a whole quota's worth for alice
    completed = _upload(reassembler, payload, "honest-1", "alice")
    assert completed is not None and completed.payload == payload
    with pytest.raises(LimitExceededError, match="could never complete"):
        reassembler.accept(*_first_chunk("too-big", "alice", total_bytes=10_001, chunk_bytes=1000))


def test_a_transfer_takes_chunks_only_from_the_sender_that_opened_it() -> None:
    reassembler = ChunkReassembler()
    header, body = _first_chunk("shared", "alice")
    reassembler.accept(header, body, "alice")
    second = ChunkHeader("shared", 1, 2, 100, 200, DIGEST)
    with pytest.raises(Exception, match="'alice' opened that transfer"):
        reassembler.accept(second, b"y" * 100, "mallory")


def test_idle_transfers_expire_at_the_default_and_at_a_configured_timeout() -> None:
    clock = [0.0]
    reassembler = ChunkReassembler(now=lambda: clock[0])
    assert reassembler.idle_timeout_seconds == DEFAULT_IDLE_TIMEOUT_SECONDS <= 300
    reassembler.accept(*_first_chunk("a", "mallory"), "mallory")
    clock[0] = DEFAULT_IDLE_TIMEOUT_SECONDS + 1
    assert reassembler.expire() == [ExpiredTransfer("a", "mallory", 1, 2)]

    timeout = idle_timeout_for_deadlines([120.0, 600.0])
    assert timeout == 600.0 and idle_timeout_for_deadlines([5.0]) == 60.0
    assert idle_timeout_for_deadlines([]) == DEFAULT_IDLE_TIMEOUT_SECONDS
    clock[0] = 0.0
    reassembler = ChunkReassembler(idle_timeout_seconds=timeout, now=lambda: clock[0])
    for index in range(Limits().max_open_transfers_per_sender):
        reassembler.accept(*_first_chunk(f"t-{index}", "mallory"), "mallory")
    with pytest.raises(LimitExceededError, match="expire after 600 s idle"):
        reassembler.accept(*_first_chunk("one-more", "mallory"), "mallory")
    clock[0] = 599.0
    assert reassembler.expire() == []
    clock[0] = 601.0
    assert len(reassembler.expire()) == Limits().max_open_transfers_per_sender
    assert reassembler.usage("mallory").open_transfers == 0 and reassembler.buffered_bytes == 0
    reassembler.accept(*_first_chunk("one-more", "mallory"), "mallory")  # its quota is back
    with pytest.raises(ValueError, match="positive"):
        ChunkReassembler(idle_timeout_seconds=0)


FLEET = "wirefleet"


@pytest.fixture
def daemon(tmp_path: Path, mosquitto: MosquittoProcess, tiny_bert_folder: Path):  # noqa: ANN201
    config = CoordinatorConfig(
        coordinator=CoordinatorSettings(fleet=FLEET, state_dir=str(tmp_path / "coord")),
        broker=BrokerSettings(url=mosquitto.url),
        tasks=(
            TaskConfig(
                id="t",
                kind="classification",
                base_model=str(tiny_bert_folder),
                labels=("a", "b"),
                scheme="none",
                rank=2,
                schedule=ScheduleConfig(devices_per_round=2, min_updates=1),
            ),
        ),
    )
    daemon = CoordinatorDaemon(config, now=lambda: 2_000_000.0)
    daemon.start()
    yield daemon
    daemon.stop()


def _enroll(daemon: CoordinatorDaemon, device_id: str) -> Ed25519PrivateKey:
    key = generate_private_key()
    token = f"token-for-{device_id}-0123456789"
    daemon.store.add_enrollment_token(token, "north", 600)
    profile = profile_toml_text(find_profile("laptop-mid-16gb"))
    daemon.store.redeem_enrollment_token(
        token, device_id, bytes.fromhex(public_key_hex(key)), profile
    )
    return key


def test_the_daemon_counts_a_flooders_refusals_and_serves_an_honest_device(
    daemon: CoordinatorDaemon,
) -> None:
    """The unmodified daemon, with the reassembler's default quotas: an enrolled device's 64
    unfinished transfers cost it 60 counted refusals, and another device's chunked frame
    still arrives."""
    _enroll(daemon, "mallory")
    alice = _enroll(daemon, "alice")
    for index in range(64):
        chunks = ChunkSender(
            b"x" * 200, transfer_id=f"junk-{index}", sender="mallory", chunk_bytes=100
        )
        _, data = next(chunks.frames([0]))
        topic = device_topic(FLEET, "mallory", DeviceChannel.CHUNK)
        daemon.handle(ReceivedMessage(topic, data, 1, False))
    assert daemon.rejected["LimitExceededError"] > 0, "the flood was not refused"
    quota = Limits().max_open_transfers_per_sender
    assert daemon.rejected["LimitExceededError"] == 64 - quota
    daemon.flush_refusals()  # counts are written about once a second; now, for the test
    assert daemon.store.rejection_counts().get("LimitExceededError") == 64 - quota
    [refused] = daemon.store.refusals(1)  # one row for the device and category
    assert refused.device_id == "mallory" and refused.count == 64 - quota
    assert "max_open_transfers_per_sender" in refused.last_reason

    state = DeviceState(
        fleet=FLEET,
        device_id="alice",
        sequence=42,
        online=True,
        eligible=True,
        cpu_load=0.5,
        free_memory_bytes=2**30,
        power_source=PowerSource.MAINS,
        profile_digest="00" * 32,
        ineligible_reasons=("x" * 900,),  # several chunks
    )
    frame = encode_frame(state, sender="alice", signing_key=alice)
    chunks = ChunkSender(frame, transfer_id="alice-1", sender="alice", chunk_bytes=300)
    assert chunks.count > 1
    for _, data in chunks.frames():
        daemon.handle(
            ReceivedMessage(device_topic(FLEET, "alice", DeviceChannel.CHUNK), data, 1, False)
        )
    assert daemon.liveness["alice"].state.sequence == 42
    assert daemon.rejected["LimitExceededError"] == 64 - quota


# -- finding 5: update bodies refused from their header -----------------------------------

EXPECTED = {"w": (4, 8)}
"""An int8 dense update of one [4, 8] tensor is stored as w::q8 int8 [4, 8], w::scale fp32 [4]."""
METADATA = {
    "format": "schoolfl-update",
    "codec_version": "1",
    "encoding": "int8",
    "top_k_fraction": "",
    "shapes": json.dumps({"w": [4, 8]}),
}


def _body(header_text: str, data_bytes: int, declared_length: int | None = None) -> bytes:
    encoded = header_text.encode()
    length = len(encoded) if declared_length is None else declared_length
    return length.to_bytes(8, "little") + encoded + bytes(data_bytes)


def _entries(**entries: tuple[str, list[int], int, int]) -> str:
    tensors = {
        name.replace("__", "::"): {"dtype": d, "shape": s, "data_offsets": [b, e]}
        for name, (d, s, b, e) in entries.items()
    }
    return json.dumps({"__metadata__": METADATA, **tensors})


HONEST = _entries(w__q8=("I8", [4, 8], 0, 32), w__scale=("F32", [4], 32, 48))


def _million_tiny_tensors() -> bytes:
    """The finding's body: 10^6 one-element fp32 tensors (~70 MB, almost all header)."""
    count = 10**6
    parts = [
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    ]
    text = '{"__metadata__":' + json.dumps(METADATA) + "," + ",".join(parts) + "}"
    return _body(text, 4 * count)


@pytest.fixture(scope="module")
def million_tiny_tensors() -> bytes:
    return _million_tiny_tensors()


HOSTILE_BODIES = {
    "huge tensor": (
        _body(
            _entries(
                w__q8=("I8", [2**30, 2**30], 0, 2**60), w__scale=("F32", [4], 2**60, 2**60 + 16)
            ),
            48,
        ),
        "data bytes",
    ),
    "offsets that do not match the shape": (
        _body(_entries(w__q8=("I8", [4, 8], 0, 4), w__scale=("F32", [4], 4, 20)), 20),
        "needs 32 bytes",
    ),
    "header longer than its body": (_body(HONEST, 48, declared_length=10_000), "only"),
    "header longer than allowed": (_body(HONEST, 48, declared_length=2**40), "allowed"),
    "duplicate names": (
        _body(HONEST[:-1] + ',"w::q8":{"dtype":"I8","shape":[4,8],"data_offsets":[48,80]}}', 80),
        "twice",
    ),
    "extra name": (
        _body(
            _entries(
                w__q8=("I8", [4, 8], 0, 32),
                w__scale=("F32", [4], 32, 48),
                x=("F32", [1], 48, 52),
            ),
            52,
        ),
        "names wrong",
    ),
    "many tensors": (
        _body(
            _entries(
                w__q8=("I8", [4, 8], 0, 32),
                w__scale=("F32", [4], 32, 48),
                **{f"x{i}": ("F32", [1], 48 + 4 * i, 52 + 4 * i) for i in range(4)},
            ),
            64,
        ),
        "at most 3 expected|names wrong",
    ),
    "missing name": (_body(_entries(w__q8=("I8", [4, 8], 0, 32)), 32), "names wrong"),
    "wrong dtype": (
        _body(_entries(w__q8=("F32", [4, 8], 0, 128), w__scale=("F32", [4], 128, 144)), 144),
        "expected torch.int8",
    ),
    "wrong shape": (
        _body(_entries(w__q8=("I8", [8, 4], 0, 32), w__scale=("F32", [4], 32, 48)), 48),
        r"expected torch.int8 \[4, 8\]",
    ),
    "gap between tensors": (
        _body(_entries(w__q8=("I8", [4, 8], 0, 32), w__scale=("F32", [4], 40, 56)), 56),
        "gaps",
    ),
    "not JSON": (_body("{not json" + " " * 40, 0), "JSON"),
}


@pytest.fixture
def loader_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the safetensors loader behind `decode_update` by one that fails the test:
    a hostile body must be refused from its header alone."""

    def refuse(data: bytes) -> dict[str, torch.Tensor]:
        pytest.fail(f"decode_update loaded a {len(data)}-byte body before refusing it")

    monkeypatch.setattr(update_codec_module, "safetensors_load", refuse)


@pytest.fixture
def loader_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the loader's calls (and let them through)."""
    calls: list[int] = []
    real = update_codec_module.safetensors_load

    def counted(data: bytes) -> dict[str, torch.Tensor]:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(update_codec_module, "safetensors_load", counted)
    yield calls


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
@pytest.mark.parametrize("with_expected", [True, False])
@pytest.mark.usefixtures("loader_must_not_run")
def test_a_hostile_header_is_refused_before_any_tensor_is_loaded(
    case: str, with_expected: bool
) -> None:
    body, reason = HOSTILE_BODIES[case]
    with pytest.raises(CodecError, match=reason):
        decode_update(body, EXPECTED if with_expected else None)


def test_honest_bodies_still_load_once_each(loader_calls: list[int]) -> None:
    decoded = decode_update(_body(HONEST, 48), EXPECTED)
    assert torch.equal(decoded["w"], torch.zeros(4, 8)) and len(loader_calls) == 1
    names = [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight" for i in range(40)]
    state = {name: torch.randn(16, 96) for name in names}
    for encoding in UpdateEncoding:
        for top_k in (None, 0.5):
            encoded = encode_update(state, CodecConfig(encoding, top_k)).body
            assert set(decode_update(encoded, tensor_shapes(state))) == set(state)
    assert len(loader_calls) == 1 + 4


@pytest.mark.usefixtures("loader_must_not_run")
def test_topk_index_claiming_more_entries_than_the_tensor_is_refused_from_the_header() -> None:
    metadata = dict(METADATA, top_k_fraction="0.5", encoding="fp32")
    tensors = {
        "w::idx": {"dtype": "I32", "shape": [33], "data_offsets": [0, 132]},
        "w::val": {"dtype": "F32", "shape": [33], "data_offsets": [132, 264]},
    }
    body = _body(json.dumps({"__metadata__": metadata, **tensors}), 264)
    with pytest.raises(CodecError, match="33 indices for a tensor of 32"):
        decode_update(body, EXPECTED)


@pytest.mark.usefixtures("loader_must_not_run")
@pytest.mark.parametrize("with_expected", [True, False])
def test_a_million_tiny_tensors_cost_neither_time_nor_memory(
    million_tiny_tensors: bytes, with_expected: bool
) -> None:
    """Before: 28-46 s of the loop and ~2.1 GB (benchmarks/bench_hostile_inputs.py). The
    bounds here are loose on purpose: a peak far below the body, seconds not tens."""
    body = million_tiny_tensors
    assert len(body) > 60_000_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CodecError, match="header"):
            decode_update(body, EXPECTED if with_expected else None)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(body) / 50, f"decode_update peaked at {peak} bytes"
    assert elapsed < 5.0, f"decode_update took {elapsed:.1f} s to refuse"


@pytest.mark.usefixtures("loader_must_not_run")
def test_many_tiny_tensors_are_refused_by_their_names_when_the_header_fits() -> None:
    """A header just under the byte bound: refused by its names, still before loading."""
    count = 10_000
    parts = [
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    ]
    body = _body('{"__metadata__":' + json.dumps(METADATA) + "," + ",".join(parts) + "}", 4 * count)
    with pytest.raises(CodecError, match="10000 stored, 2 expected"):
        decode_update(body)


# -- finding 5: the receive queue under a flood (real Mosquitto) -----------------------------


def _transport(broker: MosquittoProcess, client_id: str, **options: object) -> MqttTransport:
    return MqttTransport(
        TransportConfig(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            keepalive_seconds=5,
            reconnect=ReconnectConfig(min_delay_seconds=1, max_delay_seconds=2),
            **options,  # type: ignore[arg-type]
        )
    )


def test_a_flood_into_a_busy_consumer_stays_bounded_and_drops_are_counted(
    mosquitto: MosquittoProcess,
) -> None:
    bounds = ReceiveQueueConfig(max_messages=50, max_bytes=40 * 1024)
    receiver = _transport(mosquitto, "flooded", receive=bounds)
    topic_filter = f"schoolfl/{FLEET}/dev/+/state"
    receiver.subscribe(topic_filter)
    receiver.start(WAIT_SECONDS)
    flooder = _transport(mosquitto, "mallory")
    flooder.start(WAIT_SECONDS)
    topic = device_topic(FLEET, "mallory", DeviceChannel.STATE)
    total = 600
    try:
        infos = [flooder.publish(topic, b"f" * 1024, qos=1 if i % 2 else 0) for i in range(total)]
        assert MqttTransport.wait_published(infos[-1], WAIT_SECONDS)
        # Nobody reads `received`: the loop is busy. Everything arrives anyway.
        assert receiver.received.wait_arrived(total, WAIT_SECONDS), receiver.received.arrived
        queued = receiver.received.qsize()
        assert queued <= bounds.max_messages
        assert receiver.received.queued_bytes <= bounds.max_bytes
        assert receiver.dropped == total - queued > total // 2
        assert receiver.take_drops() == {topic: total - queued}
        assert receiver.take_drops() == {}
        drained = [receiver.received.get(timeout=1.0) for _ in range(queued)]
        assert all(message.topic == topic for message in drained)
        assert receiver.received.queued_bytes == 0
        info = flooder.publish(topic, b"after", qos=1)  # the loop caught up: accepted again
        assert MqttTransport.wait_published(info, WAIT_SECONDS)
        assert receiver.received.get(timeout=WAIT_SECONDS).payload == b"after"
        assert receiver.dropped == total - queued
    finally:
        flooder.stop()
        receiver.stop()


def test_receive_queue_bounds_bytes_and_counts_empty_floods() -> None:
    received = ReceiveQueue(ReceiveQueueConfig(max_messages=1000, max_bytes=4000))
    big = ReceivedMessage("t/big", b"x" * 2500, 1, False)
    assert received.offer(big)
    assert not received.offer(big)  # over max_bytes
    empty = ReceivedMessage("t/empty", b"", 0, False)
    accepted = sum(received.offer(empty) for _ in range(100))
    assert accepted == (4000 - big.cost_bytes) // empty.cost_bytes > 0
    assert received.dropped == 1 + 100 - accepted
    assert received.take_drops() == {"t/big": 1, "t/empty": 100 - accepted}
    assert received.get(timeout=1.0) is big


def test_broker_settings_carry_the_queue_bounds() -> None:
    settings = BrokerSettings.from_table(
        {"receive_queue_max_messages": 7, "receive_queue_max_bytes": 1 << 20}
    )
    config = settings.transport_config("c")
    assert config.receive == ReceiveQueueConfig(7, 1 << 20)
    assert MqttTransport(config).received.config == config.receive
    with pytest.raises(ValueError, match="max_messages"):
        BrokerSettings(receive_queue_max_messages=0)
