"""bitsandbytes NF4 / int8 linears, offered only where bitsandbytes imports and self-checks.

bitsandbytes is an optional extra (`schoolfl[bnb]`): on ARM boards without a build it does not
import, and on some CPUs its kernels import but compute garbage. So every entry point here
first runs `bnb_unavailable_reason()`, which imports the library and checks a small layer
against full precision; the result is cached for the process.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SELF_CHECK_TOLERANCE = {"nf4": 0.2, "int8": 0.05}
"""Max relative output error of the self-check layer (NF4 typically ~0.09, int8 ~0.004)."""


def keep_bitsandbytes_out() -> bool:
    """Stop this process from importing bitsandbytes; True if that is still possible.

    PEFT imports bitsandbytes whenever it is installed (~40 MB RSS and ~1 s, measured with
    bitsandbytes 0.50 and PEFT 0.21), even for a model without one bnb layer. An agent whose
    profile offers no bnb scheme never gets a bnb plan, so it calls this before anything
    imports PEFT. Too late (already imported) is harmless: it returns False."""
    if "bitsandbytes" in sys.modules or "peft" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment] - find_spec() now says absent
    return True


def _import_bnb() -> Any:
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        raise ImportError(
            "bitsandbytes was kept out of this agent process because its profile lists no "
            "bnb scheme (quant_schemes); add one to the profile and restart the agent"
        )
    import bitsandbytes  # noqa: PLC0415 - optional dependency, imported on demand

    return bitsandbytes


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _compute_dtype(device: torch.device) -> torch.dtype:
    """bitsandbytes' own compute dtype (its matmul is not autocast's): the GPU's half
    precision, as the trainer's autocast (quantization/compute_device.py); fp32 on a CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_bnb_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, kind: str, device: torch.device | None = None
) -> nn.Module:
    """A frozen bitsandbytes Linear4bit (kind='nf4') or Linear8bitLt (kind='int8') on
    `device` (default: the GPU when there is one)."""
    bnb = _import_bnb()
    device = device or _device()
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32).contiguous()
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=_compute_dtype(device),
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        # On a CPU with AVX512-BF16, bitsandbytes (0.48+) repacks the weight on the first
        # eval-mode forward without grad: block scales go to bf16, and `state_dict()` undoes
        # that lossily (absmax re-quantized), so a frozen base changed after one evaluation
        # (issue 18). Training and evaluation must see one fixed base: keep bnb's own format.
        layer.support_avx512bf16_for_cpu = False
    elif kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"bitsandbytes kind must be 'nf4' or 'int8', got {kind!r}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
    return layer.to(device)  # quantization happens on this move


@functools.cache
def bnb_unavailable_reason(kind: str, device_type: str | None = None) -> str | None:
    """None when bitsandbytes `kind` works on `device_type` ('cpu', 'cuda'; default: the GPU
    when there is one), else a sentence saying why not. Imports bitsandbytes: call it only
    when a bnb scheme is asked for."""
    device = torch.device(device_type) if device_type else _device()
    try:
        bnb = _import_bnb()
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        return (
            f"bitsandbytes does not import ({type(error).__name__}: {error}); "
            "pip install 'schoolfl[bnb]' on x86 or CUDA"
        )
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 128, generator=generator) * 0.05
        x = torch.randn(4, 128, generator=generator)
        reference = x @ weight.T
        layer = make_bnb_linear(weight, None, kind, device)
        with torch.no_grad():
            got = layer(x.to(device)).float().cpu()
        relative_error = ((got - reference).norm() / reference.norm()).item()
    except Exception as error:  # noqa: BLE001 - a crashing kernel also means "not available"
        return (
            f"bitsandbytes {bnb.__version__} imports but its {kind} self-check raised "
            f"{type(error).__name__}: {error}"
        )
    if not relative_error <= SELF_CHECK_TOLERANCE[kind]:
        return (
            f"bitsandbytes {bnb.__version__} {kind} self-check relative error "
            f"{relative_error:.3g} exceeds {SELF_CHECK_TOLERANCE[kind]}"
        )
    logger.debug("bitsandbytes %s self-check passed (relative error %.3g)", kind, relative_error)
    return None


def is_bnb_linear(module: nn.Module) -> bool:
    """True for bitsandbytes quantized linears (without importing bitsandbytes needlessly)."""
    return type(module).__module__.startswith("bitsandbytes")
