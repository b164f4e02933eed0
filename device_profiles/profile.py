"""Device profiles: hardware facts, throughput, network and power of one device class.

A profile is a TOML file. Reference profiles (shipped in `device_profiles/reference/`) hold
published figures, each with a `<field>_source` key beside it naming the datasheet or
benchmark; measured profiles are written by `schoolfl profile bench` and carry the grid of
train-step measurements that calibrates the cost model. One field table (`SECTION_FIELDS`)
drives loading, validation and writing, so the three never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from device_profiles.errors import ProfileError, ProfileValidationError
from device_profiles.plan import KNOWN_SCHEMES
from device_profiles.profile_fields import (
    PROFILE_KINDS,
    SCHEMA_VERSION,
    SECTION_FIELDS,
    SUPPORT_LEVELS,
    TOP_LEVEL_KEYS,
    UNVALIDATED_NOTE,
    FieldSpec,
)
from device_profiles.toml_io import dumps_toml, read_toml
from durable.atomic_files import atomic_write_text
from durable.config_tables import tomllib


@dataclass(frozen=True)
class Hardware:
    """What the device is: CPU, memory, accelerator."""

    architecture: str
    cpu_model: str
    cores: int
    ram_bytes: int
    os_reserved_bytes: int
    accelerator: str = "none"
    accelerator_model: str = ""
    clock_ghz: float | None = None
    """Sustained CPU clock the figures assume; None when the CPU name says it all."""
    thermal: str = ""
    """Cooling the figures assume and when the device throttles; empty when not stated."""
    gpu_memory_bytes: int | None = None
    """Dedicated GPU memory (VRAM) of a discrete GPU. None or 0: the GPU allocates from the
    same RAM as the CPU (a Jetson's unified memory), so every byte it holds counts against
    `ram_bytes` (see `cost_model.memory_kind`)."""
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Throughput:
    """How fast it computes and moves memory, and which schemes it can run."""

    cpu_fp32_gflops: float
    gpu_fp32_gflops: float
    memory_bandwidth_gbps: float
    quant_schemes: tuple[str, ...]
    baseline_rss_bytes: int
    threads: int | None = None
    gpu_half_gflops: float | None = None
    """Dense bf16/fp16 GFLOP/s of the GPU's matrix units (tensor cores): the rate of the
    trainer's matrix products under autocast. None: no half-precision speedup (the fp32
    rate is used)."""
    gpu_memory_bandwidth_gbps: float | None = None
    """DRAM bandwidth GPU kernels see (the datasheet peak is the right kind: thousands of
    GPU threads stream at close to it, unlike the one CPU thread `memory_bandwidth_gbps`
    describes). None: `memory_bandwidth_gbps` is used, which is pessimistic."""
    gpu_compute_dtype: str | None = None
    """What the trainer multiplies in on the GPU: 'bfloat16', 'float16' or 'float32'. None:
    the trainer's default, half precision (bf16, or fp16 where the GPU lacks bf16)."""
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Network:
    """Its link to the coordinator."""

    down_mbps: float
    up_mbps: float
    rtt_ms: float
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Power:
    """Battery devices train only when plugged in or above a charge floor (agent eligibility)."""

    source: str
    typical_watts: float | None = None
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """Cost-model coefficients; defaults are the x86 fit of 2026-11-27
    (benchmarks/RESULTS.md, one torch thread, CPU-time medians)."""

    flop_efficiency: float = 0.88
    memory_efficiency: float = 0.58
    per_layer_seconds: float = 0.0005
    fixed_seconds: float = 0.0065
    dequant_int8: float = 2.3
    dequant_nf4: float = 9.0
    activation_factor_encoder: float = 3.34
    activation_factor_decoder: float = 2.01
    dequant_memory_fraction: float = 1.12
    """Share of the heap-served dequantized copies (CPU: layers below the agent's 1 MiB mmap
    threshold) that stays resident; refit 2026-12-03 under the agent's allocator."""
    memory_overhead_bytes: float = 28e6
    gpu_launch_seconds_per_layer: float = 0.001
    """GPU path only, in place of `per_layer_seconds`: the host's cost of dispatching one
    transformer layer's kernels per step (forward and backward, ~100 kernels at ~10 us of
    eager PyTorch dispatch and launch on an x86 host). An assumption until a GPU measurement
    calibrates it; it is why a small model gains little from a GPU."""
    cuda_context_bytes: float = 400e6
    """GPU path only: memory the CUDA context takes once torch first touches the GPU (driver
    state and lazily loaded kernels; ~400 MB with CUDA >= 11.7's lazy module loading, as
    reported in pytorch/pytorch#109888). On unified memory it comes out of RAM."""
    sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    """One measured grid point of `schoolfl profile bench` (a fresh process per point)."""

    model: str
    scheme: str
    rank: int
    batch_size: int
    seq_len: int
    step_seconds: float
    peak_rss_bytes: int
    load_peak_rss_bytes: int = 0
    """Whole-process peak including building and quantizing the model."""
    step_seconds_spread: float = 0.0
    """(max - min) / median of the timed steps: the noise of this point."""
    step_cpu_seconds: float = 0.0
    """Median CPU seconds of the process per step; below step_seconds when other processes
    took the cores (a shared machine), about threads x step_seconds when it had them."""


