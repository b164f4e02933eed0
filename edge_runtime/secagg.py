"""Secure aggregation (Bonawitz et al., CCS 2017), honest-but-curious version, with drop-outs.

The coordinator learns the *sum* of the surviving devices' adapter deltas and nothing about any
single delta, as long as fewer than t devices collude with it (t = `reconstruction_threshold`).

Each device u, for one round:
  0. AdvertiseKeys: two fresh X25519 public keys, c_u (share boxes) and s_u (masks).
  1. ShareKeys: a fresh self-mask seed b_u; Shamir t-of-n shares of b_u and of the s_u private
     key, one AES-GCM box per peer v keyed by agree(c_u, c_v); the coordinator relays boxes.
  2. MaskedInput: y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)  (mod 2^k),
     with x_u the quantized delta (`secagg_quantize`) and s_uv = agree(s_u, s_v).
  3. UnmaskResponse: for each survivor v (masked input arrived) the share of b_v, for each
     dropped v (shared keys, no masked input) the share of v's s-key, never both for one v.
The coordinator sums the y_u of the survivors, reconstructs the s-keys of the dropped to cancel
their pairwise masks with the survivors, reconstructs the survivors' b to remove the self-masks,
and decodes the sum. With fewer than t devices at any step it raises `SecAggAbort`.

Scope: this module is the cryptographic core and an in-process driver that relays messages
exactly as the MQTT coordinator does (through their JSON form). Over MQTT, the agent drives a
`SecAggClient` through `edge_runtime.secagg_session` and the coordinator replays a
`SecAggServer` from its store in `coordinator.secure_rounds`. Pairwise masks use the complete
graph of the round's devices (SecAgg+'s sparse neighbour graph is not done).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_runtime.errors import SchemaError
from edge_runtime.secagg_crypto import (
    KEY_BYTES,
    MASK_PURPOSE,
    SHARE_BOX_PURPOSE,
    agree_seed,
    expand_seed,
    generate_key_pair,
    new_seed,
    open_share_box,
    private_key_bytes,
    public_key_bytes,
    seal_share_box,
    share_box_aad,
)
from edge_runtime.secagg_messages import (
    AdvertiseKeys,
    MaskedInput,
    SecAggAbort,
    SecAggMessage,
    SecAggRefusal,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_runtime.secagg_quantize import (
    QuantizationConfig,
    TensorLayout,
    dequantize_sum,
    quantize_delta,
    reduce_mod,
)
from edge_runtime.secagg_shamir import (
    SHARE_BYTES,
    reconstruct_secret,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggRefusal",
    "SecAggResult",
    "SecAggServer",
    "run_round_in_process",
]


@dataclass(frozen=True)
class SecAggConfig:
    """One round's secure-aggregation settings; devices and coordinator must agree on them."""

    reconstruction_threshold: int
    """t: shares needed to rebuild a secret, and the fewest devices a step may continue with.
    Fewer than t colluding devices (plus the coordinator) learn nothing; choose t > n/2."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.reconstruction_threshold, int) or self.reconstruction_threshold < 2:
            raise SchemaError(
                f"reconstruction_threshold must be an int >= 2, got "
                f"{self.reconstruction_threshold!r}"
            )


@dataclass(frozen=True)
class SecAggResult:
    """The decoded sum of the survivors' deltas, and who it covers."""

    total: dict[str, torch.Tensor]
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]

    @property
    def num_inputs(self) -> int:
        return len(self.contributors)


def _abort_if_below(threshold: int, count: int, total: int, what: str) -> None:
    if count < threshold:
        raise SecAggAbort(
            f"only {count} of {total} devices {what}; threshold is {threshold}. "
            "The round is aborted and nothing is revealed; retry with more devices."
        )


def _share_points(device_ids: Sequence[str]) -> dict[str, int]:
    """Shamir x-coordinate of each device: its 1-based position in the sorted roster."""
    return {device_id: index + 1 for index, device_id in enumerate(sorted(device_ids))}


def ring_vector_to_bytes(vector: torch.Tensor) -> bytes:
    return vector.numpy().astype("<u4").tobytes()


