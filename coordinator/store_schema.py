"""The tables of `coordinator.db` (see `coordinator.store`, the only module that reads them).

`SCHEMA_VERSION` is stored in `meta`; a store of another version is refused at open with a
message that says what to do, never migrated silently. The DDL is idempotent
(`CREATE ... IF NOT EXISTS`), so opening an existing store applies nothing but the
tables added since (additions only; `refusals` replaced the one-row-per-refusal
`rejections` table, whose rows a store folds into it once, at open). `device_heartbeats`
and `round_left_out` (`coordinator.device_status`) came later the same way: a store written
before them gets them, empty, at its next open, and keeps schema version 1.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    school TEXT NOT NULL,
    public_key BLOB NOT NULL,
    profile_toml TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked_at REAL,
    machine TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    school TEXT NOT NULL,
    expires_at REAL NOT NULL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    state TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    reason TEXT,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (task_id, round_number)
);
CREATE TABLE IF NOT EXISTS refusals (
    device_id TEXT NOT NULL,
    category TEXT NOT NULL,
    count INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    last_reason TEXT NOT NULL,
    PRIMARY KEY (device_id, category)
);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    declined_reason TEXT,
    PRIMARY KEY (task_id, round_number, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    update_id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    num_steps INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    body BLOB NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (task_id, round_number, device_id)
);
CREATE TABLE IF NOT EXISTS adapter_versions (
    task_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    round_number INTEGER,
    sha256 TEXT NOT NULL,
    folder TEXT NOT NULL,
    created_at REAL NOT NULL,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (task_id, version)
);
CREATE TABLE IF NOT EXISTS privacy_rounds (
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    eligible_devices INTEGER NOT NULL,
    participants INTEGER NOT NULL,
    sampling_probability REAL NOT NULL,
    clip_norm REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    secure_aggregation INTEGER NOT NULL,
    PRIMARY KEY (task_id, round_number)
);
CREATE TABLE IF NOT EXISTS privacy_stops (
    task_id TEXT PRIMARY KEY,
    round_number INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    budget REAL NOT NULL,
    delta REAL NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS device_heartbeats (
    device_id TEXT PRIMARY KEY,
    online INTEGER NOT NULL,
    eligible INTEGER NOT NULL,
    ineligible_reasons_json TEXT NOT NULL DEFAULT '[]',
    cpu_load REAL NOT NULL,
    free_memory_bytes INTEGER NOT NULL,
    power_source TEXT NOT NULL,
    battery_percent REAL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS round_left_out (
    task_id TEXT NOT NULL,
    round_number INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (task_id, round_number, device_id)
);
"""

ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("devices", "machine", "TEXT NOT NULL DEFAULT ''"),
)
"""Columns added after a store's schema version was first written: (table, column, type).
A store opened by an older coordinator lacks them and gets them by ALTER TABLE at open;
additive only, so SCHEMA_VERSION stays and an older coordinator still reads the store."""
