"""A device's side of one secure-aggregation round (steps 0-3 of `edge_runtime.secagg`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_runtime.secagg.config import SecAggConfig, abort_if_below, share_points
from edge_runtime.secagg.crypto import (
    MASK_PURPOSE,
    SHARE_BOX_PURPOSE,
    agree_seed,
    clamp_private_key,
    commit_self_mask_seed,
    expand_seed,
    generate_key_pair,
    new_seed,
    open_share_box,
    private_key_bytes,
    public_key_bytes,
    seal_share_box,
    share_box_aad,
)
from edge_runtime.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    SecAggRefusal,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_runtime.secagg.ring import (
    TensorLayout,
    quantize_delta,
    reduce_mod,
    ring_vector_to_bytes,
)
from edge_runtime.secagg.shamir import (
    SHARE_BYTES,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)

logger = logging.getLogger(__name__)


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
        """Check the roster, split b_u and the s-key, and seal one share box per peer; the
        message carries a commitment to b_u, against which the coordinator checks the seed it
        rebuilds (the s-key is checked against the advertised public key; it is shared in
        its clamped form, the only one the coordinator accepts).

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
        abort_if_below(self.config.reconstruction_threshold, len(ids), len(ids), "advertised")
        self._roster = {advert.device_id: advert for advert in roster}
        points = share_points(ids)
        threshold = self.config.reconstruction_threshold
        key_int = int.from_bytes(clamp_private_key(private_key_bytes(self._mask_key)), "big")
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
        return ShareKeys(
            round_id=self.round_id,
            sender_id=self.device_id,
            encrypted_shares=boxes,
            self_mask_commitment=commit_self_mask_seed(
                self._self_mask_seed, self.round_id, self.device_id
            ),
        )

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
        abort_if_below(
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
        abort_if_below(
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
