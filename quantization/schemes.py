"""Quantization schemes: names, availability on this machine, and in-place model quantization.

The scheduler sends a scheme name in each device's plan, so the set is closed (`Scheme`) and
`parse_scheme` rejects anything else with the list of valid names. `available_schemes` tells
the agent (and the device-profile benchmark) which ones run here and, if not, why.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Iterable

import torch
from torch import nn

from quantization.bnb_backend import bnb_unavailable_reason, is_bnb_linear, make_bnb_linear
from quantization.errors import SchemeUnavailableError, UnknownSchemeError
from quantization.qlinear import NF4_BLOCK_SIZE, Int8Linear, NF4Linear, QuantizedLinear

logger = logging.getLogger(__name__)


class Scheme(str, enum.Enum):
    """How the frozen base model's Linear weights are stored."""

    NONE = "none"
    NF4 = "nf4"
    INT8 = "int8"
    BNB_NF4 = "bnb-nf4"
    BNB_INT8 = "bnb-int8"


DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head", "classifier", "score", "qa_outputs")
"""Module names (last path component or full dotted path) left in full precision.

Output heads are small, often tied to the input embedding (lm_head) or trained
(classification heads travel with the adapter), so quantizing them saves little and hurts.
"""


def parse_scheme(text: str | Scheme) -> Scheme:
    """The `Scheme` named by `text` (case-insensitive; '_' accepted for '-')."""
    if isinstance(text, Scheme):
        return text
    normalized = str(text).strip().lower().replace("_", "-")
    for scheme in Scheme:
        if scheme.value == normalized:
            return scheme
    valid = ", ".join(repr(s.value) for s in Scheme)
    raise UnknownSchemeError(f"unknown quantization scheme {text!r}; expected one of {valid}")


@functools.cache
def _torchao_unavailable_reason() -> str | None:
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return f"torchao does not import ({type(error).__name__}: {error}); pip install torchao"
    return None


def scheme_unavailable_reason(scheme: Scheme, device_type: str | None = None) -> str | None:
    """None if `scheme` runs on this machine (on `device_type` for bitsandbytes, whose
    kernels differ per device), else the reason. Only a bnb scheme imports bitsandbytes:
    its import and self-check cost seconds and memory every other process should not pay."""
    if scheme is Scheme.NONE:
        return None
    if scheme in (Scheme.NF4, Scheme.INT8):
        return _torchao_unavailable_reason()
    return bnb_unavailable_reason("nf4" if scheme is Scheme.BNB_NF4 else "int8", device_type)


def available_schemes(device_type: str | None = None) -> dict[Scheme, str | None]:
    """Every scheme -> None if usable on this machine, else the reason it is not (imports
    bitsandbytes to check it: for reports and the device benchmark, not the hot path)."""
    return {scheme: scheme_unavailable_reason(scheme, device_type) for scheme in Scheme}


def require_scheme(scheme: str | Scheme, device_type: str | None = None) -> Scheme:
    """Parse `scheme` and raise `SchemeUnavailableError` (with the reason) if it cannot run."""
    parsed = parse_scheme(scheme)
    reason = scheme_unavailable_reason(parsed, device_type)
    if reason is not None:
        raise SchemeUnavailableError(f"scheme {parsed.value!r} is not available here: {reason}")
    return parsed


def _is_skipped(name: str, skip_modules: Iterable[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(name == skip or last == skip for skip in skip_modules)


def can_quantize(weight_shape: tuple[int, ...], scheme: Scheme) -> bool:
    """Whether a Linear weight of this shape can be stored with `scheme`."""
    if scheme in (Scheme.NF4, Scheme.BNB_NF4):
        numel = 1
        for size in weight_shape:
            numel *= size
        return numel % NF4_BLOCK_SIZE == 0
    return True


def quantize_linear_weight(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str | Scheme,
    device: torch.device | None = None,
) -> nn.Module:
    """A frozen Linear module holding `weight` (out, in) stored with `scheme`.

    For `none` it is a plain `nn.Linear` whose parameters do not require grad. `device`
    matters only to bitsandbytes, which quantizes as it moves a layer there; the others
    quantize on the CPU and move with the model.
    """
    scheme = parse_scheme(scheme)
    if scheme is Scheme.NF4:
        return NF4Linear.from_weight(weight, bias)
    if scheme is Scheme.INT8:
        return Int8Linear.from_weight(weight, bias)
    if scheme in (Scheme.BNB_NF4, Scheme.BNB_INT8):
        kind = "nf4" if scheme is Scheme.BNB_NF4 else "int8"
        return make_bnb_linear(weight, bias, kind, device)
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to(torch.float32), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
    return layer


def is_quantized_linear(module: nn.Module) -> bool:
    """True for any linear this package produced with a quantizing scheme."""
    return isinstance(module, QuantizedLinear) or is_bnb_linear(module)


def quantize_model(
    model: nn.Module,
    scheme: str | Scheme,
    *,
    skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES,
    device: torch.device | None = None,
) -> nn.Module:
    """Swap every `nn.Linear` of an in-memory model for a frozen quantized one, in place.

    Used on models built from a config with random weights (tests, device benchmark); real
    checkpoints should go through `load_quantized`, which never holds the full-precision
    model. All base parameters end up frozen (`requires_grad=False`), so only adapters added
    afterwards train. Layers whose shape the scheme cannot store are left in full precision
    with a warning. With `device`, the model ends up there. Returns `model` for chaining.
    """
    scheme = require_scheme(scheme, device.type if device is not None else None)
    skip = tuple(skip_modules)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or _is_skipped(name, skip):
            continue
        if not can_quantize(tuple(module.weight.shape), scheme):
            logger.warning(
                "leaving %s %s unquantized: shape unsupported by %s",
                name,
                tuple(module.weight.shape),
                scheme.value,
            )
            continue
        parent_name, _, child_name = name.rpartition(".")
        swaps.append((model.get_submodule(parent_name), child_name, module))
    for parent, child_name, module in swaps:
        if scheme is not Scheme.NONE:
            with torch.no_grad():
                new = quantize_linear_weight(module.weight, module.bias, scheme, device)
            setattr(parent, child_name, new)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if device is not None:
        model.to(device)
    logger.info("quantized %d linear layers with %s", len(swaps), scheme.value)
    return model
