"""Shamir secret sharing over the prime field GF(p), p = 2^256 + 297, threshold t of n.

Why this prime: the two secrets shared in secure aggregation are 32-byte strings (a self-mask
seed and an X25519 private key), i.e. integers below 2^256; the smallest prime above 2^256
holds every one of them without splitting. (2^256 + 297 passes Miller-Rabin; a test checks.)
A share is then 33 bytes.

split: pick a random polynomial f of degree t-1 with f(0) = secret; share i is (i, f(i)) for
the device's 1-based position i in the round's sorted roster.
reconstruct: Lagrange interpolation at 0 from any t shares. Fewer than t shares reveal nothing
about the secret (every value of f(0) stays equally likely).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**256 + 297
SHARE_BYTES = 33


def split_secret(secret: int, threshold: int, points: list[int]) -> dict[int, int]:
    """Return {x: f(x)} for a fresh random polynomial of degree threshold-1 with f(0)=secret."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be an integer in [0, PRIME)")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be in [1, {len(points)}], got {threshold}")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError("share points must be distinct non-zero field elements")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        value = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            value = (value * x + coefficient) % PRIME
        shares[x] = value
    return shares


def reconstruct_secret(shares: Mapping[int, int], threshold: int) -> int:
    """Interpolate f(0) from the first `threshold` shares (by x); needs at least that many."""
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    points = sorted(shares)[:threshold]
    secret = 0
    for x_j in points:
        numerator, denominator = 1, 1
        for x_m in points:
            if x_m != x_j:
                numerator = numerator * (-x_m) % PRIME  # Lagrange basis l_j(0)
                denominator = denominator * (x_j - x_m) % PRIME
        basis = numerator * pow(denominator, -1, PRIME) % PRIME
        secret = (secret + shares[x_j] * basis) % PRIME
    return secret


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("share value is not a field element")
    return value
