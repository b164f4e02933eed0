"""The one field table of device profiles (`SECTION_FIELDS`): each field's type, bounds and
help, and whether a reference profile must cite a source for it. Loading, validation,
writing and `schoolfl profile show` all read it, so they never disagree; it lives apart
from the profile dataclasses so each file stays readable in one sitting.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1
PROFILE_KINDS = ("reference", "measured")
POWER_SOURCES = ("mains", "battery", "battery+mains", "poe")
ACCELERATORS = ("none", "cuda")
GPU_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
"""What the trainer's matrix products run in on a GPU (quantization/compute_device.py picks
bf16 where the GPU has it, else fp16; float32 means no autocast)."""
SUPPORT_LEVELS = ("supported", "unsupported")
"""`unsupported`: schoolfl cannot run on the device as it ships (e.g. its OS's Python is too
old). The profile stays for planning what an upgrade would give; `schoolfl profile show` and
`plan` print its `support_note`. The scheduler still prices it: a device that enrolls runs a
working agent, so it is no longer as shipped."""
TOP_LEVEL_KEYS = (
    "schema_version",
    "name",
    "kind",
    "description",
    "measured_at",
    "support",
    "support_note",
    "notes",
    "measurements",
)
UNVALIDATED_NOTE = (
    "step-time and memory predictions are not validated on this device: no measurement from "
    "it is recorded in `measurements` (run `schoolfl profile bench` on one)"
)


@dataclass(frozen=True)
class FieldSpec:
    """One profile field: its type, bounds and whether a reference profile must cite it."""

    name: str
    kind: str
    """"str", "int", "float", "bool", "schemes" (list of scheme names) or "choice"."""
    help: str
    required: bool = True
    minimum: float | None = None
    strictly_positive: bool = False
    choices: tuple[str, ...] = ()
    cited: bool = False
    """A reference profile must give `<name>_source` for this field."""


SECTION_FIELDS: dict[str, tuple[FieldSpec, ...]] = {
    "hardware": (
        FieldSpec("architecture", "str", "CPU architecture, e.g. aarch64 or x86_64", cited=True),
        FieldSpec("cpu_model", "str", "CPU / SoC name", cited=True),
        FieldSpec(
            "cores", "int", "CPU cores used for training", strictly_positive=True, cited=True
        ),
        FieldSpec("ram_bytes", "int", "installed RAM in bytes", strictly_positive=True, cited=True),
        FieldSpec(
            "os_reserved_bytes",
            "int",
            "RAM the OS and desktop keep (not available to training)",
            minimum=0,
            cited=True,
        ),
        FieldSpec(
            "accelerator",
            "choice",
            "where the trainer computes: 'cuda' prices the GPU path (the agent's device = "
            "'auto' trains on a CUDA GPU when torch finds one; needs gpu_fp32_gflops > 0), "
            "'none' the CPU",
            choices=ACCELERATORS,
        ),
        FieldSpec("accelerator_model", "str", "GPU name, empty when none", required=False),
        FieldSpec(
            "clock_ghz",
            "float",
            "sustained CPU clock the figures assume (boards of one name ship at several)",
            required=False,
            strictly_positive=True,
            cited=True,
        ),
        FieldSpec(
            "thermal",
            "str",
            "cooling the figures assume and when the device throttles",
            required=False,
        ),
        FieldSpec(
            "gpu_memory_bytes",
            "int",
            "dedicated GPU memory (VRAM) in bytes; absent or 0 when the GPU shares RAM with "
            "the CPU (a Jetson's unified memory: everything the GPU holds counts against RAM)",
            required=False,
            minimum=0,
            cited=True,
        ),
    ),
    "throughput": (
        FieldSpec(
            "cpu_fp32_gflops",
            "float",
            "fp32 GFLOP/s of the CPU (all cores)",
            strictly_positive=True,
            cited=True,
        ),
        FieldSpec(
            "gpu_fp32_gflops",
            "float",
            "fp32 GFLOP/s of the GPU, 0 when none",
            minimum=0,
            cited=True,
        ),
        FieldSpec(
            "memory_bandwidth_gbps",
            "float",
            "copy bandwidth in GB/s (bytes read + written per second, 1e9) of a torch tensor "
            "copy at the training thread count, as `schoolfl profile bench` measures and the "
            "cost model was fitted to; not the DRAM peak of a datasheet",
            strictly_positive=True,
            cited=True,
        ),
        FieldSpec("quant_schemes", "schemes", "quantization schemes usable on this device"),
        FieldSpec(
            "baseline_rss_bytes",
            "int",
            "RSS of a process that imported torch, transformers, peft",
            strictly_positive=True,
            cited=True,
        ),
        FieldSpec(
            "threads",
            "int",
            "torch threads used when measuring",
            required=False,
            strictly_positive=True,
        ),
        FieldSpec(
            "gpu_half_gflops",
            "float",
            "dense bf16/fp16 GFLOP/s of the GPU's matrix units (tensor cores), the rate of "
            "matrix products under autocast; absent or 0: no half-precision speedup",
            required=False,
            minimum=0,
            cited=True,
        ),
        FieldSpec(
            "gpu_memory_bandwidth_gbps",
            "float",
            "DRAM bandwidth in GB/s that GPU kernels reach: the datasheet peak is the right "
            "kind here (unlike memory_bandwidth_gbps, a CPU thread's copy figure); absent: "
            "memory_bandwidth_gbps is used",
            required=False,
            strictly_positive=True,
            cited=True,
        ),
        FieldSpec(
            "gpu_compute_dtype",
            "choice",
            "what the trainer multiplies in on the GPU; absent: half precision (bfloat16, or "
            "float16 where the GPU lacks bf16), as the trainer does under autocast",
            required=False,
            choices=GPU_COMPUTE_DTYPES,
        ),
    ),
    "network": (
        FieldSpec(
            "down_mbps",
            "float",
            "typical download Mbit/s to the coordinator",
            strictly_positive=True,
            cited=True,
        ),
        FieldSpec(
            "up_mbps",
            "float",
            "typical upload Mbit/s to the coordinator",
            strictly_positive=True,
            cited=True,
        ),
        FieldSpec("rtt_ms", "float", "round-trip time to the broker in ms", minimum=0, cited=True),
    ),
    "power": (
        FieldSpec("source", "choice", "where power comes from", choices=POWER_SOURCES, cited=True),
        FieldSpec(
            "typical_watts",
            "float",
            "draw under training load",
            minimum=0,
            required=False,
            cited=True,
        ),
    ),
    "calibration": (
        FieldSpec(
            "flop_efficiency",
            "float",
            "achieved training FLOP/s as a fraction of fp32 GFLOPS",
            strictly_positive=True,
        ),
        FieldSpec(
            "memory_efficiency",
            "float",
            "achieved elementwise bandwidth as a fraction of memory bandwidth",
            strictly_positive=True,
        ),
        FieldSpec(
            "per_layer_seconds", "float", "fixed framework cost per layer per step", minimum=0
        ),
        FieldSpec("fixed_seconds", "float", "fixed cost per step (optimizer, Python)", minimum=0),
        FieldSpec(
            "dequant_int8",
            "float",
            "int8 dequantize cost, in fp32 weight bytes moved per weight per pass",
            minimum=0,
        ),
        FieldSpec("dequant_nf4", "float", "same for NF4", minimum=0),
        FieldSpec(
            "activation_factor_encoder",
            "float",
            "measured / counted bytes of activations and backward workspace, encoders",
            strictly_positive=True,
        ),
        FieldSpec(
            "activation_factor_decoder",
            "float",
            "the same for decoders",
            strictly_positive=True,
        ),
        FieldSpec(
            "dequant_memory_fraction",
            "float",
            "resident dequantize workspace as a fraction of the fp32 block weights",
            minimum=0,
        ),
        FieldSpec(
            "memory_overhead_bytes",
            "float",
            "allocator and framework bytes beyond the counted terms",
            minimum=0,
        ),
        FieldSpec(
            "gpu_launch_seconds_per_layer",
            "float",
            "GPU path, in place of per_layer_seconds: host time to dispatch one layer's "
            "kernels (forward and backward) per step; absent: the default (an assumption)",
            required=False,
            minimum=0,
        ),
        FieldSpec(
            "cuda_context_bytes",
            "float",
            "GPU path: memory of the CUDA context (driver state, loaded kernels); from RAM on "
            "unified memory, from GPU memory on a discrete GPU; absent: the default",
            required=False,
            minimum=0,
        ),
    ),
}
