"""Exception hierarchy of the quantization package.

Callers (the edge agent, the device-profile benchmark) catch `QuantizationError` to report a
device's model problem as data instead of crashing; the subclasses say which input was bad.
"""

from __future__ import annotations


class QuantizationError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownSchemeError(QuantizationError, ValueError):
    """A scheme name that is not one of `Scheme`'s values."""


class SchemeUnavailableError(QuantizationError, RuntimeError):
    """A known scheme that cannot run on this machine (e.g. bitsandbytes missing)."""


class ModelFileError(QuantizationError, OSError):
    """A model file or folder is missing, truncated, or not in a format we can read."""


class ModelMismatchError(QuantizationError, ValueError):
    """The weights on disk do not fit the architecture the config describes."""


class AdapterError(QuantizationError, ValueError):
    """An adapter config, state dict or folder is invalid or does not fit the model."""


class ModelPackageMissingError(QuantizationError, ImportError):
    """A real base model is shipped as a PyPI package that is not installed."""
