"""The protocol's exception hierarchy.

Every decoder in `edge_runtime` (frames, messages, chunks, update bodies, signatures) raises
only `ProtocolError` subclasses, so a daemon can catch one type at its message boundary,
count the rejection by class and log the message, without ever crashing on bad input
(DESIGN invariant 5). Messages say what was expected, what arrived and what to do.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base class: a frame, message, chunk or update body was refused."""


class FrameError(ProtocolError):
    """The binary frame is malformed (magic, lengths, header JSON, body digest)."""


class UnsupportedVersionError(ProtocolError):
    """The peer speaks a protocol version this build does not understand."""


class SchemaError(ProtocolError):
    """A header parsed but a field is missing, unknown, of the wrong type or out of range."""


class LimitExceededError(ProtocolError):
    """A declared or actual size is above the configured limit (checked before allocating)."""


class SignatureError(ProtocolError):
    """A signature is missing, malformed, or does not verify against the registered key."""


class ReplayError(ProtocolError):
    """A message id was already seen (the duplicate is acknowledged and ignored)."""


class StaleRoundError(ProtocolError):
    """A message refers to a round that is already closed (or not yet open)."""


class ChunkError(ProtocolError):
    """A chunk is inconsistent with its transfer (index, count, size, whole-body digest)."""


class CodecError(ProtocolError):
    """An update body does not decode: wrong names, shapes, dtypes, or non-finite values."""
