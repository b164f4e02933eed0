"""The coordinator's unmasking step: rebuild, verify and attribute every requested secret.

For each survivor u the coordinator needs u's self-mask seed b_u, for each dropped device v
its mask key s_v, rebuilt from the shares the survivors revealed. A device that reveals a
wrong share must not be able to change the result (the published adapter would move by
whatever PRG(b_u') - PRG(b_u) decodes to), so:

- every secret is *verified* before use: b_u against the commitment u sent with its share
  boxes (`commit_self_mask_seed`), s_v against the public key v advertised, in its clamped
  form (`mask_key_matches`);
- every revealed share takes part, not the first t, so a wrong one is detected and the
  secret is still rebuilt from the others (`edge_runtime.secagg.decoding`);
- a device whose share disagrees with a verified secret is named (`ShareFault.BAD_SHARE`),
  its shares are tried last for the remaining secrets, and the round goes on with the
  honest shares. A device whose own shares agree with each other but rebuild something
  other than what it committed to is named too (`ShareFault.BAD_SECRET`); its input cannot
  be unmasked, so the round is aborted.

When a secret cannot be rebuilt and verified (more liars than spare shares), unmasking stops
with `ReconstructionAbort`, whose message names the devices whose shares were involved and
whose `rejections` hold those proven to have lied. Nothing is output then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_runtime.secagg.config import ShareFault, ShareRejection
from edge_runtime.secagg.crypto import (
    KEY_BYTES,
    SEED_BYTES,
    commit_self_mask_seed,
    mask_key_matches,
)
from edge_runtime.secagg.decoding import DEFAULT_MAX_CANDIDATES, Decoding, ShareDecoder
from edge_runtime.secagg.messages import SecAggAbort, UnmaskRequest, UnmaskResponse
from edge_runtime.secagg.shamir import share_from_bytes

logger = logging.getLogger(__name__)

SELF_MASK_SEED = "self-mask seed"
MASK_KEY = "mask key"


class ReconstructionAbort(SecAggAbort):
    """A requested secret could not be rebuilt and verified from the revealed shares."""

    def __init__(self, message: str, rejections: tuple[ShareRejection, ...] = ()) -> None:
        super().__init__(message)
        self.rejections = rejections
        """Devices proven to have lied before unmasking stopped (recorded all the same)."""


@dataclass(frozen=True)
class RebuiltSecrets:
    """Every secret the unmask request asked for, each verified, and who lied about them."""

    self_mask_seeds: dict[str, bytes]
    """Survivor -> its self-mask seed b (matches its commitment)."""
    mask_keys: dict[str, X25519PrivateKey]
    """Dropped device -> its mask private key (matches its advertised public key)."""
    rejections: tuple[ShareRejection, ...]


def _seed_verifier(round_id: str, owner: str, commitment: bytes) -> Callable[[int], bool]:
    def verify(secret: int) -> bool:
        if secret >= 1 << (8 * SEED_BYTES):
            return False
        return commit_self_mask_seed(secret.to_bytes(SEED_BYTES, "big"), round_id, owner) == (
            commitment
        )

    return verify


def _key_verifier(public_key: bytes) -> Callable[[int], bool]:
    def verify(secret: int) -> bool:
        if secret >= 1 << (8 * KEY_BYTES):
            return False
        return mask_key_matches(secret.to_bytes(KEY_BYTES, "big"), public_key)

    return verify


class _Unmasking:
    """One aggregate call's bookkeeping: the decoder, and the lies found so far."""

    def __init__(
        self,
        round_id: str,
        responses: Mapping[str, UnmaskResponse],
        points: Mapping[str, int],
        threshold: int,
        max_candidates: int,
    ) -> None:
        self.round_id = round_id
        self.responses = responses
        self.points = {holder: points[holder] for holder in responses}
        self.holder_at = {x: holder for holder, x in self.points.items()}
        self.threshold = threshold
        self.decoder = ShareDecoder(threshold, max_candidates)
        self.lies: dict[str, list[str]] = {}
        """Responder -> the secrets ("<owner>'s <what>") whose share it revealed wrong."""

    def rebuild(
        self,
        owner: str,
        what: str,
        shares_of: Callable[[UnmaskResponse], Mapping[str, bytes]],
        verify: Callable[[int], bool],
        against: str,
    ) -> int:
        values = {
            self.points[holder]: share_from_bytes(shares_of(response)[owner])
            for holder, response in self.responses.items()
        }
        suspects = frozenset(self.points[holder] for holder in self.lies)
        decoding = self.decoder.decode(values, verify, suspects)
        for x in sorted(decoding.wrong_points):
            holder = self.holder_at[x]
            logger.debug(
                "secure aggregation %s: %s revealed a wrong share of %s's %s",
                self.round_id,
                holder,
                owner,
                what,
            )
            self.lies.setdefault(holder, []).append(f"{owner}'s {what}")
        if decoding.secret is None:
            raise self._failure(owner, what, against, decoding)
        return decoding.secret

    def _failure(
        self, owner: str, what: str, against: str, decoding: Decoding
    ) -> ReconstructionAbort:
        holders = sorted(self.responses)
        if decoding.dealt_wrong_secret:
            reason = (
                f"{owner!r} shared a {what} that does not match {against}: the "
                f"{len(holders)} shares of it revealed ({', '.join(holders)}) agree with each "
                f"other, so no device lied about them. {owner}'s masks cannot be removed, so "
                "the round is aborted and nothing is output"
            )
            culprit = ShareRejection(owner, ShareFault.BAD_SECRET, reason)
            return ReconstructionAbort(reason, (*self.rejections(), culprit))
        reason = (
            f"no {self.threshold} of the {len(holders)} shares of {owner}'s {what} revealed "
            f"by {', '.join(holders)} rebuild a {what} matching {against}: more than "
            f"{len(holders) - self.threshold} of those devices revealed wrong shares (or "
            f"{owner!r} dealt inconsistent ones). The round is aborted and nothing is output"
        )
        return ReconstructionAbort(reason, self.rejections())

    def rejections(self) -> tuple[ShareRejection, ...]:
        return tuple(
            ShareRejection(
                holder,
                ShareFault.BAD_SHARE,
                f"{holder!r} revealed wrong shares of {len(secrets)} secret(s) in secure round "
                f"{self.round_id} ({', '.join(secrets[:4])}{' ...' if len(secrets) > 4 else ''})"
                ": each disagrees with the secret rebuilt from the other devices' shares and "
                "verified against its owner's commitment or public key; they were outvoted",
            )
            for holder, secrets in sorted(self.lies.items())
        )