@dataclass(frozen=True)
class DeviceProfile:
    """A device class (reference) or one benchmarked machine (measured)."""

    name: str
    kind: str
    description: str
    hardware: Hardware
    throughput: Throughput
    network: Network
    power: Power
    calibration: Calibration = field(default_factory=Calibration)
    measurements: tuple[Measurement, ...] = ()
    measured_at: str = ""
    support: str = "supported"
    """One of SUPPORT_LEVELS; 'unsupported' when schoolfl cannot run on the device as shipped."""
    support_note: str = ""
    """What an owner must do to run schoolfl (required when unsupported)."""
    notes: str = ""
    """Free text `schoolfl profile show` prints: which board and OS image it models, what
    the predictions are not yet checked against."""

    @property
    def usable_ram_bytes(self) -> int:
        return self.hardware.ram_bytes - self.hardware.os_reserved_bytes

    @property
    def predictions_validated(self) -> bool:
        """True once a measurement from the device is recorded: until then the cost model's
        predictions for it rest on published figures and an x86 fit only."""
        return bool(self.measurements)

    @property
    def validation_note(self) -> str:
        """'' when validated, else the sentence the CLI and planner print."""
        return "" if self.predictions_validated else UNVALIDATED_NOTE

    def problems(self) -> list[str]:
        """Every rule this profile breaks, each naming field, value and expectation."""
        return _problems(to_dict(self))

    def validate(self) -> DeviceProfile:
        """Raise `ProfileValidationError` listing all problems; return self when valid."""
        found = self.problems()
        if found:
            raise ProfileValidationError(f"profile {self.name!r}", found)
        return self

    def save(self, path: Path) -> None:
        """Validate, then write atomically."""
        atomic_write_text(Path(path), profile_toml_text(self))

    @classmethod
    def load(cls, path: Path) -> DeviceProfile:
        """Read and validate a profile file; errors name the file and every bad field."""
        path = Path(path)
        data = read_toml(path)
        found = _problems(data)
        if found:
            raise ProfileValidationError(str(path), found)
        return from_dict(data)


def profile_toml_text(profile: DeviceProfile) -> str:
    """The profile as TOML text (validated first): what `save` writes and enrollment sends."""
    profile.validate()
    header = (
        f"schoolfl device profile ({profile.kind}). Fields: docs/profile.md.\n"
        "Each <field>_source names the datasheet, benchmark or measurement behind a figure."
    )
    return dumps_toml(to_dict(profile), header=header)


