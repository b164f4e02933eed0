"""What the round manager keeps in memory between store writes: a view of each open round,
each task's round counts and each task's decoded global adapter.

None of it is the truth (the store is): it is loaded once, at start or when a round opens,
and kept up to date by the manager as it writes, so that no tick and no message reads a
task's round history, a round's every row, or decodes the global adapter again.
"""

from __future__ import annotations

import torch

from coordinator.config import CoordinatorConfig
from coordinator.open_rounds import OpenRound, fold_stored
from coordinator.round_aggregation import streams_task
from coordinator.store import CoordinatorStore, RoundRecord, RoundState
from coordinator.task_models import AdapterBody


class RoundBook:
    """Open-round views, round counts and decoded global states of every task."""

    def __init__(
        self, config: CoordinatorConfig, store: CoordinatorStore, current: dict[str, AdapterBody]
    ) -> None:
        self.config = config
        self.store = store
        self.current = current
        """Task id -> the global adapter devices train from (the manager's own dict)."""
        self.views: dict[tuple[str, int], OpenRound] = {}
        """(task id, round) -> the in-memory view of each open round."""
        self._states: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        """Task id -> (version sha, its decoded state): decoded once per version."""
        self._counts: dict[str, tuple[int, int]] = {}
        """Task id -> (its last round number, its completed rounds)."""

    # -- views -----------------------------------------------------------------------------

    def load_view(self, record: RoundRecord) -> OpenRound:
        """The view of an open round from the store, its running sum rebuilt from the
        stored updates (one body at a time) where the task's aggregation streams."""
        view = OpenRound.load(self.store, record)
        self.views[view.key] = view
        task = self.config.task(record.task_id)
        if view.reported and streams_task(task):
            fold_stored(view, self.store, self.reference(task.id), set(view.reported))
        return view

    def view(self, task_id: str, round_number: int) -> OpenRound | None:
        """The open round's view; None when the round is not open (or unknown). A round
        opened in the store behind the manager's back gets its view now."""
        view = self.views.get((task_id, round_number))
        if view is not None:
            return view
        record = self.store.round(task_id, round_number)
        if record is None or record.state is not RoundState.OPEN:
            return None
        return self.load_view(record)

    def open_tasks(self) -> set[str]:
        return {task_id for task_id, _ in self.views}

    def busy_devices(self) -> set[str]:
        """Devices assigned in an open round: a device trains one task at a time."""
        return {device for view in self.views.values() for device in view.plans_json}

    # -- global adapters -------------------------------------------------------------------

    def reference(self, task_id: str) -> dict[str, torch.Tensor]:
        """The task's current global adapter, decoded once per version (not per update)."""
        body = self.current[task_id]
        cached = self._states.get(task_id)
        if cached is None or cached[0] != body.version:
            cached = self._states[task_id] = (body.version, body.state())
        return cached[1]

    def new_version(self, task_id: str, body: AdapterBody, state: dict[str, torch.Tensor]) -> None:
        """The task's global adapter is now `body`, whose decoded state is `state`."""
        self.current[task_id] = body
        self._states[task_id] = (body.version, state)

    # -- round counts ----------------------------------------------------------------------

    def counts(self, task_id: str) -> tuple[int, int]:
        """(last round number, completed rounds) of the task, read from the store once."""
        counts = self._counts.get(task_id)
        if counts is None:
            rounds = self.store.rounds(task_id)
            completed = sum(1 for r in rounds if r.state is RoundState.COMPLETED)
            last = rounds[-1].round_number if rounds else 0
            counts = self._counts[task_id] = (last, completed)
        return counts

    def note_round(self, task_id: str, round_number: int, completed: bool = False) -> None:
        """A round was opened (or closed, completed or not)."""
        last, done = self.counts(task_id)
        self._counts[task_id] = (max(last, round_number), done + int(completed))

    def round_closed(self, task_id: str, round_number: int, completed: bool) -> OpenRound | None:
        """Count the closed round and drop its view (returned, None if it had none)."""
        self.note_round(task_id, round_number, completed)
        return self.views.pop((task_id, round_number), None)
