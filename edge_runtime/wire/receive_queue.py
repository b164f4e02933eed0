"""The bounded queue between paho's network thread and a daemon's loop.

Why: paho calls `on_message` on its own thread as fast as the broker delivers, and the
daemon's loop drains the queue one message at a time. With an unbounded queue, a flood from
one device while the loop is busy (decoding an update, aggregating) sits in our memory: the
measured cost was +343 MiB. So the queue is bounded in messages and in bytes, and a message
arriving while it is full is dropped and counted (`dropped`, `take_drops()` by topic).

Why drop-and-count rather than paho 2.x's `manual_ack` (PUBACK a QoS 1 message only after the
loop handled it, so the broker holds the rest):
- It does not bound anything a hostile device controls. Only QoS 1/2 deliveries wait for
  our PUBACK; a device that publishes at QoS 0 is delivered at QoS 0 (the lower of the two
  QoS levels) and never counts against the broker's in-flight window, so manual_ack alone
  still lets it fill our memory. A bound in bytes is needed either way.
- The backlog moves into the broker's queue for our session, in arrival order, so honest
  devices' messages wait behind the flood there; past `max_queued_messages` Mosquitto drops
  them silently (and holds up to that many payloads in its own memory). Loss still happens,
  only where the daemon cannot count it or name the device.
- Every consumer must acknowledge every message: one that forgets (or a handler that
  raises before acking) stalls delivery for good once the window (20 by default) is full.
  The agent, the coordinator, enrollment and the tests all read `received.get()` today.
A drop is recoverable by the protocol itself: an update is resent from the agent's outbox
until it is acknowledged, a chunked transfer resumes with `TransferStatusRequest`, a device
state is republished every heartbeat. So the queue drops, counts and says so.

The bounds apply to payload bytes plus a fixed per-message overhead, so a flood of empty
messages is bounded too. The defaults hold 128 upload chunks of 512 KiB (four frames of the
16 MiB maximum) and are set per daemon through `[broker]` (`BrokerSettings`): an agent that
downloads a global adapter larger than the bound while its loop trains should raise it
(model chunks arrive all at once, retained), or resubscribe to the blob topic after drops,
which makes the broker send the retained chunks again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MESSAGE_OVERHEAD_BYTES = 256
"""What one queued message costs beyond its payload and topic (the object and its slot)."""
MAX_DROP_TOPICS = 1024
"""Distinct topics `take_drops` reports one by one; further ones are summed under ""."""
DEFAULT_MAX_MESSAGES = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as it came off the broker (decode it with `protocol.decode_frame`)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool

    @property
    def cost_bytes(self) -> int:
        """What holding it in the queue counts against `ReceiveQueueConfig.max_bytes`."""
        return len(self.payload) + len(self.topic) + MESSAGE_OVERHEAD_BYTES


@dataclass(frozen=True)
class ReceiveQueueConfig:
    """Bounds of `MqttTransport.received`; a message that would exceed one is dropped."""

    max_messages: int = DEFAULT_MAX_MESSAGES
    """Messages waiting for the loop. 10 000 is minutes of heartbeats from a district, or a
    burst of every device's upload chunks."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Bytes waiting for the loop (payload + topic + 256 per message). 64 MiB is 128 upload
    chunks of 512 KiB, or a global adapter of 16 M fp32 parameters arriving while the
    agent trains; keep it above `Limits.max_frame_bytes` (16 MiB), or the largest frames
    always drop."""

    def validate(self) -> None:
        if self.max_messages < 1:
            raise ValueError(f"receive queue max_messages must be >= 1, got {self.max_messages}")
        if self.max_bytes < 1:
            raise ValueError(f"receive queue max_bytes must be >= 1, got {self.max_bytes}")


class ReceiveQueue(queue.Queue[ReceivedMessage]):
    """A `queue.Queue` of `ReceivedMessage` that `offer` keeps within its bounds.

    Consumers use it as any queue (`get(timeout=...)`); the transport's callback calls
    `offer`, which never blocks. `put` stays unbounded for tests that inject messages.
    Counters are plain ints, read without the lock (a daemon logging them may be one
    message behind)."""

    def __init__(self, config: ReceiveQueueConfig | None = None) -> None:
        super().__init__()
        self.config = config or ReceiveQueueConfig()
        self.config.validate()
        self.queued_bytes = 0
        """Cost of the messages waiting now."""
        self.arrived = 0
        """Every message offered, dropped or not."""
        self.dropped = 0
        self.dropped_bytes = 0
        """Payload bytes of the dropped messages."""
        self._drops: Counter[str] = Counter()
        self._dropping_since = 0
        """`dropped` when the current episode of drops began (0 when not dropping)."""
        self._dropping = False
        self._arrival = threading.Condition(self.mutex)

    # queue.Queue calls these with its mutex held.
    def _put(self, item: ReceivedMessage) -> None:
        super()._put(item)
        self.queued_bytes += item.cost_bytes

    def _get(self) -> ReceivedMessage:
        item = super()._get()
        self.queued_bytes -= item.cost_bytes
        return item

    def offer(self, message: ReceivedMessage) -> bool:
        """Queue `message` if it fits both bounds; otherwise drop and count it. Never
        blocks: paho's network thread calls it."""
        cost = message.cost_bytes
        started = ended = False
        episode = 0
        with self.mutex:
            self.arrived += 1
            full = (
                self._qsize() >= self.config.max_messages
                or self.queued_bytes + cost > self.config.max_bytes
            )
            if full:
                self.dropped += 1
                self.dropped_bytes += len(message.payload)
                topic = message.topic if message.topic in self._drops else ""
                if not topic and len(self._drops) < MAX_DROP_TOPICS:
                    topic = message.topic
                self._drops[topic] += 1
                started = not self._dropping
                if started:
                    self._dropping, self._dropping_since = True, self.dropped - 1
            else:
                self._put(message)
                self.unfinished_tasks += 1
                self.not_empty.notify()
                ended = self._dropping
                episode = self.dropped - self._dropping_since
                self._dropping = False
            queued, queued_bytes = self._qsize(), self.queued_bytes
            self._arrival.notify_all()
        if full and started:
            logger.warning(
                "receive queue full (%d messages, %d bytes; bounds %d, %d): dropping messages "
                "until the loop catches up, first on %s",
                queued,
                queued_bytes,
                self.config.max_messages,
                self.config.max_bytes,
                message.topic[:200],
            )
        elif not full and ended:
            logger.warning("receive queue accepts again after dropping %d message(s)", episode)
        return not full

    def take_drops(self) -> dict[str, int]:
        """Drops by topic since the last call (topics past the first 1024 under ""), so a
        daemon can count each as a refusal of the device that published it."""
        with self.mutex:
            drops, self._drops = dict(self._drops), Counter()
        return drops

    def wait_arrived(self, count: int, timeout_seconds: float) -> bool:
        """True once `count` messages have been offered in all (queued or dropped)."""
        with self._arrival:
            return self._arrival.wait_for(lambda: self.arrived >= count, timeout=timeout_seconds)
