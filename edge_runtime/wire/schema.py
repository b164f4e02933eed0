"""Schema helpers for the wire messages: field validators and JSON conversion.

Why dataclasses plus a small reflective converter instead of a schema library: the agent
runs on a Raspberry Pi with a minimal environment, the set of field types is tiny (str, int,
float, bool, enums, optional values, tuples, a str->float dict, nested dataclasses), and a
converter driven by the dataclass annotations keeps one definition per message: the class
*is* the schema. Conversion refuses unknown and missing fields, wrong JSON types, non-finite
numbers and oversize strings, with messages that name the field and the bad value.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import functools
import math
import re
import types
import typing
from typing import Any, TypeVar, Union

from edge_runtime.wire.errors import SchemaError

MAX_STRING_CHARS = 4096
MAX_SEQUENCE_ITEMS = 65536
MAX_SAFE_INTEGER = 2**53

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Fleet, device, task and transfer ids. They become MQTT topic levels and Mosquitto
usernames, so `/`, `+`, `#`, spaces and empty strings are refused."""
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def check_identifier(name: str, value: str) -> None:
    if not isinstance(value, str) or not IDENTIFIER_PATTERN.match(value):
        raise SchemaError(
            f"{name} must match {IDENTIFIER_PATTERN.pattern} (letters, digits, _ . -; "
            f"at most 64 chars), got {value!r:.80}"
        )


def check_sha256(name: str, value: str) -> None:
    if not isinstance(value, str) or not SHA256_PATTERN.match(value):
        raise SchemaError(f"{name} must be 64 lowercase hex chars (sha256), got {value!r:.80}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise SchemaError(f"{name} must be in [{low}, {high}], got {value!r}")


# ----------------------------------------------------------------------------- JSON conversion

T = TypeVar("T")


def to_json_fields(message: Any) -> dict[str, Any]:
    """A message (or plan) as JSON-ready fields; enums become their values.

    A field declared with `metadata={"omit_if_none": True}` is left out while it is None:
    that is how an optional field is added without breaking peers that predate it (they
    refuse unknown fields). A field declared with `metadata={"omit_if_default": True}` is
    left out while it equals its default, for the same reason (a plan's memory levers: see
    `device_profiles.plan.OMIT_IF_DEFAULT`)."""
    return {
        f.name: _to_json(getattr(message, f.name))
        for f in dataclasses.fields(message)
        if not _omitted(f, getattr(message, f.name))
    }


def _omitted(spec: dataclasses.Field[Any], value: object) -> bool:
    """Whether the encoder leaves this field out (see `to_json_fields`)."""
    if spec.metadata.get("omit_if_none") and value is None:
        return True
    return bool(spec.metadata.get("omit_if_default")) and value == spec.default


def _to_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_fields(value)
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


@functools.cache
def _schema_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """A message class's resolved type hints and fields, worked out once per class:
    `typing.get_type_hints` evaluates every annotation string, and doing that per message
    was a third of an idle coordinator's CPU at 1,000 heartbeating devices (issue 20)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def from_json_fields(cls: type[T], data: object, path: str = "") -> T:
    """Build `cls` from parsed JSON, refusing unknown/missing fields and wrong types.

    A field may be left out when it has a default, unless it is declared with
    `metadata={"wire_required": True}` (a plan's defaults serve Python callers, not peers).
    The constructor's own checks run last; a `ValueError` or `TypeError` they raise (a
    `device_profiles.ProfileError` from a `TrainingPlan`, say) becomes a `SchemaError`
    naming the path, so a daemon's `ProtocolError` boundary catches every bad value."""
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints, fields = _schema_of(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise SchemaError(
            f"{where}: unknown fields {sorted(map(str, unknown))[:5]}; "
            f"expected only {sorted(fields)} (newer peer? check the protocol version)"
        )
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        if name not in data:
            has_default = (
                spec.default is not dataclasses.MISSING
                or spec.default_factory is not dataclasses.MISSING
            )
            if has_default and not spec.metadata.get("wire_required"):
                continue
            raise SchemaError(f"{where}: missing required field {name!r}")
        values[name] = _from_json(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**values)
    except SchemaError as error:
        raise SchemaError(f"{where}: {error}") from error
    except (TypeError, ValueError) as error:
        raise SchemaError(f"{where}: {error}") from error


def _from_json(tp: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if value is None:
            return None
        return _from_json(options[0], value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where}: expected true/false, got {value!r:.80}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{where}: expected an integer, got {value!r:.80}")
        if abs(value) > MAX_SAFE_INTEGER:
            raise SchemaError(f"{where}: integer {value} exceeds 2**53")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SchemaError(f"{where}: expected a number, got {value!r:.80}")
        number = float(value)
        if not math.isfinite(number):
            raise SchemaError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is bytes:
        return _bytes_from_base64(value, where)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{where}: expected a string, got {type(value).__name__}")
        if len(value) > MAX_STRING_CHARS:
            raise SchemaError(f"{where}: string of {len(value)} chars > {MAX_STRING_CHARS}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except (ValueError, TypeError) as error:
            allowed = [member.value for member in tp]
            raise SchemaError(f"{where}: expected one of {allowed}, got {value!r:.80}") from error
    if origin is tuple:
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        if len(value) > MAX_SEQUENCE_ITEMS:
            raise SchemaError(f"{where}: list of {len(value)} items > {MAX_SEQUENCE_ITEMS}")
        item_type = typing.get_args(tp)[0]
        return tuple(_from_json(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
        _, value_type = typing.get_args(tp)
        return {
            key: _from_json(value_type, item, f"{where}[{key!r:.40}]")
            for key, item in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return from_json_fields(tp, value, where)
    raise SchemaError(f"{where}: no JSON conversion for {tp!r}")  # pragma: no cover


def _bytes_from_base64(value: object, where: str) -> bytes:
    """Bytes travel in JSON as standard base64 (sizes are checked by the message itself,
    and the frame limits bound the text before it is parsed)."""
    if not isinstance(value, str):
        raise SchemaError(f"{where}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as error:
        raise SchemaError(f"{where}: not valid base64: {error}") from None
