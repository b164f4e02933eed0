"""Secure-aggregation messages: frozen dataclasses with JSON-safe dict conversion (no pickle).

The conversion is the wire's own (`edge_runtime.wire`'s `to_json_fields` /
`from_json_fields`, driven by the annotations; bytes travel as base64 strings), plus a
`kind` and a `version` so a decoder refuses a message of another kind or a newer schema with
a clear `SchemaError`. Over MQTT they travel as the bodies of `SecAggEnvelope` frames
(`edge_runtime.secagg.bodies`).

Also home to the secure-aggregation exception hierarchy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from edge_runtime.secagg.crypto import COMMITMENT_BYTES, NONCE_BYTES
from edge_runtime.secagg.shamir import SHARE_BYTES
from edge_runtime.wire import SchemaError, check_identifier, from_json_fields, to_json_fields

SECAGG_SCHEMA_VERSION = 1
PUBLIC_KEY_BYTES = 32
SHARE_BOX_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce + two shares + GCM tag
MAX_DEVICES = 4096


class SecAggError(Exception):
    """Base class of secure-aggregation failures (not bad wire input: that is SchemaError)."""


class SecAggAbort(SecAggError):
    """The round cannot finish without risking privacy (too few devices); nothing is output."""


class SecAggRefusal(SecAggError):
    """A device refused a request that would reveal more than the protocol allows."""


def _check_device_ids(name: str, ids: tuple[str, ...]) -> None:
    if len(ids) > MAX_DEVICES or len(set(ids)) != len(ids):
        raise SchemaError(f"{name} must hold at most {MAX_DEVICES} distinct ids, got {len(ids)}")
    for device_id in ids:
        check_identifier(name, device_id)


def _check_bytes(name: str, value: bytes, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise SchemaError(f"{name} must be {length} bytes, got {got}")


MessageT = TypeVar("MessageT", bound="SecAggMessage")


class SecAggMessage:
    """Mixin: `to_dict` / `from_dict` driven by the dataclass field annotations."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (str, int, lists, base64 strings) with `kind` and `version`."""
        return {"kind": self.kind, "version": SECAGG_SCHEMA_VERSION, **to_json_fields(self)}

    @classmethod
    def from_dict(cls: type[MessageT], data: dict[str, Any]) -> MessageT:
        """Parse and validate; raises SchemaError naming the bad field."""
        if not isinstance(data, dict):
            raise SchemaError(f"{cls.kind} must be a JSON object, got {type(data).__name__}")
        if data.get("kind") != cls.kind:
            raise SchemaError(f"expected kind {cls.kind!r}, got {data.get('kind')!r:.40}")
        if data.get("version") != SECAGG_SCHEMA_VERSION:
            raise SchemaError(
                f"{cls.kind}: expected version {SECAGG_SCHEMA_VERSION}, got "
                f"{data.get('version')!r:.20}; upgrade the side that is older"
            )
        fields = {key: value for key, value in data.items() if key not in ("kind", "version")}
        return from_json_fields(cls, fields, cls.kind)


@dataclass(frozen=True)
class AdvertiseKeys(SecAggMessage):
    """Step 0, device -> all (via coordinator): this round's two X25519 public keys."""

    kind: ClassVar[str] = "secagg-advertise-keys"
    round_id: str
    device_id: str
    cipher_public_key: bytes
    mask_public_key: bytes

    def __post_init__(self) -> None:
        check_identifier("round_id", self.round_id)
        check_identifier("device_id", self.device_id)
        _check_bytes("cipher_public_key", self.cipher_public_key, PUBLIC_KEY_BYTES)
        _check_bytes("mask_public_key", self.mask_public_key, PUBLIC_KEY_BYTES)


