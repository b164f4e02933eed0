"""The agent's uploads: publish an update frame (in chunks when large), offer again what the
coordinator has not acknowledged, and resend only the chunks it says it lacks.

The outbox (`edge_runtime.outbox`) is what makes an update durable; this keeps only what a
process needs while it lives: which chunked transfers are in flight and when each update
was last offered. A restarted agent offers every outbox entry again at once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable

from edge_runtime.outbox import Outbox
from edge_runtime.wire import (
    DEFAULT_CHUNK_BYTES,
    ChunkSender,
    DeviceChannel,
    Ed25519PrivateKey,
    MqttTransport,
    TransferStatus,
    TransferStatusRequest,
    device_topic,
    encode_frame,
)

logger = logging.getLogger(__name__)

RESEND_SECONDS = 20.0
"""An unacknowledged update is offered again after this long."""


class Uploads:
    """In-flight uploads of one device over one transport."""

    def __init__(
        self,
        fleet: str,
        device_id: str,
        key: Ed25519PrivateKey,
        outbox: Outbox,
        transport: Callable[[], MqttTransport],
        *,
        now: Callable[[], float] = time.time,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.key = key
        self.outbox = outbox
        self._transport = transport
        """The agent's current transport (it is made at start, after this object)."""
        self.now = now
        self.senders: dict[str, ChunkSender] = {}
        """Chunked transfers in flight, by update id."""
        self._last_sent: dict[str, float] = {}
        self._progress = progress
        """Told the fraction of an update's chunks handed to the transport (which blocks
        under a bandwidth limit), so the agent can show "uploading x%"."""

    def send(self, update_id: str, frame: bytes) -> None:
        """Publish an update frame, in chunks when it is larger than one chunk; a resend
        of a chunked one asks the coordinator which chunks it still lacks."""
        transport = self._transport()
        self.outbox.mark_sent(update_id)
        self._last_sent[update_id] = self.now()
        if len(frame) <= DEFAULT_CHUNK_BYTES:
            transport.publish(device_topic(self.fleet, self.device_id, DeviceChannel.UPDATE), frame)
            self._report(1.0)
            return
        sender = self.senders.get(update_id)
        if sender is None:
            transfer_id = hashlib.sha256(frame).hexdigest()[:32]
            sender = ChunkSender(frame, transfer_id=transfer_id, sender=self.device_id)
            self.senders[update_id] = sender
            self._publish_chunks(sender, range(sender.count))
            return
        request = TransferStatusRequest(
            transfer_id=sender.transfer_id, request_id=f"r{int(self.now() * 1000)}"
        )
        transport.publish(
            device_topic(self.fleet, self.device_id, DeviceChannel.TRANSFER),
            encode_frame(request, sender=self.device_id, signing_key=self.key),
        )

    def _publish_chunks(self, sender: ChunkSender, indices: Iterable[int]) -> None:
        transport = self._transport()
        topic = device_topic(self.fleet, self.device_id, DeviceChannel.CHUNK)
        wanted = list(indices)
        for done, (_, chunk) in enumerate(sender.frames(wanted), start=1):
            transport.publish(topic, chunk)
            self._report(done / len(wanted))

    def _report(self, fraction: float) -> None:
        if self._progress is not None:
            self._progress(fraction)

    def resend_pending(self, force: bool = False) -> None:
        """Offer again every update the coordinator has not acknowledged for a while (all of
        them at start-up: the previous run may have died before or after publishing)."""
        for pending in self.outbox.pending():
            last = self._last_sent.get(pending.update_id)
            if force or last is None or self.now() - last >= RESEND_SECONDS:
                logger.info("sending unacknowledged %s again", pending.update_id)
                self.send(pending.update_id, pending.frame)

    def acknowledged(self, update_id: str) -> None:
        self.senders.pop(update_id, None)

    def transfer_status(self, status: TransferStatus) -> None:
        """The coordinator's answer to "which chunks do you have?": send the missing ones."""
        for update_id, sender in list(self.senders.items()):
            if sender.transfer_id == status.transfer_id:
                missing = sender.missing_from(status)
                logger.info("resending %d missing chunk(s) of %s", len(missing), update_id)
                self._publish_chunks(sender, missing)
