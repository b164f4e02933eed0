"""The exceptions of `device_profiles`: callers catch `ProfileError` and show its message."""

from __future__ import annotations


class ProfileError(ValueError):
    """A profile, model shape or training plan is unusable; the message says why and how."""


class ProfileValidationError(ProfileError):
    """A profile file breaks one or more rules; `problems` lists each one on its own."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{listing}")


class BenchError(RuntimeError):
    """A benchmark measurement could not be taken (worker died, broker unreachable...)."""
