"""The ground floor: atomic files, the one SQLite opener, TOML config tables and daemon logging.

Imported by every other package; imports none of them (DESIGN.md, dependency direction).
Standard library only, so the agent on a Raspberry Pi may import it freely.
"""