def _log(rejections: tuple[ShareRejection, ...]) -> None:
    for rejection in rejections:
        logger.warning("%s (%s)", rejection.reason, rejection.fault.value)


def _rebuild_all(
    round_id: str,
    request: UnmaskRequest,
    unmasking: _Unmasking,
    commitments: Mapping[str, bytes],
    mask_public_keys: Mapping[str, bytes],
) -> tuple[dict[str, bytes], dict[str, X25519PrivateKey]]:
    seeds = {}
    for owner in request.survivors:
        secret = unmasking.rebuild(
            owner,
            SELF_MASK_SEED,
            lambda response: response.self_mask_shares,
            _seed_verifier(round_id, owner, commitments[owner]),
            "its commitment",
        )
        seeds[owner] = secret.to_bytes(SEED_BYTES, "big")
    keys = {}
    for owner in request.dropped:
        secret = unmasking.rebuild(
            owner,
            MASK_KEY,
            lambda response: response.mask_key_shares,
            _key_verifier(mask_public_keys[owner]),
            "its advertised public key",
        )
        keys[owner] = X25519PrivateKey.from_private_bytes(secret.to_bytes(KEY_BYTES, "big"))
    return seeds, keys


def rebuild_secrets(
    round_id: str,
    request: UnmaskRequest,
    responses: Mapping[str, UnmaskResponse],
    points: Mapping[str, int],
    threshold: int,
    commitments: Mapping[str, bytes],
    mask_public_keys: Mapping[str, bytes],
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> RebuiltSecrets:
    """Rebuild and verify b of every survivor and the mask key of every dropped device.

    `responses`: responder -> its answer, each holding exactly the requested owners;
    `points`: device -> Shamir x; `commitments`: survivor -> its self-mask commitment;
    `mask_public_keys`: device -> its advertised mask public key. Raises
    ReconstructionAbort when a secret cannot be rebuilt and verified."""
    unmasking = _Unmasking(round_id, responses, points, threshold, max_candidates)
    try:
        seeds, keys = _rebuild_all(round_id, request, unmasking, commitments, mask_public_keys)
    except ReconstructionAbort as abort:
        _log(abort.rejections)
        raise
    rejections = unmasking.rejections()
    _log(rejections)
    return RebuiltSecrets(seeds, keys, rejections)
