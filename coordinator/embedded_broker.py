"""An MQTT broker inside this process (amqtt), for a laptop trial without Mosquitto.

Production uses Mosquitto (see deploy/mosquitto/). The demo's default is this embedded
broker so that `schoolfl demo` needs nothing but pip. It runs amqtt's asyncio broker on its
own thread and event loop, bound to loopback, anonymous, and stops cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from coordinator.mosquitto import free_loopback_port

logger = logging.getLogger(__name__)


class EmbeddedBrokerError(RuntimeError):
    """amqtt is missing or the broker did not start."""


class EmbeddedBroker:
    """`start()` then use `url`; `stop()` when done. Loopback only, no authentication."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_loopback_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: object | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

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
        self._loop = loop
        try:
            self._broker = Broker(self._config(), loop=loop)
            loop.run_until_complete(self._broker.start())  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - reported to start()'s caller
            self._error = error
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        loop.close()

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
