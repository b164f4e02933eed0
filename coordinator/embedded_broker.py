"""An MQTT broker inside this process (amqtt), for a laptop trial without Mosquitto.

Production uses Mosquitto (see deploy/mosquitto/). The demo's default is this embedded
broker so that `schoolfl demo` needs nothing but pip. It runs amqtt's asyncio broker on its
own thread and event loop, bound to loopback, anonymous, and stops cleanly.

amqtt 0.12.1 (the newest release) has two faults in `Broker._handle_client_session` that a
fleet connecting at once trips over, both worked around here by `_patched_broker_class`:

- it iterates `Broker._subscriptions` while awaiting retained-message deliveries, so another
  client subscribing meanwhile raises `RuntimeError: dictionary changed size during
  iteration`; asyncio prints the traceback ("Unhandled exception in client_connected_cb")
  and closes that client's connection right after its CONNACK. The client sees an
  unspecified disconnect, reconnects after paho's back-off (1-2 s) and resubscribes in
  `on_connect`, so nothing is lost for our transport, but the start costs a reconnect per
  victim and the first screen shows a traceback (measured: 4 of 6 clients, 7 of 30);
- in that same loop it sends a newly connected client the retained messages matching
  *every other client's* filters, though the client subscribed to none of them (a device
  would receive another device's retained status). Mosquitto does not.

The fix iterates a snapshot of the subscriptions and sends retained messages only for the
filters the session itself holds. It is applied only where amqtt still has the private
names it relies on (checked at start); elsewhere the plain broker runs and a warning says so.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from importlib import metadata
from typing import Any

from coordinator.mosquitto import free_loopback_port

logger = logging.getLogger(__name__)

PATCHED_AMQTT_VERSIONS = ("0.11", "0.12")
"""Release series whose `Broker` internals the workaround was read against (0.12.1 checked
line by line); a newer series gets the workaround only if the same private names exist."""


class SnapshotIterationDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration walks a copy, so a coroutine that awaits inside
    `for topic in subscriptions` is not broken by another client subscribing meanwhile."""

    def __iter__(self):  # noqa: ANN204 - dict's own signature
        return iter(list(dict.keys(self)))

    def keys(self):  # noqa: ANN201
        return list(dict.keys(self))

    def items(self):  # noqa: ANN201
        return list(dict.items(self))

    def values(self):  # noqa: ANN201
        return list(dict.values(self))


def _amqtt_version() -> str:
    try:
        return metadata.version("amqtt")
    except metadata.PackageNotFoundError:
        return "unknown"


def _patched_broker_class(broker_class: type) -> type:
    """amqtt's `Broker` with the two faults in the module docstring fixed, or `broker_class`
    itself when its internals are not the ones the fix was written for."""
    version = _amqtt_version()
    if not hasattr(broker_class, "_publish_retained_messages_for_subscription") or not hasattr(
        broker_class, "_handle_client_session"
    ):
        logger.warning(
            "amqtt %s: Broker internals differ from %s; the embedded broker runs unpatched",
            version,
            "/".join(PATCHED_AMQTT_VERSIONS),
        )
        return broker_class

    class SubscriptionSafeBroker(broker_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not isinstance(getattr(self, "_subscriptions", None), dict):
                raise EmbeddedBrokerError(f"amqtt {version}: Broker._subscriptions is not a dict")
            self._subscriptions = SnapshotIterationDict(self._subscriptions)

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            """Only for a filter this session holds: at connect amqtt offers every filter
            any client holds; after SUBSCRIBE the filter is already the session's."""
            holders = self._subscriptions.get(subscription[0], [])
            if any(held.client_id == session.client_id for held, _qos in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    if not version.startswith(PATCHED_AMQTT_VERSIONS):
        logger.info("amqtt %s: applying the 0.12.1 subscription workaround", version)
    return SubscriptionSafeBroker


class EmbeddedBrokerError(RuntimeError):
    """amqtt is missing or the broker did not start."""


class EmbeddedBroker:
    """`start()` then use `url`; `stop()` when done. Loopback only, no authentication.

    An exception the broker leaves unhandled in a client's connection is counted in
    `connection_errors` and logged as one warning line (traceback at DEBUG): the demo's
    screen is for the demo, and the client reconnects on its own."""

    patch_amqtt: bool = True
    """False runs amqtt's Broker as released (tests use it to show the fault)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_loopback_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: object | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.connection_errors = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, object]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "sys_interval": 0,
            "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
            "topic-check": {"enabled": False},
        }

    def _serve(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as error:
            self._error = EmbeddedBrokerError(
                f"the embedded broker needs amqtt: pip install 'schoolfl[coordinator]' ({error})"
            )
            self._started.set()
            return
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._on_loop_error)
        self._loop = loop
        broker_class = _patched_broker_class(Broker) if self.patch_amqtt else Broker
        try:
            self._broker = broker_class(self._config(), loop=loop)
            loop.run_until_complete(self._broker.start())  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - reported to start()'s caller
            self._error = error
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        loop.close()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's handler for what amqtt did not catch: count it, say it in one line."""
        self.connection_errors += 1
        error = context.get("exception")
        logger.warning(
            "embedded broker: %s (%r); the client reconnects",
            context.get("message", "unhandled error"),
            error,
        )
        logger.debug("embedded broker error context: %s", context, exc_info=error)

    def start(self, timeout_seconds: float = 20.0) -> None:
        # amqtt logs every connection, and warns about options a loopback trial does not
        # need (password file, $SYS interval): keep the demo's console readable.
        logging.getLogger("amqtt").setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._serve, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_seconds):
            raise EmbeddedBrokerError(f"embedded broker did not start within {timeout_seconds} s")
        if self._error is not None:
            raise EmbeddedBrokerError(f"embedded broker failed to start: {self._error}")
        logger.info("embedded MQTT broker listening on %s", self.url)

    def stop(self, timeout_seconds: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(
            self._broker.shutdown(),
            self._loop,  # type: ignore[attr-defined]
        )
        try:
            future.result(timeout=timeout_seconds)
        except Exception as error:  # noqa: BLE001 - stopping anyway; say why it was unclean
            logger.warning("embedded broker shutdown: %s", error)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=timeout_seconds)
        self._loop = None
