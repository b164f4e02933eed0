"""Daemons log their lifecycle and round summaries at INFO even without `-v`: their logs are
what operators read (journald, the demo's log folder)."""

from __future__ import annotations

import logging


def use_info_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