def profile_from_toml_text(text: str, source: str = "profile text") -> DeviceProfile:
    """Parse and validate profile TOML received as text (e.g. from an enrolling device)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"{source} is not valid TOML: {error}") from error
    found = _problems(data)
    if found:
        raise ProfileValidationError(source, found)
    return from_dict(data)


def _check_value(where: str, spec: FieldSpec, value: Any) -> str | None:
    if spec.kind == "str":
        return None if isinstance(value, str) else f"{where} is {value!r}; expected a string"
    if spec.kind == "bool":
        return None if isinstance(value, bool) else f"{where} is {value!r}; expected true/false"
    if spec.kind == "choice":
        if value not in spec.choices:
            return f"{where} is {value!r}; expected one of {', '.join(spec.choices)}"
        return None
    if spec.kind == "schemes":
        if not isinstance(value, (list, tuple)) or not value:
            return f"{where} is {value!r}; expected a non-empty list of scheme names"
        unknown = [item for item in value if item not in KNOWN_SCHEMES]
        if unknown:
            return (
                f"{where} has unknown scheme(s) {', '.join(map(repr, unknown))}; "
                f"expected names from {', '.join(KNOWN_SCHEMES)}"
            )
        return None
    numeric = (int,) if spec.kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        return (
            f"{where} is {value!r}; expected {'an integer' if spec.kind == 'int' else 'a number'}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value!r}; expected a finite number"
    if spec.strictly_positive and value <= 0:
        return f"{where} is {value!r}; expected a number > 0"
    if spec.minimum is not None and value < spec.minimum:
        return f"{where} is {value!r}; expected a number >= {spec.minimum:g}"
    return None


def _header_problems(data: Mapping[str, Any]) -> list[str]:
    """The top-level keys; the kind they name decides which later checks apply."""
    found: list[str] = []
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        found.append(f"schema_version is {version!r}; this schoolfl reads {SCHEMA_VERSION}")
    for key in ("name", "kind"):
        if not isinstance(data.get(key), str) or not data.get(key):
            found.append(f"{key} is missing or empty; expected a string")
    kind = data.get("kind")
    if isinstance(kind, str) and kind and kind not in PROFILE_KINDS:
        found.append(f"kind is {kind!r}; expected one of {', '.join(PROFILE_KINDS)}")
    for key in ("description", "measured_at", "support_note", "notes"):
        if key in data and not isinstance(data[key], str):
            found.append(f"{key} is {data[key]!r}; expected a string")
    support = data.get("support", "supported")
    if support not in SUPPORT_LEVELS:
        found.append(f"support is {support!r}; expected one of {', '.join(SUPPORT_LEVELS)}")
    elif support == "unsupported" and not data.get("support_note"):
        found.append("support_note is missing; an unsupported profile says what an owner must do")
    known = set(TOP_LEVEL_KEYS) | set(SECTION_FIELDS)
    for key in data:
        if key not in known:
            found.append(
                f"{key} is not a known top-level key; expected one of {', '.join(sorted(known))}"
            )
    return found


def _unknown_key_problems(
    section: str, specs: tuple[FieldSpec, ...], table: Mapping[str, Any]
) -> list[str]:
    """A misspelt key would otherwise be silently ignored and its field left at the default."""
    found: list[str] = []
    known = {spec.name for spec in specs}
    for key in table:
        base = key[: -len("_source")] if key.endswith("_source") else key
        if base not in known and key != "sources":
            found.append(
                f"{section}.{key} is not a known field; expected one of {', '.join(sorted(known))}"
            )
    return found


def _field_problems(
    section: str, specs: tuple[FieldSpec, ...], table: Mapping[str, Any], kind: Any
) -> list[str]:
    """Each field's value, and (in a reference profile) the citation its number rests on."""
    found: list[str] = []
    for spec in specs:
        where = f"{section}.{spec.name}"
        if table.get(spec.name) is None:
            if spec.required:
                found.append(f"{where} is missing; expected {spec.help}")
            continue
        problem = _check_value(where, spec, table[spec.name])
        if problem:
            found.append(problem)
        source = table.get(f"{spec.name}_source")
        if kind == "reference" and spec.cited and not (isinstance(source, str) and source):
            found.append(
                f"{where}_source is missing; a reference profile cites a datasheet "
                f"or published benchmark for {where}"
            )
    return found


def _section_problems(data: Mapping[str, Any], kind: Any) -> list[str]:
    """Every section table is required except `calibration`, whose absence means the defaults."""
    found: list[str] = []
    for section, specs in SECTION_FIELDS.items():
        table = data.get(section)
        if table is None and section == "calibration":
            continue
        if not isinstance(table, Mapping):
            found.append(
                f"[{section}] table is missing; expected fields "
                f"{', '.join(s.name for s in specs if s.required)}"
            )
            continue
        found += _unknown_key_problems(section, specs, table)
        found += _field_problems(section, specs, table, kind)
    return found


def _measurement_problems(data: Mapping[str, Any], kind: Any) -> list[str]:
    """A measured profile without its grid could never have its calibration refitted."""
    found: list[str] = []
    if kind == "measured" and not data.get("measurements"):
        found.append(
            "measurements is empty; a measured profile carries its grid "
            "([[measurements]] tables written by `schoolfl profile bench`)"
        )
    for index, row in enumerate(data.get("measurements") or []):
        for key in (
            "model",
            "scheme",
            "rank",
            "batch_size",
            "seq_len",
            "step_seconds",
            "peak_rss_bytes",
        ):
            if key not in row:
                found.append(f"measurements[{index}].{key} is missing")
        if row.get("scheme") not in KNOWN_SCHEMES:
            found.append(
                f"measurements[{index}].scheme is {row.get('scheme')!r}; expected one "
                f"of {', '.join(KNOWN_SCHEMES)}"
            )
        for key in ("step_seconds", "peak_rss_bytes"):
            value = row.get(key)
            if isinstance(value, (int, float)) and value <= 0:
                found.append(f"measurements[{index}].{key} is {value!r}; expected a number > 0")
    return found


