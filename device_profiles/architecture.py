"""CPU architecture names, compared across the spellings platforms give them.

An agent reports `platform.machine()` at enrollment; its profile names an architecture too.
Both the agent (to warn) and the coordinator (to show a mismatch) compare the two, so the
comparison lives here, below both daemons.
"""

from __future__ import annotations

# `platform.machine()` says aarch64 on Linux and arm64 on macOS; Windows says AMD64.
_ARCHITECTURE_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def normalize_architecture(name: str) -> str:
    """One spelling per architecture, so `arm64` and `aarch64` compare equal."""
    lowered = name.strip().lower()
    return _ARCHITECTURE_ALIASES.get(lowered, lowered)


def architectures_disagree(profile_architecture: str, machine: str) -> bool:
    """True when both are known and name different architectures."""
    if not profile_architecture or not machine:
        return False
    return normalize_architecture(profile_architecture) != normalize_architecture(machine)


def architecture_mismatch(profile_architecture: str, machine: str) -> str | None:
    """The warning to give when the configured profile describes other hardware than this.

    The scheduler prices a device with its profile's figures; a Pi enrolled with a laptop
    profile gets laptop-sized plans it cannot finish. Returns None when they agree (or when
    either is unknown)."""
    if not architectures_disagree(profile_architecture, machine):
        return None
    return (
        f"this device is {machine} but its profile says {profile_architecture}: the "
        f"coordinator will plan rounds for the wrong hardware. Set `profile` in agent.toml "
        f"to a matching reference profile (`schoolfl profile list`) or measure one "
        f"(`schoolfl profile bench --out me.toml`)"
    )
