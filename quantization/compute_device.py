"""Where the trainer computes: the CPU, or a CUDA GPU (a laptop's card or a Jetson's).

The agent picks once at start, from its `[agent] device` key and what torch finds
(`resolve_compute_device`). On a GPU the frozen quantized base, the adapters, the batches
and the optimizer state all live on the GPU, and matrix products run in bf16 (fp16 where the
GPU has no bf16) under autocast, while the adapter weights the optimizer updates stay fp32:
half-precision master weights would round small LoRA updates away. Whatever the device, an
update leaves the trainer as fp32 CPU tensors (`quantization.adapters.get_adapter_state`),
so the coordinator cannot tell a GPU update from a CPU one.

Memory: a discrete GPU has its own memory (`torch.cuda.mem_get_info`); a Jetson's GPU is
integrated and allocates from the same RAM as the CPU, so its free memory is the system's
available memory and the CUDA context counts against RAM (`free_memory_bytes`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEVICE_SETTINGS = ("auto", "cpu", "cuda")
"""Values of the agent's `[agent] device` key."""

THERMAL_ZONES = Path("/sys/class/thermal")
"""Linux thermal zones; a Jetson names its GPU's zone 'GPU-therm' (JetPack 4/5) or
'gpu-thermal' (JetPack 6)."""


class ComputeDeviceError(RuntimeError):
    """The configured device cannot be used here; the message says why and what to do."""


@dataclass(frozen=True)
class ComputeDevice:
    """One place to train, and the precision its matrix products run in."""

    torch_device: torch.device
    compute_dtype: torch.dtype = torch.float32
    """float32: no autocast. bfloat16/float16: autocast for matmuls, fp32 master weights."""
    name: str = "cpu"
    """What the log and `agent status` show: 'cpu' or the GPU's name."""
    unified_memory: bool = False
    """True when the GPU allocates from system RAM (Jetson)."""
    total_memory_bytes: int = 0
    """A discrete GPU's own memory; 0 on the CPU and with unified memory."""

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def half_precision(self) -> bool:
        return self.compute_dtype in (torch.float16, torch.bfloat16)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The context a forward pass runs in: autocast to the compute dtype, or nothing."""
        if not self.half_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=self.compute_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (whose small range underflows gradients); None otherwise:
        bf16 has fp32's exponent range and fp32 needs none."""
        if self.compute_dtype is not torch.float16:
            return None
        return torch.amp.GradScaler(self.torch_device.type)

    def move_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.torch_device.type == "cpu":
            return batch
        return {key: value.to(self.torch_device, non_blocking=True) for key, value in batch.items()}

    @property
    def dtype_name(self) -> str:
        """'float32', 'bfloat16' or 'float16', as profiles spell `gpu_compute_dtype`."""
        return str(self.compute_dtype).removeprefix("torch.")

    def describe(self) -> str:
        if not self.is_cuda:
            return "cpu" if not self.half_precision else f"cpu ({self.dtype_name})"
        memory = "unified memory" if self.unified_memory else "dedicated memory"
        return f"{self.torch_device} {self.name} ({self.dtype_name}, {memory})"


CPU = ComputeDevice(torch.device("cpu"))


def cuda_unavailable_reason() -> str | None:
    """None when torch can use a CUDA GPU here, else why not (in words school IT can act on)."""
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
            "(on a Jetson: NVIDIA's wheel for its JetPack)"
        )
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"
    return None


def cuda_compute_device(index: int = 0) -> ComputeDevice:
    """The CUDA GPU `index` with the best half precision it has: bf16 (Ampere and later,
    e.g. Jetson Orin) or fp16."""
    properties = torch.cuda.get_device_properties(index)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    unified = bool(getattr(properties, "is_integrated", False))
    return ComputeDevice(
        torch_device=torch.device("cuda", index),
        compute_dtype=dtype,
        name=str(properties.name),
        unified_memory=unified,
        total_memory_bytes=0 if unified else int(properties.total_memory),
    )


def resolve_compute_device(
    setting: str = "auto",
    *,
    unavailable_reason: Callable[[], str | None] = cuda_unavailable_reason,
    cuda_device: Callable[[], ComputeDevice] = cuda_compute_device,
) -> ComputeDevice:
    """The device an `[agent] device` setting means on this machine.

    'auto' takes the GPU when torch can use one and the CPU otherwise; 'cuda' without a
    usable GPU is an error (a silent fall-back would train 5-10x slower than planned).
    The two callables exist so tests can stand in for a GPU that this machine lacks."""
    if setting not in DEVICE_SETTINGS:
        raise ComputeDeviceError(
            f"[agent] device must be one of {', '.join(DEVICE_SETTINGS)}, got {setting!r}"
        )
    if setting == "cpu":
        return CPU
    reason = unavailable_reason()
    if reason is None:
        return cuda_device()
    if setting == "cuda":
        raise ComputeDeviceError(
            f'[agent] device = "cuda" but {reason}; set device = "auto" to train on the CPU'
        )
    logger.debug("training on the CPU: %s", reason)
    return CPU


def free_memory_bytes(device: ComputeDevice) -> int:
    """Memory a training step can still take on `device`: system RAM available for the CPU
    and for a GPU that shares it (Jetson), the GPU's own free memory otherwise."""
    if not device.is_cuda or device.unified_memory:
        import psutil  # noqa: PLC0415 - only the agent needs it, not every importer

        return int(psutil.virtual_memory().available)
    free, _total = torch.cuda.mem_get_info(device.torch_device)
    return int(free)


@dataclass(frozen=True)
class GpuTemperature:
    celsius: float | None
    source: str
    """Where the reading came from, or why there is none."""


def gpu_temperature(zones_root: Path = THERMAL_ZONES) -> GpuTemperature:
    """The GPU's temperature from a Linux thermal zone whose type names the GPU (Jetson),
    else from NVML through torch (needs the pynvml package), else why it cannot be read."""
    for zone in sorted(zones_root.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip()
            if "gpu" not in kind.lower():
                continue
            millidegrees = int((zone / "temp").read_text().strip())
        except (OSError, ValueError) as error:
            logger.debug("thermal zone %s unreadable: %s", zone, error)
            continue
        return GpuTemperature(millidegrees / 1000.0, f"{zone / 'temp'} ({kind})")
    try:
        celsius = float(torch.cuda.temperature())
    except Exception as error:  # noqa: BLE001 - no NVML, no GPU, or a driver without it
        return GpuTemperature(
            None, f"no GPU thermal zone under {zones_root} and NVML unreadable ({error})"
        )
    return GpuTemperature(celsius, "NVML (torch.cuda.temperature)")


@contextlib.contextmanager
def peak_gpu_memory(device: ComputeDevice) -> Iterator[list[int]]:
    """Yields a one-item list that holds the peak `torch.cuda.max_memory_allocated` of the
    block once it ends (0 on the CPU), for benchmarks and the trainer's log."""
    result = [0]
    if device.is_cuda:
        torch.cuda.reset_peak_memory_stats(device.torch_device)
    try:
        yield result
    finally:
        if device.is_cuda:
            result[0] = int(torch.cuda.max_memory_allocated(device.torch_device))
