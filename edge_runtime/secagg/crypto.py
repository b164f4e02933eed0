"""Cryptographic building blocks of secure aggregation: key agreement, seeds, PRG, share boxes.

All primitives come from `cryptography` (OpenSSL); nothing here uses Python's or torch's RNG.

- Key agreement: X25519. Each device makes two fresh key pairs per round: the *cipher* pair
  (c) whose agreement keys the AES-GCM boxes that carry Shamir shares, and the *mask* pair
  (s) whose agreement seeds the pairwise masks. Separate pairs let the coordinator learn a
  dropped device's s-key (to cancel its masks) without learning how to open its share boxes.
- Seeds: HKDF-SHA256(shared secret, salt = none, info = purpose | round id | the two device
  ids in sorted order) -> 32 bytes. Binding the round and the pair into `info` means a seed
  is never reused across rounds or pairs even if a key pair were.
- PRG: ChaCha20 keystream with the 32-byte seed as key, an all-zero 16-byte nonce/counter
  block (each seed keys exactly one stream), read as little-endian uint32 words and reduced
  mod 2^k (uniform because 2^k divides 2^32). Deterministic, so both ends of a pair and the
  coordinator (after reconstructing a key) derive the same mask.
- Share boxes: AES-256-GCM, key = HKDF of the c-agreement, random 96-bit nonce prepended,
  associated data = round id, sender, recipient, so a box cannot be replayed to another
  recipient or round. The relaying coordinator holds neither c private key and cannot open it.
- Verifying reconstructed secrets: a self-mask seed against the SHA-256 commitment its owner
  sent with its share boxes (`commit_self_mask_seed`), a mask key against the public key its
  owner advertised. The mask key is shared in its RFC 7748 clamped form and only a clamped
  reconstruction is accepted: X25519 ignores five bits of a raw key, and without the check
  a device revealing a crafted wrong share could pass a different-but-equivalent key.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
KEY_BYTES = 32
NONCE_BYTES = 12
PROTOCOL_LABEL = b"schoolfl-secagg/v1"
MASK_PURPOSE = b"pairwise-mask"
SHARE_BOX_PURPOSE = b"share-box"
SELF_MASK_COMMITMENT_PURPOSE = b"self-mask-commitment"
COMMITMENT_BYTES = 32


def generate_key_pair() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def private_key_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def clamp_private_key(raw: bytes) -> bytes:
    """RFC 7748 clamping (what X25519 applies to a scalar before use): same public key."""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    clamped = bytearray(raw)
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    return bytes(clamped)


def mask_key_matches(raw: bytes, public_key: bytes) -> bool:
    """True when `raw` is a clamped X25519 private key whose public key is `public_key`."""
    if len(raw) != KEY_BYTES or clamp_private_key(raw) != raw:
        return False
    return public_key_bytes(X25519PrivateKey.from_private_bytes(raw)) == public_key


def agree_seed(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    purpose: bytes,
    round_id: str,
    device_ids: tuple[str, str],
) -> bytes:
    """X25519 + HKDF-SHA256 -> a 32-byte seed both devices of the pair derive identically."""
    shared_secret = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    first, second = sorted(device_ids)
    info = b"|".join([PROTOCOL_LABEL, purpose, round_id.encode(), first.encode(), second.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(
        shared_secret
    )


def expand_seed(seed: bytes, num_coordinates: int, ring_bits: int) -> torch.Tensor:
    """PRG: ChaCha20 keystream under `seed` -> int64 tensor of uniform values in [0, 2^k)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    keystream = encryptor.update(bytes(4 * num_coordinates))
    words = np.frombuffer(keystream, dtype="<u4").astype(np.int64)  # (d,)
    if ring_bits < 32:
        words &= (1 << ring_bits) - 1
    return torch.from_numpy(words)


def new_seed() -> bytes:
    """A fresh self-mask seed b_u (OS randomness)."""
    return os.urandom(SEED_BYTES)


def commit_self_mask_seed(seed: bytes, round_id: str, device_id: str) -> bytes:
    """SHA-256(label | purpose | round | device | seed): the commitment a device sends with
    its share boxes, so the coordinator can tell a correctly reconstructed seed from one
    rebuilt from a lying device's shares. It hides the seed (32 uniformly random bytes) and
    binds it (no other seed has the same hash); round and device are bound in so it cannot
    be replayed for another round or device. Ids are identifiers (no `|`); the seed has a
    fixed length, so the encoding is unambiguous."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a self-mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    parts = [PROTOCOL_LABEL, SELF_MASK_COMMITMENT_PURPOSE, round_id.encode(), device_id.encode()]
    return hashlib.sha256(b"|".join(parts) + b"|" + seed).digest()


def share_box_aad(round_id: str, sender_id: str, recipient_id: str) -> bytes:
    return b"|".join(
        [
            PROTOCOL_LABEL,
            SHARE_BOX_PURPOSE,
            round_id.encode(),
            sender_id.encode(),
            recipient_id.encode(),
        ]
    )


def seal_share_box(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encrypt; the result is nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_share_box(key: bytes, box: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM decrypt; raises `cryptography.exceptions.InvalidTag` on a wrong key/box."""
    return AESGCM(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], associated_data)
