"""Secure rounds on the coordinator: the phase state machine driven by MQTT messages and its
SQLite store (`secure_rounds.db`). The protocol itself is `edge_runtime.secagg`."""
