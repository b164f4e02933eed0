"""What the operator's list commands show, as plain JSON-able values.

`schoolfl coordinator devices|rounds|status|privacy-report` print these as text, or as
they are with `--json`: one builder per command, so the text and the JSON never disagree
and the keys (documented in docs/coordinator.md) stay stable. Pure reads of the store and
the config; the clock is a parameter.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from coordinator.config import CoordinatorConfig, TaskConfig
from coordinator.device_status import NO_REASON_RECORDED, HeartbeatFacts, online_now
from coordinator.privacy import stop_holds
from coordinator.store import CoordinatorStore, DeviceRecord, RoundRecord, RoundState

JsonObject = dict[str, Any]


def _heartbeat_view(facts: HeartbeatFacts | None, now: float, timeout: float) -> JsonObject:
    if facts is None:
        return {
            "online": False,
            "eligible": None,
            "ineligible_reasons": [],
            "last_heartbeat_at": None,
            "last_heartbeat_age_seconds": None,
            "cpu_load": None,
            "free_memory_bytes": None,
            "power_source": None,
            "battery_percent": None,
        }
    return {
        "online": online_now(facts, now, timeout),
        "eligible": facts.eligible,
        "ineligible_reasons": list(facts.ineligible_reasons),
        "last_heartbeat_at": facts.received_at,
        "last_heartbeat_age_seconds": max(0.0, now - facts.received_at),
        "cpu_load": facts.cpu_load,
        "free_memory_bytes": facts.free_memory_bytes,
        "power_source": facts.power_source,
        "battery_percent": facts.battery_percent,
    }


def _round_choice(
    store: CoordinatorStore, record: RoundRecord, device: DeviceRecord
) -> tuple[bool, str | None]:
    """(chosen, why not or how it went) for one device in one round."""
    assigned = store.assignments(record.task_id, record.round_number)
    if device.device_id in assigned:
        declined = store.declined_devices(record.task_id, record.round_number)
        reason = declined.get(device.device_id)
        return True, None if reason is None else f"declined: {reason}"
    left_out = store.device_status.left_out(record.task_id, record.round_number)
    if device.device_id in left_out:
        return False, left_out[device.device_id]
    if device.enrolled_at > record.opened_at:
        return False, "enrolled after the round opened"
    return False, NO_REASON_RECORDED


def latest_rounds(config: CoordinatorConfig, store: CoordinatorStore) -> list[RoundRecord]:
    """Each configured task's latest round (tasks without one are left out)."""
    latest = []
    for task in config.tasks:
        rounds = store.rounds(task.id)
        if rounds:
            latest.append(rounds[-1])
    return latest


def devices_view(config: CoordinatorConfig, store: CoordinatorStore, now: float) -> JsonObject:
    from device_profiles.architecture import architectures_disagree
    from device_profiles.profile import profile_from_toml_text

    timeout = config.coordinator.device_timeout_seconds
    heartbeats = store.device_status.heartbeats()
    rounds = latest_rounds(config, store)
    devices = []
    for device in store.devices():
        profile = profile_from_toml_text(device.profile_toml)
        architecture = profile.hardware.architecture
        entry: JsonObject = {
            "device_id": device.device_id,
            "school": device.school,
            "profile": profile.name,
            "machine": device.machine or None,
            "profile_architecture": architecture,
            "architecture_mismatch": architectures_disagree(architecture, device.machine),
            "state": "revoked" if device.revoked else "active",
            "enrolled_at": device.enrolled_at,
            "revoked_at": device.revoked_at,
        }
        entry.update(_heartbeat_view(heartbeats.get(device.device_id), now, timeout))
        entry["rounds"] = []
        for record in rounds:
            chosen, reason = _round_choice(store, record, device)
            entry["rounds"].append(
                {
                    "task_id": record.task_id,
                    "round_number": record.round_number,
                    "round_state": record.state.value,
                    "chosen": chosen,
                    "reason": reason,
                }
            )
        devices.append(entry)
    return {"devices": devices}


def device_counts(devices: list[JsonObject]) -> JsonObject:
    """Online, eligible and ineligible devices (with how often each reason is given)."""
    active = [d for d in devices if d["state"] == "active"]
    online = [d for d in active if d["online"]]
    ineligible = [d for d in online if d["eligible"] is False]
    reasons: Counter[str] = Counter(r for d in ineligible for r in d["ineligible_reasons"])
    return {
        "enrolled": len(devices),
        "revoked": len(devices) - len(active),
        "online": len(online),
        "offline": len(active) - len(online),
        "eligible": sum(1 for d in online if d["eligible"]),
        "ineligible": len(ineligible),
        "ineligible_reasons": dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
    }


