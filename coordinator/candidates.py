"""The enrolled devices as the daemon's scheduling sees them, kept incrementally.

Before, every 0.2 s tick read every device row and parsed every online device's profile
TOML (~1-4 ms each: a whole core at ~50 devices, and the message loop blocked meanwhile).
Now the records and parsed profiles are cached and read again only when the store says the
devices may have changed (`CoordinatorStore.change_marker`: SQLite's `data_version` for
another process's commit, such as `schoolfl coordinator revoke`, and this connection's own
enrollments); a profile is parsed again only when its text changed (a re-enrollment). The
candidate list itself is built only when some task can open a round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from coordinator.device_status import not_a_candidate_reason
from coordinator.scheduler import DeviceCandidate
from coordinator.store import CoordinatorStore, DeviceRecord
from device_profiles.profile import DeviceProfile, profile_from_toml_text
from edge_runtime.wire import DeviceState

logger = logging.getLogger(__name__)


class Heartbeat(Protocol):
    """What the roster needs of a device's latest heartbeat (the daemon's DeviceLiveness)."""

    @property
    def state(self) -> DeviceState: ...

    @property
    def received_at(self) -> float: ...


class DeviceRoster:
    """Cached device records and parsed profiles, refreshed when the store changes."""

    def __init__(self, store: CoordinatorStore) -> None:
        self.store = store
        self.records: dict[str, DeviceRecord] = {}
        """Device id -> its record, in device id order (as `store.devices()` returns them)."""
        self.revoked: frozenset[str] = frozenset()
        self._profiles: dict[str, tuple[str, DeviceProfile | None]] = {}
        """Device id -> (profile text, the profile parsed from it; None when it does not
        parse, which enrollment refuses, so only a store edited by hand has one)."""
        self._parsed: dict[str, DeviceProfile | None] = {}
        """Profile text -> its parse: a district's devices mostly enroll with one of a few
        reference profiles, so 5,000 devices cost a handful of parses, not 5,000."""
        self._marker: tuple[int, int] | None = None
        self.reloads = 0
        """How often the records were read again (tests and benchmarks check it)."""

    def refresh(self) -> frozenset[str]:
        """Read the devices again if the store changed since the last call (one PRAGMA
        otherwise); the revoked device ids."""
        marker = self.store.change_marker()
        if marker == self._marker:
            return self.revoked
        if self._marker is None or marker[0] != self._marker[0]:
            self._reload()  # another process wrote: rare (a revocation, a token)
        else:  # this daemon enrolled or revoked a few devices: read only those
            self._reload_devices(self.store.device_writes[self._marker[1] : marker[1]])
        self._marker = marker
        return self.revoked

    def _reload_devices(self, device_ids: list[str]) -> None:
        added = False
        for device_id in set(device_ids):
            record = self.store.device(device_id)
            if record is None:
                continue
            added |= device_id not in self.records
            self.records[device_id] = record
        if added:  # keep the store's device id order
            self.records = dict(sorted(self.records.items()))
        self.revoked = frozenset(d for d, record in self.records.items() if record.revoked)

    def _reload(self) -> None:
        records = {record.device_id: record for record in self.store.devices()}
        for device_id in set(self._profiles) - set(records):
            del self._profiles[device_id]
        in_use = {text for text, _ in self._profiles.values()}
        self._parsed = {t: p for t, p in self._parsed.items() if t in in_use}
        self.records = records
        self.revoked = frozenset(d for d, record in records.items() if record.revoked)
        self.reloads += 1

    def profile(self, record: DeviceRecord) -> DeviceProfile | None:
        """The device's parsed profile, parsed again only when its text changed."""
        cached = self._profiles.get(record.device_id)
        if cached is not None and cached[0] == record.profile_toml:
            return cached[1]
        text = record.profile_toml
        profile: DeviceProfile | None
        if text in self._parsed:
            profile = self._parsed[text]
        else:
            try:
                profile = profile_from_toml_text(text)
            except ValueError as error:
                logger.warning(
                    "device %s: its stored profile does not parse: %s", record.device_id, error
                )
                profile = None
            self._parsed[text] = profile
        self._profiles[record.device_id] = (text, profile)
        return profile

    def candidates(
        self, liveness: Mapping[str, Heartbeat], now: float, device_timeout_seconds: float
    ) -> tuple[list[DeviceCandidate], dict[str, str]]:
        """Enrolled, not revoked, online and eligible devices with their profiles, and why
        each other enrolled device was dropped (device id -> reason)."""
        result: list[DeviceCandidate] = []
        dropped: dict[str, str] = {}
        for device_id, record in self.records.items():
            live = liveness.get(device_id)
            reason = not_a_candidate_reason(
                record.revoked,
                None if live is None else live.state,
                0.0 if live is None else now - live.received_at,
                device_timeout_seconds,
            )
            if reason is not None:
                dropped[device_id] = reason
                continue
            assert live is not None  # a device without a heartbeat has a reason above
            profile = self.profile(record)
            if profile is None:
                dropped[device_id] = "its stored profile does not parse (enroll it again)"
                continue
            result.append(
                DeviceCandidate(
                    device_id,
                    record.school,
                    profile,
                    live.state.free_memory_bytes,
                    frozenset(live.state.capabilities or ()),
                )
            )
        return result, dropped
