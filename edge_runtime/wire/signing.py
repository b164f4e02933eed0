"""Ed25519 keys and signatures for state-changing messages.

Why Ed25519: 32-byte public keys fit a JSON header as hex, signing and verifying cost tens of
microseconds even on a Raspberry Pi, and `cryptography` ships wheels for every school device.
A device generates its key once, keeps the private half in a 0600 PEM file written atomically
(a crash mid-write never leaves a truncated key), and registers the public half with the
coordinator through a one-time enrollment token.

Signatures cover a domain-separation prefix plus the exact header bytes of a frame; the header
carries the body's sha256, so the body is covered too (see `protocol.encode_frame`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from durable.atomic_files import atomic_write_bytes
from edge_runtime.wire.errors import SchemaError, SignatureError

logger = logging.getLogger(__name__)

SIGNATURE_BYTES = 64
PUBLIC_KEY_HEX_CHARS = 64
SIGNATURE_CONTEXT = b"schoolfl/frame-signature/v1\x00"
"""Prefix of every signed byte string, so a signature made for a frame can never be
replayed as a signature over some other kind of data."""


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh device or coordinator key."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Store the key as unencrypted PKCS#8 PEM, mode 0600, atomically.

    Unencrypted because an agent restarts unattended (systemd); file permissions are the guard.
    """
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    atomic_write_bytes(Path(path), pem, mode=0o600)
    logger.info("wrote private key %s", path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a key saved by `save_private_key`; refuse any other key type."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("private key %s is readable by others (mode %o); chmod 600 it", path, mode)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"{path} holds a {type(key).__name__}, expected an Ed25519 private key; "
            "regenerate it with the agent's enroll command"
        )
    return key


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 lowercase hex characters (what headers carry)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse a public key from a header; raises `SchemaError` on anything but 64 hex chars."""
    if not isinstance(text, str) or len(text) != PUBLIC_KEY_HEX_CHARS:
        raise SchemaError(
            f"public key must be {PUBLIC_KEY_HEX_CHARS} hex characters, got {text!r:.80}"
        )
    try:
        raw = bytes.fromhex(text)
    except ValueError as error:
        raise SchemaError(f"public key is not hex: {text!r:.80}") from error
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as error:
        raise SchemaError(f"public key {text!r:.80} is not a valid Ed25519 key") from error


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """64-byte signature over the context prefix + `data`."""
    return key.sign(SIGNATURE_CONTEXT + bytes(data))


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Raise `SignatureError` unless `signature` is valid for `data` under `public_key`."""
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        public_key.verify(bytes(signature), SIGNATURE_CONTEXT + bytes(data))
    except InvalidSignature as error:
        raise SignatureError(
            "signature does not verify against the registered public key "
            "(forged, corrupted, or signed by another device); message refused"
        ) from error
