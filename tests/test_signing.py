"""Ed25519 keys on disk and signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.wire import (
    SchemaError,
    SignatureError,
    generate_private_key,
    load_private_key,
    public_key_from_hex,
    public_key_hex,
    save_private_key,
    sign,
    verify,
)


def test_key_round_trips_through_a_0600_pem(tmp_path: Path) -> None:
    key = generate_private_key()
    path = tmp_path / "keys" / "device.pem"
    save_private_key(key, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in path.read_bytes()
    loaded = load_private_key(path)
    assert public_key_hex(loaded) == public_key_hex(key)
    assert [p.name for p in path.parent.iterdir()] == ["device.pem"]  # no temp files left


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "device.pem"
    first, second = generate_private_key(), generate_private_key()
    save_private_key(first, path)
    save_private_key(second, path)
    assert public_key_hex(load_private_key(path)) == public_key_hex(second)


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SignatureError, match="expected an Ed25519"):
        load_private_key(path)


def test_sign_and_verify() -> None:
    key = generate_private_key()
    signature = sign(key, b"header")
    verify(public_key_from_hex(public_key_hex(key)), b"header", signature)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(key.public_key(), b"headeR", signature)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(generate_private_key().public_key(), b"header", signature)
    with pytest.raises(SignatureError, match="64 bytes"):
        verify(key.public_key(), b"header", signature[:10])


@pytest.mark.parametrize("text", ["", "zz" * 32, "ab" * 31, 5])
def test_bad_public_key_text(text: object) -> None:
    with pytest.raises(SchemaError):
        public_key_from_hex(text)  # type: ignore[arg-type]