def round_view(store: CoordinatorStore, record: RoundRecord) -> JsonObject:
    """One round: state, times, updates received (and aggregated), metrics, who was
    assigned, who declined and why the others were left out."""
    metrics = dict(record.metrics)
    aggregated = metrics.pop("updates", None)  # the round's own count, shown once
    assigned = store.assignments(record.task_id, record.round_number)
    return {
        "task_id": record.task_id,
        "round_number": record.round_number,
        "state": record.state.value,
        "base_version": record.base_version,
        "opened_at": record.opened_at,
        "deadline": record.deadline,
        "closed_at": record.closed_at,
        "reason": record.reason,
        "updates": len(store.reported_devices(record.task_id, record.round_number)),
        "aggregated": None if aggregated is None else int(aggregated),
        "metrics": metrics,
        "assigned": sorted(assigned),
        "declined": store.declined_devices(record.task_id, record.round_number),
        "left_out": store.device_status.left_out(record.task_id, record.round_number),
    }


def _stop_reason(task: TaskConfig, store: CoordinatorStore) -> str | None:
    stop = store.privacy_stop(task.id)
    return stop.reason if stop is not None and stop_holds(task, stop) else None


def rounds_view(
    config: CoordinatorConfig, store: CoordinatorStore, task_id: str | None
) -> JsonObject:
    stopped = [
        {"task_id": task.id, "reason": reason}
        for task in config.tasks
        if (task_id is None or task.id == task_id) and (reason := _stop_reason(task, store))
    ]
    return {
        "rounds": [round_view(store, record) for record in store.rounds(task_id)],
        "stopped": stopped,
    }


def _privacy_spent(task: TaskConfig, store: CoordinatorStore) -> JsonObject | None:
    if task.privacy.mode == "off":
        return None
    ledger = store.privacy_rounds(task.id)
    return {
        "mode": task.privacy.mode,
        "epsilon": ledger[-1].epsilon if ledger else 0.0,
        "epsilon_budget": task.privacy.epsilon_budget,
        "delta": task.privacy.delta,
    }


def status_view(config: CoordinatorConfig, store: CoordinatorStore, now: float) -> JsonObject:
    devices = devices_view(config, store, now)["devices"]
    tasks = []
    for task in config.tasks:
        rounds = store.rounds(task.id)
        latest = store.latest_adapter_version(task.id)
        shown = [r for r in rounds if r.state is RoundState.OPEN] or rounds[-1:]
        tasks.append(
            {
                "task_id": task.id,
                "rounds_completed": sum(1 for r in rounds if r.state is RoundState.COMPLETED),
                "rounds_configured": task.rounds,
                "adapter": None
                if latest is None
                else {"version": latest.version, "sha256": latest.sha256},
                "open_rounds": [r.round_number for r in rounds if r.state is RoundState.OPEN],
                "privacy": _privacy_spent(task, store),
                "stopped": _stop_reason(task, store),
                "rounds": [
                    {
                        "round_number": r.round_number,
                        "state": r.state.value,
                        "left_out": store.device_status.left_out(task.id, r.round_number),
                    }
                    for r in shown
                ],
            }
        )
    return {
        "fleet": config.coordinator.fleet,
        "broker": config.broker.url,
        "devices": device_counts(devices),
        "tasks": tasks,
        "refused_messages": store.rejection_counts(),
        "latest_refusals": [
            {
                "device_id": refused.device_id,
                "category": refused.category,
                "count": refused.count,
                "first_at": refused.first_at,
                "last_at": refused.last_at,
                "last_reason": refused.last_reason,
            }
            for refused in store.refusals(5)
        ],
    }


def privacy_report_view(task: TaskConfig, store: CoordinatorStore) -> JsonObject:
    return {
        "task_id": task.id,
        "mode": task.privacy.mode,
        "epsilon_budget": task.privacy.epsilon_budget,
        "delta": task.privacy.delta,
        "rounds": [
            {
                "round_number": entry.round_number,
                "participants": entry.participants,
                "eligible_devices": entry.eligible_devices,
                "sampling_probability": entry.sampling_probability,
                "clip_norm": entry.clip_norm,
                "noise_multiplier": entry.noise_multiplier,
                "epsilon": entry.epsilon,
                "delta": entry.delta,
                "secure_aggregation": entry.secure_aggregation,
            }
            for entry in store.privacy_rounds(task.id)
        ],
        "stopped": _stop_reason(task, store),
    }