def ring_vector_from_bytes(data: bytes, ring_bits: int) -> torch.Tensor:
    words = np.frombuffer(data, dtype="<u4").astype(np.int64)  # (d,)
    if ring_bits < 32 and words.size and int(words.max()) >= 1 << ring_bits:
        raise SchemaError(f"masked vector holds values outside the ring Z_2^{ring_bits}")
    return torch.from_numpy(words)


class SecAggClient:
    """A device's side of one round: one method per protocol step, called in order."""

    def __init__(
        self,
        device_id: str,
        round_id: str,
        config: SecAggConfig,
        layout: TensorLayout | None = None,
    ) -> None:
        """`layout` None: taken from the delta at `mask_input` (an agent advertises its keys
        before it has downloaded the model whose layout the delta will have)."""
        self.device_id = device_id
        self.round_id = round_id
        self.config = config
        self.layout = layout
        self._cipher_key: X25519PrivateKey = generate_key_pair()
        self._mask_key: X25519PrivateKey = generate_key_pair()
        self._self_mask_seed = new_seed()
        self._roster: dict[str, AdvertiseKeys] = {}
        self._held_shares: dict[str, tuple[int, int]] = {}  # owner -> (s-key share, b share)
        self._revealed_self_mask_of: set[str] = set()
        self._revealed_mask_key_of: set[str] = set()

    def _box_key(self, peer_id: str) -> bytes:
        return agree_seed(
            self._cipher_key,
            self._roster[peer_id].cipher_public_key,
            SHARE_BOX_PURPOSE,
            self.round_id,
            (self.device_id, peer_id),
        )

    def advertise_keys(self) -> AdvertiseKeys:
        return AdvertiseKeys(
            round_id=self.round_id,
            device_id=self.device_id,
            cipher_public_key=public_key_bytes(self._cipher_key),
            mask_public_key=public_key_bytes(self._mask_key),
        )

    def share_keys(
        self, roster: Sequence[AdvertiseKeys], threshold: int | None = None
    ) -> ShareKeys:
        """Check the roster, split b_u and the s-key, and seal one share box per peer.

        `threshold`: the t the coordinator fixed once it knew the roster (it replaces the
        config's). It is refused unless it is a strict majority of the roster, so a
        coordinator cannot lower the number of devices it must collude with."""
        if threshold is not None:
            if not len(roster) < 2 * threshold <= 2 * len(roster):
                raise SecAggRefusal(
                    f"threshold {threshold} for a roster of {len(roster)} devices refused: "
                    "it must be a strict majority of the roster"
                )
            self.config = SecAggConfig(threshold, self.config.quantization)
        ids = [advert.device_id for advert in roster]
        keys = [advert.cipher_public_key for advert in roster] + [
            advert.mask_public_key for advert in roster
        ]
        if len(set(ids)) != len(ids) or len(set(keys)) != len(keys):
            raise SecAggRefusal("roster repeats a device id or a public key; refusing to share")
        if any(advert.round_id != self.round_id for advert in roster):
            raise SecAggRefusal(f"roster holds keys of another round than {self.round_id!r}")
        if self.advertise_keys() not in roster:
            raise SecAggRefusal(f"{self.device_id!r} or its keys are missing from the roster")
        _abort_if_below(self.config.reconstruction_threshold, len(ids), len(ids), "advertised")
        self._roster = {advert.device_id: advert for advert in roster}
        points = _share_points(ids)
        threshold = self.config.reconstruction_threshold
        key_int = int.from_bytes(private_key_bytes(self._mask_key), "big")
        key_shares = split_secret(key_int, threshold, list(points.values()))
        seed_shares = split_secret(
            int.from_bytes(self._self_mask_seed, "big"), threshold, list(points.values())
        )
        boxes = {}
        for peer_id, x in points.items():
            if peer_id == self.device_id:
                self._held_shares[peer_id] = (key_shares[x], seed_shares[x])
                continue
            plaintext = share_to_bytes(key_shares[x]) + share_to_bytes(seed_shares[x])
            aad = share_box_aad(self.round_id, self.device_id, peer_id)
            boxes[peer_id] = seal_share_box(self._box_key(peer_id), plaintext, aad)
        return ShareKeys(round_id=self.round_id, sender_id=self.device_id, encrypted_shares=boxes)

    def receive_shares(self, messages: Sequence[ShareKeys]) -> None:
        """Open the boxes addressed to this device; the senders become its masking peers."""
        for message in messages:
            sender = message.sender_id
            if message.round_id != self.round_id or sender not in self._roster:
                raise SecAggRefusal(f"share box from unknown sender {sender!r} or other round")
            if sender == self.device_id or sender in self._held_shares:
                raise SecAggRefusal(f"duplicate share box from {sender!r}")
            box = message.encrypted_shares[self.device_id]
            aad = share_box_aad(self.round_id, sender, self.device_id)
            plaintext = open_share_box(self._box_key(sender), box, aad)
            self._held_shares[sender] = (
                share_from_bytes(plaintext[:SHARE_BYTES]),
                share_from_bytes(plaintext[SHARE_BYTES:]),
            )
        _abort_if_below(
            self.config.reconstruction_threshold,
            len(self._held_shares),
            len(self._roster),
            "shared keys",
        )

    def mask_input(
        self, delta: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> MaskedInput:
        """Quantize the delta and add the self-mask and the pairwise masks (mod 2^k)."""
        if not self._held_shares:
            raise SecAggRefusal("mask_input called before receive_shares")
        quantization = self.config.quantization
        bits = quantization.ring_bits
        layout = self.layout or TensorLayout.of(delta)
        size = layout.num_coordinates
        vector = quantize_delta(delta, layout, quantization, generator)  # (d,) int64
        vector += expand_seed(self._self_mask_seed, size, bits)
        for peer_id in self._held_shares:
            if peer_id == self.device_id:
                continue
            seed = agree_seed(
                self._mask_key,
                self._roster[peer_id].mask_public_key,
                MASK_PURPOSE,
                self.round_id,
                (self.device_id, peer_id),
            )
            mask = expand_seed(seed, size, bits)  # (d,)
            if peer_id > self.device_id:
                vector += mask
            else:
                vector -= mask
        return MaskedInput(
            round_id=self.round_id,
            device_id=self.device_id,
            ring_bits=bits,
            num_coordinates=size,
            vector=ring_vector_to_bytes(reduce_mod(vector, bits)),
        )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal b-shares of survivors and s-key shares of the dropped, never both for one.

        The rule holds across requests: a coordinator that asks twice with the survivor and
        dropped lists swapped is refused, because one b-share and one s-share of the same
        device, from t devices each, would unmask that device's input.
        """
        if request.round_id != self.round_id:
            raise SecAggRefusal(f"unmask request for round {request.round_id!r}")
        peers = set(self._held_shares)
        listed = set(request.survivors) | set(request.dropped)
        if listed != peers or self.device_id not in request.survivors:
            raise SecAggRefusal(
                f"unmask request must split exactly the {len(peers)} devices that shared keys "
                f"into survivors and dropped, with this device a survivor; got "
                f"{len(request.survivors)} survivors, {len(request.dropped)} dropped"
            )
        _abort_if_below(
            self.config.reconstruction_threshold,
            len(request.survivors),
            len(peers),
            "sent masked inputs",
        )
        conflict = (set(request.survivors) & self._revealed_mask_key_of) | (
            set(request.dropped) & self._revealed_self_mask_of
        )
        if conflict:
            raise SecAggRefusal(
                f"refusing to reveal both a self-mask share and a mask-key share of "
                f"{sorted(conflict)}: that would unmask their individual inputs"
            )
        self._revealed_self_mask_of |= set(request.survivors)
        self._revealed_mask_key_of |= set(request.dropped)
        return UnmaskResponse(
            round_id=self.round_id,
            device_id=self.device_id,
            self_mask_shares={
                owner: share_to_bytes(self._held_shares[owner][1]) for owner in request.survivors
            },
            mask_key_shares={
                owner: share_to_bytes(self._held_shares[owner][0]) for owner in request.dropped
            },
        )


class SecAggServer:
    """The coordinator's side: relays messages, then unmasks only the sum of the survivors.

    It holds only what a relaying coordinator sees: public keys, sealed share boxes, masked
    vectors and the shares devices choose to reveal in step 3.
    """

    def __init__(self, round_id: str, config: SecAggConfig, layout: TensorLayout) -> None:
        self.round_id = round_id
        self.config = config
        self.layout = layout
        self.roster: dict[str, AdvertiseKeys] = {}
        self.shared_keys: tuple[str, ...] = ()  # U2: devices whose share boxes were relayed
        self.masked_inputs: dict[str, torch.Tensor] = {}  # U3: masked ring vectors only
        self.request: UnmaskRequest | None = None

    def _check_round(self, message_round: str, sender: str) -> None:
        if message_round != self.round_id:
            raise SchemaError(f"{sender!r} sent round {message_round!r}, open is {self.round_id!r}")

    def collect_advertisements(self, adverts: Sequence[AdvertiseKeys]) -> tuple[AdvertiseKeys, ...]:
        """Step 0: keep one advert per device; broadcast the roster returned."""
        for advert in adverts:
            self._check_round(advert.round_id, advert.device_id)
            self.roster.setdefault(advert.device_id, advert)
        _abort_if_below(
            self.config.reconstruction_threshold, len(self.roster), len(self.roster), "advertised"
        )
        return tuple(self.roster[device_id] for device_id in sorted(self.roster))

    def route_shares(self, messages: Sequence[ShareKeys]) -> dict[str, list[ShareKeys]]:
        """Step 1: forward to each sender the boxes the other senders addressed to it."""
        complete = {}
        for message in messages:
            self._check_round(message.round_id, message.sender_id)
            expected = set(self.roster) - {message.sender_id}
            if message.sender_id in self.roster and set(message.encrypted_shares) == expected:
                complete.setdefault(message.sender_id, message)
            else:
                logger.warning("dropping ShareKeys from %s: wrong recipients", message.sender_id)
        self.shared_keys = tuple(sorted(complete))
        _abort_if_below(
            self.config.reconstruction_threshold,
            len(complete),
            len(self.roster),
            "shared keys",
        )
        return {
            recipient: [
                ShareKeys(self.round_id, sender, {recipient: message.encrypted_shares[recipient]})
                for sender, message in sorted(complete.items())
                if sender != recipient
            ]
            for recipient in self.shared_keys
        }

    def collect_masked_inputs(self, messages: Sequence[MaskedInput]) -> UnmaskRequest:
        """Step 2: keep masked vectors of devices in U2; ask the survivors for shares."""
        size = self.layout.num_coordinates
        bits = self.config.quantization.ring_bits
        for message in messages:
            if (
                message.round_id != self.round_id
                or message.device_id not in self.shared_keys
                or message.num_coordinates != size
                or message.ring_bits != bits
            ):
                logger.warning(
                    "dropping masked input of %s: expected round %s, a device that shared keys "
                    "and %d coordinates in Z_2^%d; got round %s, %d coordinates in Z_2^%d",
                    message.device_id,
                    self.round_id,
                    size,
                    bits,
                    message.round_id,
                    message.num_coordinates,
                    message.ring_bits,
                )
                continue
            self.masked_inputs.setdefault(
                message.device_id, ring_vector_from_bytes(message.vector, bits)
            )
        survivors = tuple(sorted(self.masked_inputs))
        _abort_if_below(
            self.config.reconstruction_threshold,
            len(survivors),
            len(self.shared_keys),
            "sent masked inputs",
        )
        dropped = tuple(sorted(set(self.shared_keys) - set(survivors)))
        self.request = UnmaskRequest(self.round_id, survivors, dropped)
        return self.request

    def _reconstruct(self, shares_by_holder: dict[str, dict[str, bytes]], owner: str) -> bytes:
        points = _share_points(self.shared_keys)
        shares = {
            points[holder]: share_from_bytes(shares[owner])
            for holder, shares in shares_by_holder.items()
        }
        secret = reconstruct_secret(shares, self.config.reconstruction_threshold)
        if secret >= 1 << (8 * KEY_BYTES):
            raise SecAggAbort(f"reconstructed secret of {owner!r} is out of range: bad shares")
        return secret.to_bytes(KEY_BYTES, "big")

    def aggregate(self, responses: Sequence[UnmaskResponse]) -> SecAggResult:
        """Step 3: with >= t responses, remove all masks and decode the survivors' sum."""
        if self.request is None:
            raise SecAggAbort("aggregate called before collect_masked_inputs")
        request = self.request
        valid: dict[str, UnmaskResponse] = {}
        for response in responses:
            self._check_round(response.round_id, response.device_id)
            if (
                response.device_id in request.survivors
                and set(response.self_mask_shares) == set(request.survivors)
                and set(response.mask_key_shares) == set(request.dropped)
            ):
                valid.setdefault(response.device_id, response)
            else:
                logger.warning(
                    "ignoring unmask response of %s: not as requested", response.device_id
                )
        _abort_if_below(
            self.config.reconstruction_threshold,
            len(valid),
            len(request.survivors),
            "answered the unmask request",
        )
        bits = self.config.quantization.ring_bits
        size = self.layout.num_coordinates
        total = torch.zeros(size, dtype=torch.int64)  # (d,)
        for device_id in request.survivors:
            total += self.masked_inputs[device_id]
        self_shares = {holder: r.self_mask_shares for holder, r in valid.items()}
        for device_id in request.survivors:
            total -= expand_seed(self._reconstruct(self_shares, device_id), size, bits)
        key_shares = {holder: r.mask_key_shares for holder, r in valid.items()}
        for dropped_id in request.dropped:
            key = X25519PrivateKey.from_private_bytes(self._reconstruct(key_shares, dropped_id))
            if public_key_bytes(key) != self.roster[dropped_id].mask_public_key:
                raise SecAggAbort(f"reconstructed mask key of {dropped_id!r} does not match")
            for device_id in request.survivors:
                seed = agree_seed(
                    key,
                    self.roster[device_id].mask_public_key,
                    MASK_PURPOSE,
                    self.round_id,
                    (device_id, dropped_id),
                )
                mask = expand_seed(seed, size, bits)  # (d,)
                # the survivor added +mask when the dropped id sorts after its own
                total += -mask if dropped_id > device_id else mask
            total = reduce_mod(total, bits)
        total = dequantize_sum(total, len(request.survivors), self.layout, self.config.quantization)
        logger.info(
            "secure aggregation %s: summed %d inputs, %d dropped",
            self.round_id,
            len(request.survivors),
            len(request.dropped),
        )
        return SecAggResult(total=total, contributors=request.survivors, dropped=request.dropped)


MessageT = TypeVar("MessageT", bound=SecAggMessage)


def _over_the_wire(message: MessageT) -> MessageT:
    """Round-trip a message through its JSON text, as the MQTT relay would carry it."""
    return type(message).from_dict(json.loads(json.dumps(message.to_dict())))


def run_round_in_process(
    inputs: Mapping[str, Mapping[str, torch.Tensor]],
    threshold: int,
    quantization: QuantizationConfig | None = None,
    drop_after_masking: Sequence[str] = (),
    drop_before_unmasking: Sequence[str] = (),
    round_id: str = "round-1",
    server: SecAggServer | None = None,
    generator: torch.Generator | None = None,
) -> SecAggResult:
    """Run one full round in memory, every message relayed through the server as JSON.

    `drop_after_masking`: devices that computed their masked input but never delivered it (the
    case that needs their pairwise masks cancelled). `drop_before_unmasking`: devices whose
    masked input arrived but that do not answer the unmask request (their input still counts).
    Pass `server` to inspect its state afterwards (tests do).
    """
    layout = TensorLayout.of(next(iter(inputs.values())))
    config = SecAggConfig(threshold, quantization or QuantizationConfig())
    server = server or SecAggServer(round_id, config, layout)
    clients = {device_id: SecAggClient(device_id, round_id, config, layout) for device_id in inputs}
    wire = _over_the_wire
    roster = server.collect_advertisements(
        [wire(client.advertise_keys()) for client in clients.values()]
    )
    share_messages = [wire(client.share_keys(roster)) for client in clients.values()]
    routed = server.route_shares(share_messages)
    for device_id, forwarded in routed.items():
        clients[device_id].receive_shares([wire(message) for message in forwarded])
    masked = []
    for device_id, client in clients.items():
        message = client.mask_input(inputs[device_id], generator)
        if device_id not in drop_after_masking:
            masked.append(wire(message))
    request = server.collect_masked_inputs(masked)
    responses = [
        wire(clients[device_id].unmask(wire(request)))
        for device_id in request.survivors
        if device_id not in drop_before_unmasking
    ]
    return server.aggregate(responses)