@dataclass(frozen=True)
class ShareKeys(SecAggMessage):
    """Step 1, device -> each peer (via coordinator): AES-GCM boxes of Shamir shares."""

    kind: ClassVar[str] = "secagg-share-keys"
    round_id: str
    sender_id: str
    encrypted_shares: dict[str, bytes]
    """recipient device id -> nonce || AES-GCM(share of s-key || share of b) || tag."""
    self_mask_commitment: bytes = b""
    """`commit_self_mask_seed` of the sender's b: what its reconstructed seed is checked
    against. Required from a device (the coordinator refuses a ShareKeys without it);
    empty in the copies the coordinator forwards, whose recipients have no use for it."""

    def __post_init__(self) -> None:
        check_identifier("round_id", self.round_id)
        check_identifier("sender_id", self.sender_id)
        _check_device_ids("encrypted_shares", tuple(self.encrypted_shares))
        for recipient, box in self.encrypted_shares.items():
            _check_bytes(f"encrypted_shares[{recipient!r}]", box, SHARE_BOX_BYTES)
        if self.self_mask_commitment:
            _check_bytes("self_mask_commitment", self.self_mask_commitment, COMMITMENT_BYTES)
        elif not isinstance(self.self_mask_commitment, bytes):
            raise SchemaError("self_mask_commitment must be bytes")


@dataclass(frozen=True)
class MaskedInput(SecAggMessage):
    """Step 2, device -> coordinator: the masked ring vector, little-endian uint32 words."""

    kind: ClassVar[str] = "secagg-masked-input"
    round_id: str
    device_id: str
    ring_bits: int
    num_coordinates: int
    vector: bytes

    def __post_init__(self) -> None:
        check_identifier("round_id", self.round_id)
        check_identifier("device_id", self.device_id)
        if not 1 <= self.ring_bits <= 32:
            raise SchemaError(f"ring_bits must be in [1, 32], got {self.ring_bits!r}")
        if not 0 <= self.num_coordinates < 2**31:
            raise SchemaError(f"num_coordinates out of range: {self.num_coordinates!r}")
        _check_bytes("vector", self.vector, 4 * self.num_coordinates)


@dataclass(frozen=True)
class UnmaskRequest(SecAggMessage):
    """Step 3, coordinator -> surviving devices: whose b-shares and whose s-shares to send."""

    kind: ClassVar[str] = "secagg-unmask-request"
    round_id: str
    survivors: tuple[str, ...]
    """Devices whose masked input arrived: reveal shares of their self-mask seed b."""
    dropped: tuple[str, ...]
    """Devices that shared keys but whose masked input did not arrive: reveal s-key shares."""

    def __post_init__(self) -> None:
        check_identifier("round_id", self.round_id)
        _check_device_ids("survivors", self.survivors)
        _check_device_ids("dropped", self.dropped)
        both = set(self.survivors) & set(self.dropped)
        if both:
            raise SchemaError(f"devices listed as both survivor and dropped: {sorted(both)}")


@dataclass(frozen=True)
class UnmaskResponse(SecAggMessage):
    """Step 3, device -> coordinator: the requested shares (33-byte big-endian field values)."""

    kind: ClassVar[str] = "secagg-unmask-response"
    round_id: str
    device_id: str
    self_mask_shares: dict[str, bytes]
    mask_key_shares: dict[str, bytes]

    def __post_init__(self) -> None:
        check_identifier("round_id", self.round_id)
        check_identifier("device_id", self.device_id)
        _check_device_ids("self_mask_shares", tuple(self.self_mask_shares))
        _check_device_ids("mask_key_shares", tuple(self.mask_key_shares))
        both = set(self.self_mask_shares) & set(self.mask_key_shares)
        if both:
            raise SchemaError(f"both share kinds present for {sorted(both)}; refused")
        for owner, share in {**self.self_mask_shares, **self.mask_key_shares}.items():
            _check_bytes(f"share of {owner!r}", share, SHARE_BYTES)


SECAGG_MESSAGE_CLASSES: dict[str, type[SecAggMessage]] = {
    cls.kind: cls for cls in (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskRequest, UnmaskResponse)
}
"""Serialized type tag -> class (the one registry STYLE allows)."""
