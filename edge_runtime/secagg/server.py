"""Secure aggregation (Bonawitz et al., CCS 2017), honest-but-curious version, with drop-outs.

The coordinator learns the *sum* of the surviving devices' adapter deltas and nothing about any
single delta, as long as fewer than t devices collude with it (t = `reconstruction_threshold`).

Each device u, for one round:
  0. AdvertiseKeys: two fresh X25519 public keys, c_u (share boxes) and s_u (masks).
  1. ShareKeys: a fresh self-mask seed b_u; Shamir t-of-n shares of b_u and of the s_u private
     key, one AES-GCM box per peer v keyed by agree(c_u, c_v); the coordinator relays boxes.
  2. MaskedInput: y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)  (mod 2^k),
     with x_u the quantized delta (`edge_runtime.secagg.ring`) and s_uv = agree(s_u, s_v).
  3. UnmaskResponse: for each survivor v (masked input arrived) the share of b_v, for each
     dropped v (shared keys, no masked input) the share of v's s-key, never both for one v.
The coordinator sums the y_u of the survivors, reconstructs the s-keys of the dropped to cancel
their pairwise masks with the survivors, reconstructs the survivors' b to remove the self-masks,
and decodes the sum. With fewer than t devices at any step it raises `SecAggAbort`. Every
reconstructed secret is verified (b_u against the commitment u sent in step 1, s-keys against
the advertised public keys) and rebuilt from all the revealed shares, so a device revealing
wrong shares is named and outvoted instead of shifting the sum
(`edge_runtime.secagg.reconstruction`).

Scope: this module is the cryptographic core and an in-process driver that relays messages
exactly as the MQTT coordinator does (through their JSON form). Over MQTT, the agent drives a
`SecAggClient` through `edge_runtime.secagg_session` and the coordinator replays a
`SecAggServer` from its store in `coordinator.secure.rounds`. Pairwise masks use the complete
graph of the round's devices (SecAgg+'s sparse neighbour graph is not done).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from edge_runtime.secagg.config import SecAggConfig, SecAggResult, abort_if_below, share_points
from edge_runtime.secagg.crypto import (
    COMMITMENT_BYTES,
    MASK_PURPOSE,
    agree_seed,
    expand_seed,
)
from edge_runtime.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    SecAggAbort,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from edge_runtime.secagg.reconstruction import rebuild_secrets
from edge_runtime.secagg.ring import (
    TensorLayout,
    dequantize_sum,
    reduce_mod,
    ring_vector_from_bytes,
)
from edge_runtime.wire import SchemaError

logger = logging.getLogger(__name__)


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
        self.commitments: dict[str, bytes] = {}  # U2 device -> commitment to its self-mask seed
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
        abort_if_below(
            self.config.reconstruction_threshold, len(self.roster), len(self.roster), "advertised"
        )
        return tuple(self.roster[device_id] for device_id in sorted(self.roster))

    def route_shares(self, messages: Sequence[ShareKeys]) -> dict[str, list[ShareKeys]]:
        """Step 1: forward to each sender the boxes the other senders addressed to it."""
        complete = {}
        for message in messages:
            self._check_round(message.round_id, message.sender_id)
            expected = set(self.roster) - {message.sender_id}
            if message.sender_id not in self.roster or set(message.encrypted_shares) != expected:
                logger.warning("dropping ShareKeys from %s: wrong recipients", message.sender_id)
            elif len(message.self_mask_commitment) != COMMITMENT_BYTES:
                logger.warning("dropping ShareKeys from %s: no seed commitment", message.sender_id)
            else:
                complete.setdefault(message.sender_id, message)
        self.shared_keys = tuple(sorted(complete))
        self.commitments = {
            sender: message.self_mask_commitment for sender, message in complete.items()
        }
        abort_if_below(
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
        abort_if_below(
            self.config.reconstruction_threshold,
            len(survivors),
            len(self.shared_keys),
            "sent masked inputs",
        )
        dropped = tuple(sorted(set(self.shared_keys) - set(survivors)))
        self.request = UnmaskRequest(self.round_id, survivors, dropped)
        return self.request

    def aggregate(self, responses: Sequence[UnmaskResponse]) -> SecAggResult:
        """Step 3: with >= t responses, rebuild and verify the requested secrets from all of
        them (a device revealing wrong shares is outvoted and named in the result's
        `rejections`), remove all masks and decode the survivors' sum. Raises SecAggAbort
        below t, ReconstructionAbort when a secret cannot be verified."""
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
        abort_if_below(
            self.config.reconstruction_threshold,
            len(valid),
            len(request.survivors),
            "answered the unmask request",
        )
        secrets = rebuild_secrets(
            self.round_id,
            request,
            valid,
            share_points(self.shared_keys),
            self.config.reconstruction_threshold,
            self.commitments,
            {device_id: advert.mask_public_key for device_id, advert in self.roster.items()},
        )
        bits = self.config.quantization.ring_bits
        size = self.layout.num_coordinates
        total = torch.zeros(size, dtype=torch.int64)  # (d,)
        for device_id in request.survivors:
            total += self.masked_inputs[device_id]
        for device_id in request.survivors:
            total -= expand_seed(secrets.self_mask_seeds[device_id], size, bits)
        for dropped_id, key in secrets.mask_keys.items():
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
            "secure aggregation %s: summed %d inputs, %d dropped, %d device(s) revealed wrong "
            "shares and were outvoted",
            self.round_id,
            len(request.survivors),
            len(request.dropped),
            len(secrets.rejections),
        )
        return SecAggResult(
            total=total,
            contributors=request.survivors,
            dropped=request.dropped,
            rejections=secrets.rejections,
        )