def _accelerator_problems(data: Mapping[str, Any]) -> list[str]:
    """A CUDA profile without a GPU rate would silently be priced for the CPU."""
    hardware, throughput = data.get("hardware"), data.get("throughput")
    if not (isinstance(hardware, Mapping) and isinstance(throughput, Mapping)):
        return []
    rate = throughput.get("gpu_fp32_gflops")
    if hardware.get("accelerator") == "cuda" and isinstance(rate, (int, float)) and rate <= 0:
        return [
            f"throughput.gpu_fp32_gflops is {rate!r} but hardware.accelerator is 'cuda'; "
            "give the GPU's fp32 GFLOP/s, or set accelerator = 'none' to price the CPU"
        ]
    return []


def _problems(data: Mapping[str, Any]) -> list[str]:
    """Every problem at once, not just the first, so one `validate` run lists all to fix."""
    kind = data.get("kind")
    return (
        _header_problems(data)
        + _section_problems(data, kind)
        + _accelerator_problems(data)
        + _measurement_problems(data, kind)
    )


def _section_to_dict(section: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sources = getattr(section, "sources", {})
    for item in fields(section):
        if item.name == "sources":
            continue
        value = getattr(section, item.name)
        out[item.name] = list(value) if isinstance(value, tuple) else value
        if item.name in sources:
            out[f"{item.name}_source"] = sources[item.name]
    return out


def _section_from_dict(cls: type, table: Mapping[str, Any]) -> Any:
    names = {item.name for item in fields(cls)} - {"sources"}
    values = {k: v for k, v in table.items() if k in names}
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    sources = {k[: -len("_source")]: v for k, v in table.items() if k.endswith("_source")}
    return cls(**values, sources=sources)


def to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The TOML document of a profile (sections, then measurement rows)."""
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": profile.name,
        "kind": profile.kind,
        "description": profile.description,
    }
    if profile.measured_at:
        data["measured_at"] = profile.measured_at
    if profile.support != "supported" or profile.support_note:
        data["support"] = profile.support
        data["support_note"] = profile.support_note
    if profile.notes:
        data["notes"] = profile.notes
    for section in ("hardware", "throughput", "network", "power", "calibration"):
        data[section] = _section_to_dict(getattr(profile, section))
    data["measurements"] = [
        {item.name: getattr(row, item.name) for item in fields(Measurement)}
        for row in profile.measurements
    ]
    return data


def from_dict(data: Mapping[str, Any]) -> DeviceProfile:
    """Build a profile from a parsed TOML document (call `_problems` first for messages)."""
    return DeviceProfile(
        name=data["name"],
        kind=data["kind"],
        description=data.get("description", ""),
        measured_at=data.get("measured_at", ""),
        support=data.get("support", "supported"),
        support_note=data.get("support_note", ""),
        notes=data.get("notes", ""),
        hardware=_section_from_dict(Hardware, data["hardware"]),
        throughput=_section_from_dict(Throughput, data["throughput"]),
        network=_section_from_dict(Network, data["network"]),
        power=_section_from_dict(Power, data["power"]),
        calibration=_section_from_dict(Calibration, data.get("calibration", {})),
        measurements=tuple(Measurement(**row) for row in data.get("measurements", [])),
    )


def reference_profile_paths() -> list[Path]:
    """The TOML files shipped in `device_profiles/reference/`, sorted by name."""
    folder = resources.files("device_profiles") / "reference"
    return sorted(Path(str(item)) for item in folder.iterdir() if item.name.endswith(".toml"))


def load_reference_profiles() -> list[DeviceProfile]:
    return [DeviceProfile.load(path) for path in reference_profile_paths()]


def find_profile(name_or_path: str) -> DeviceProfile:
    """A file path, or the name of a shipped reference profile."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return DeviceProfile.load(path)
    for candidate in reference_profile_paths():
        if candidate.stem == name_or_path:
            return DeviceProfile.load(candidate)
    names = ", ".join(p.stem for p in reference_profile_paths())
    raise ProfileError(
        f"no profile file or reference profile named {name_or_path!r}; reference profiles: {names}"
    )
