"""Asking a device at once for the chunks the daemon's receive queue dropped.

When the loop falls behind (eight SmolLM2 fp32 updates of 19.6 MB arriving together fill
the 64 MiB receive queue), the transport drops messages and counts them per topic. A
device whose update chunks were dropped would resend only when its own resend timer fires
(~20 s), and the round waits that long. Instead, once that device's open transfers have
been quiet for `QUIET_SECONDS` (the rest of its chunks are not still on their way), the
daemon sends it a `TransferStatus` per open transfer naming the missing chunks, which the
agent answers by sending just those (`edge_runtime.uploads.Uploads.transfer_status`). A
device with no open transfer yet (its surviving chunks are still queued behind the
backlog) stays pending until one opens; a transfer whose every chunk was dropped never
opens, so after `GIVE_UP_SECONDS` the agent's own timer is left to cover it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from edge_runtime.wire import ChunkReassembler, TransferStatus, TransferStatusRequest

QUIET_SECONDS = 1.0
"""How long a device's transfers must have received nothing before it is asked."""
GIVE_UP_SECONDS = 30.0
"""A device still without an open transfer this long after its drops is not asked."""


class DroppedChunkRecovery:
    """Devices with dropped chunks, asked for them once their transfers are quiet."""

    def __init__(
        self, reassembler: ChunkReassembler, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.reassembler = reassembler
        self.now = now
        self.pending: dict[str, float] = {}
        """Device id -> when its chunks were first dropped, until it has been asked."""

    def note(self, device_id: str) -> None:
        self.pending.setdefault(device_id, self.now())

    def due(self) -> list[tuple[str, TransferStatus]]:
        """(device id, what it should resend) for each quiet device; those leave `pending`."""
        asks = []
        for device_id, dropped_at in sorted(self.pending.items()):
            transfer_ids = self.reassembler.quiet_transfers(device_id, QUIET_SECONDS)
            if not transfer_ids:  # chunks still arriving, or none accepted yet: wait
                if self.now() - dropped_at >= GIVE_UP_SECONDS:
                    del self.pending[device_id]
                continue
            del self.pending[device_id]
            for transfer_id in transfer_ids:
                request = TransferStatusRequest(transfer_id, f"dropped-{secrets.token_hex(4)}")
                asks.append((device_id, self.reassembler.status(request)))
        return asks
