"""What `schoolfl profile plan` prints: the planner's rows as a table and as JSON.

Memory is in GiB (RAM is sold in binary units), transfer sizes in decimal MB (the unit of the
Mbit/s link rates they travel at), times in seconds. The JSON keys are documented in
docs/profile.md and stay stable: add keys, never rename them.
"""

from __future__ import annotations

from typing import Any

from device_profiles.cli_output import TextTable, gib
from device_profiles.gpu_path import MemoryKind, memory_kind, usable_gpu_memory_bytes
from device_profiles.planner import PlanRow, ProfilePlans
from device_profiles.profile import DeviceProfile
from device_profiles.shapes import ModelShape
from device_profiles.transfer import SharedSchoolLink

PLAN_COLUMNS = (
    "scheme",
    "rank",
    "batch",
    "seq",
    "levers",
    "step s",
    "peak",
    "round s",
    "down MB",
    "up MB",
    "link down+up s",
    "school down+up s",
    "verdict",
)


def memory_label(profile: DeviceProfile) -> str:
    """Which memory the plans were checked against (`gpu_path.memory_kind`)."""
    usable = f"{gib(profile.usable_ram_bytes)} usable of {gib(profile.hardware.ram_bytes)} RAM"
    kind = memory_kind(profile)
    if kind is MemoryKind.UNIFIED:
        return f"{usable}, shared with the GPU"
    if kind is MemoryKind.GPU:
        return f"{usable}, {gib(usable_gpu_memory_bytes(profile))} GPU memory"
    return usable


def profile_title(profile: DeviceProfile) -> str:
    status = "" if profile.predictions_validated else ", predictions unvalidated"
    network = profile.network
    return (
        f"{profile.name} ({profile.kind}, {memory_label(profile)}, link "
        f"{network.down_mbps:g}/{network.up_mbps:g} Mbit/s down/up{status})"
    )


def bandwidth_note(school_link: SharedSchoolLink) -> str:
    return (
        "per round each device downloads the global adapter (fp32) and uploads its update "
        "(int8); 'link' is the profile's own link, 'school' its share of a "
        f"{school_link.down_mbps:g}/{school_link.up_mbps:g} Mbit/s school link shared by "
        f"{school_link.devices_sharing} devices (--school-link-mbps, --devices-sharing)"
    )


def _verdict(row: PlanRow) -> str:
    prediction = row.prediction
    verdict = "fits" if prediction.fits else f"does not fit: {prediction.reason}"
    if row.levers and prediction.fits:
        verdict = f"fits with {row.levers}"
    if not prediction.validated:
        verdict += " (unvalidated)"
    return verdict


def plan_table(plans: ProfilePlans, *, fits_only: bool) -> TextTable:
    table = TextTable(profile_title(plans.profile), PLAN_COLUMNS)
    for row in plans.rows:
        prediction, transfer = row.prediction, row.transfer
        if fits_only and not prediction.fits:
            continue
        table.add_row(
            row.plan.scheme,
            str(row.plan.rank),
            str(row.plan.batch_size),
            str(row.plan.seq_len),
            row.levers or "-",
            f"{prediction.step_seconds:.2f}",
            gib(prediction.peak_bytes),
            f"{prediction.round_seconds:.1f}",
            f"{transfer.download_bytes / 1e6:.2f}",
            f"{transfer.upload_bytes / 1e6:.2f}",
            f"{transfer.download_seconds:.1f}+{transfer.upload_seconds:.1f}",
            f"{transfer.shared_download_seconds:.1f}+{transfer.shared_upload_seconds:.1f}",
            _verdict(row),
            style="green" if prediction.fits else "red",
        )
    return table


def unusable_lines(plans: ProfilePlans) -> list[str]:
    """One line per scheme the profile cannot run, instead of a row per grid plan."""
    return [
        f"{item.reason} ({item.plans} grid plan{'s' if item.plans != 1 else ''} left out)"
        for item in plans.unusable
    ]


def _row_json(row: PlanRow) -> dict[str, Any]:
    plan, prediction, transfer = row.priced_plan, row.prediction, row.transfer
    return {
        "scheme": plan.scheme,
        "rank": plan.rank,
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "local_steps": plan.local_steps,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "micro_batch_size": plan.micro_batch_size,
        "levers": row.levers,
        "fits": prediction.fits,
        "reason": prediction.reason,
        "validated": prediction.validated,
        "step_seconds": prediction.step_seconds,
        "compute_seconds": prediction.compute_seconds,
        "round_seconds": prediction.round_seconds,
        "peak_bytes": prediction.peak_bytes,
        "gpu_peak_bytes": prediction.gpu_peak_bytes,
        "download_bytes": transfer.download_bytes,
        "upload_bytes": transfer.upload_bytes,
        "download_seconds": transfer.download_seconds,
        "upload_seconds": transfer.upload_seconds,
        "school_download_seconds": transfer.shared_download_seconds,
        "school_upload_seconds": transfer.shared_upload_seconds,
    }


def plan_json(
    shape: ModelShape,
    local_steps: int,
    target_modules: tuple[str, ...],
    school_link: SharedSchoolLink,
    evaluated: list[ProfilePlans],
    *,
    fits_only: bool,
) -> dict[str, Any]:
    """The document `schoolfl profile plan --json` prints (keys: docs/profile.md)."""
    profiles = []
    for plans in evaluated:
        profile = plans.profile
        profiles.append(
            {
                "name": profile.name,
                "kind": profile.kind,
                "support": profile.support,
                "validated": profile.predictions_validated,
                "memory_kind": memory_kind(profile).value,
                "ram_bytes": profile.hardware.ram_bytes,
                "usable_ram_bytes": profile.usable_ram_bytes,
                "usable_gpu_bytes": usable_gpu_memory_bytes(profile),
                "down_mbps": profile.network.down_mbps,
                "up_mbps": profile.network.up_mbps,
                "rtt_ms": profile.network.rtt_ms,
                "any_fits": plans.any_fits,
                "plans": [
                    _row_json(row) for row in plans.rows if row.prediction.fits or not fits_only
                ],
                "unusable_schemes": [
                    {"scheme": item.scheme, "reason": item.reason, "plans": item.plans}
                    for item in plans.unusable
                ],
            }
        )
    return {
        "model": {
            "name": shape.name,
            "family": shape.family,
            "parameters": shape.total_parameters(),
        },
        "local_steps": local_steps,
        "target_modules": list(target_modules),
        "school_link": {
            "down_mbps": school_link.down_mbps,
            "up_mbps": school_link.up_mbps,
            "devices_sharing": school_link.devices_sharing,
        },
        "profiles": profiles,
    }
