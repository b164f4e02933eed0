"""The round lifecycle: open, collect updates, aggregate or fail, publish the new version.

Every transition is persisted in the store before anything is published, so a coordinator
killed at any instant restarts with the open round, its assignments and every update it
acknowledged: on restart it republishes the current model and the open rounds'
assignments (devices de-duplicate them), and devices re-send unacknowledged updates (the
store de-duplicates those). Aggregation is deterministic given the stored updates, so an
aggregation interrupted by a crash is simply done again.

The manager returns the messages to publish (`Outgoing`) instead of publishing itself, so
the lifecycle can be tested one tick at a time without a broker.

Its cost follows the work, not the fleet or the round size: each open round has an
in-memory view (coordinator.open_rounds) loaded once and updated as rows are written, each
plain FedAvg update is decoded once on arrival, checked and folded into the round's running
sum (coordinator.running_aggregate), and the global adapter is decoded once per version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence, Set

import torch

from coordinator.aggregation import apply_delta
from coordinator.assignments import (
    assignment_json,
    assignment_messages,
    cleared_assignments,
    stored_plan,
    trusted_sample_count,
)
from coordinator.config import CoordinatorConfig, TaskConfig
from coordinator.fleet_history import round_outcomes
from coordinator.model_versions import ModelVersions
from coordinator.open_rounds import OpenRound, decode_checked, fold
from coordinator.outgoing import Outgoing
from coordinator.privacy import plan_round_privacy, spent_round_privacy, stop_holds
from coordinator.round_aggregation import batch_result, streaming_result, streams_task
from coordinator.round_book import RoundBook
from coordinator.round_opening import DeviceSelection
from coordinator.scheduler import DeviceCandidate, DevicePlan, Scheduler
from coordinator.secure.rounds import SecureRounds
from coordinator.secure.store import SecureRoundStore
from coordinator.secure.unmasking import (
    RejectHook,
    SecureOutcome,
    secure_mean,
    store_rejections,
)
from coordinator.store import (
    AdapterVersion,
    CoordinatorStore,
    RoundRecord,
    RoundState,
    StoredUpdate,
    UpdateOutcome,
)
from coordinator.task_models import AdapterBody, TaskModel
from durable.crash_points import crash_point
from edge_runtime.wire import AckStatus, Ed25519PrivateKey, SecAggEnvelope, Update

logger = logging.getLogger(__name__)


class RoundManager:
    """Runs the rounds of every configured task over one store."""

    def __init__(
        self,
        config: CoordinatorConfig,
        store: CoordinatorStore,
        scheduler: Scheduler | None,
        signing_key: Ed25519PrivateKey,
        *,
        now: Callable[[], float] = time.time,
        model_factory: Callable[[TaskConfig], TaskModel] = TaskModel,
        reject: RejectHook | None = None,
    ) -> None:
        """`reject`: records a device caught misbehaving outside a message of its own (a
        secure round's unmasking finds who revealed wrong shares, aggregation refuses an
        update its screening finds wrong); the daemon passes its `reject`, the default logs
        and stores the rejection."""
        self.reject = reject or store_rejections(store)
        self.config = config
        self.fleet = config.coordinator.fleet
        self.store = store
        self.selection = DeviceSelection(config, store, scheduler, now=now)
        self.schools = self.selection.schools
        self.key = signing_key
        self.now = now
        self.versions = ModelVersions(
            config, store, signing_key, now=now, model_factory=model_factory
        )
        self.current = self.versions.current
        """Task id -> the global adapter devices train from."""
        self.book = RoundBook(config, store, self.current)
        """Open-round views, round counts, decoded global adapters (coordinator.round_book)."""
        self.secure = SecureRounds(
            config,
            store,
            SecureRoundStore(config.state_dir / "secure_rounds.db", now=now),
            signing_key,
            self.versions.layout,
            now=now,
            reject=self.reject,
        )

    def start(self) -> list[Outgoing]:
        """Load or create every task's current version; return what to (re)publish:
        each task's model, the assignments of rounds left open by a previous run and the
        last messages of their secure-aggregation phases.

        What a previous run may have left half done is finished here. The assignments of
        each task's last closed round are cleared again (it may have stopped between
        closing the round and clearing them). A plain round whose updates were all stored
        (killed between storing the last update and aggregating) is aggregated now: its
        devices have nothing left to send, so waiting would only run out its deadline. A
        secure round opened in the main store but not yet in the secure one (killed
        between the two writes, before any assignment went out) starts its key exchange.
        A secure round whose phase has every answer in (killed between storing the last
        one and moving on) goes on to its next phase now, for the same reason."""
        outgoing: list[Outgoing] = []
        for task in self.config.tasks:
            body = self.versions.load_or_create(task.id)
            rounds = self.store.rounds(task.id)
            outgoing += self.versions.publish(task.id, body, self._last_round(task.id))
            closed = [r for r in rounds if r.state is not RoundState.OPEN]
            if closed:
                outgoing += self._cleared_assignments(task.id, closed[-1].round_number)
            self.selection.history(task.id)  # replayed once, here; kept in memory after
        for record in self.store.open_rounds():
            task = self.config.task(record.task_id)
            view = self.book.load_view(record)
            if task.secure_aggregation.enabled:
                self.secure.recover(task, record.round_number)
            elif self.round_is_complete(record):
                outgoing += self.aggregate(record, reason="all updates in before the restart")
                continue
            outgoing += self._assignment_messages(view)
        self.secure.forget_closed_rounds()
        secure_outgoing, outcomes = self.secure.resume()
        outgoing += secure_outgoing + self._finish_secure(outcomes)
        return outgoing

    def _last_round(self, task_id: str) -> int:
        return self.book.counts(task_id)[0]

    # -- opening rounds ------------------------------------------------------------------

    def completed_rounds(self, task_id: str) -> int:
        return self.book.counts(task_id)[1]

    def task_finished(self, task_id: str) -> bool:
        """All configured rounds completed, or the privacy budget allows no more."""
        if self.completed_rounds(task_id) >= self.config.task(task_id).rounds:
            return True
        return self.privacy_blocked(task_id)

    def privacy_blocked(self, task_id: str) -> bool:
        """A recorded budget stop that the configured budget still upholds (an operator
        who raises [tasks.privacy] epsilon_budget lets the task go on)."""
        task = self.config.task(task_id)
        if task.privacy.mode == "off":
            return False  # no ledger, no stop: spare the query on every tick
        return stop_holds(task, self.store.privacy_stop(task_id))

    def tasks_that_can_open(self) -> list[TaskConfig]:
        """The tasks without an open round that have rounds left: only when there is one
        does the daemon build the candidate list (a tick with none costs no fleet scan)."""
        open_tasks = self.book.open_tasks()
        return [
            task
            for task in self.config.tasks
            if task.id not in open_tasks and not self.task_finished(task.id)
        ]

    def open_assignments(self) -> dict[tuple[str, int], list[str]]:
        """(task, round) -> the assigned devices of every open round."""
        return {key: list(view.plans_json) for key, view in self.book.views.items()}

    def open_rounds_if_possible(self, candidates: Sequence[DeviceCandidate]) -> list[Outgoing]:
        """Open a round for every unfinished task without one, if enough devices fit."""
        outgoing: list[Outgoing] = []
        open_tasks = self.book.open_tasks()
        busy = self.book.busy_devices()
        for task in self.config.tasks:
            if task.id in open_tasks or self.task_finished(task.id):
                continue
            free = self.selection.eligible(task, [c for c in candidates if c.device_id not in busy])
            if free is None:
                continue
            round_number = self._last_round(task.id) + 1
            chosen = self.selection.choose(task, free, round_number)
            if chosen is None:
                continue
            record = self._open_round(task, round_number, chosen, len(free))
            if record is not None:
                busy |= {p.device_id for p in chosen}
                outgoing += self._assignment_messages(self.book.load_view(record))
        return outgoing

    def _open_round(
        self, task: TaskConfig, round_number: int, chosen: list[DevicePlan], free_count: int
    ) -> RoundRecord | None:
        """Record the round and its assignments (and its planned privacy spend); None when
        the privacy budget does not allow it."""
        plans = {p.device_id: assignment_json(task, p) for p in chosen}
        privacy = None
        if task.privacy.mode != "off":
            privacy = plan_round_privacy(
                self.store, task, round_number, len(plans), free_count, self.now()
            )
            if privacy is None:
                return None
        record = self.store.open_round(
            task.id,
            round_number,
            base_version=self.store.latest_adapter_version(task.id).version,  # type: ignore[union-attr]
            deadline=self.now() + task.schedule.round_deadline_seconds,
            plans_json=plans,
            privacy=privacy,
        )
        self.book.note_round(task.id, round_number)
        crash_point("round-opened")  # between the two stores' writes; nothing published
        if task.secure_aggregation.enabled:
            self.secure.open(task, round_number)
        logger.info(
            "task %s round %d opened: %d devices (%s), deadline in %.0f s",
            task.id,
            round_number,
            len(plans),
            ", ".join(sorted(plans)),
            task.schedule.round_deadline_seconds,
        )
        return record

    def _assignment_messages(self, view: OpenRound) -> list[Outgoing]:
        record = view.record
        return assignment_messages(
            self.fleet,
            record,
            view.plans_json,
            self.config.task(record.task_id),
            self.current[record.task_id].version,
            self.key,
        )

    # -- updates ---------------------------------------------------------------------------

    def accept_update(self, update: Update, body: bytes) -> tuple[AckStatus, str, list[Outgoing]]:
        """Validate and record one device's update; aggregate when the quota is met.

        The update is decoded once, here: checked as aggregation would check it (a bad one
        is refused in its acknowledgement, never stored) and, for a plain FedAvg task,
        folded into the round's running sum. The sender's identity and signature are
        checked by the daemon before this call."""
        view = self.book.view(update.task, update.server_round)
        if view is None:
            return self._update_for_closed_round(update)
        if update.device_id not in view.plans_json:
            return AckStatus.REJECTED, "no assignment for this device in that round", []
        task = self.config.task(update.task)
        if task.secure_aggregation.enabled:
            return AckStatus.REJECTED, "the task runs secure aggregation: send a masked input", []
        current = self.current[update.task]
        if update.model_version != current.version:
            return AckStatus.REJECTED, "trained on another model version", []
        plan = view.plan(update.device_id)
        if update.num_steps > plan.local_steps:
            return (
                AckStatus.REJECTED,
                f"claims {update.num_steps} local steps; its plan allows {plan.local_steps}",
                [],
            )
        reference = self.book.reference(update.task)
        delta, reason = decode_checked(body, reference, plan.rank)
        if delta is None:
            return AckStatus.REJECTED, reason, []
        stored = StoredUpdate(
            update_id=update.message_id,
            task_id=update.task,
            round_number=update.server_round,
            device_id=update.device_id,
            num_samples=update.num_samples,
            num_steps=update.num_steps,
            metrics=dict(update.metrics),
            body=body,
        )
        outcome = self.store.record_update(stored)
        if outcome is not UpdateOutcome.STORED:
            return AckStatus.DUPLICATE, outcome.value, []
        view.reported[update.device_id] = update.message_id
        if streams_task(task):
            fold(view, reference, stored, delta)
        del delta
        crash_point("update-stored")  # stored, not acknowledged, maybe not aggregated
        logger.debug(
            "task %s round %d: update from %s (%d samples, %d steps)",
            update.task,
            update.server_round,
            update.device_id,
            update.num_samples,
            update.num_steps,
        )
        outgoing: list[Outgoing] = []
        if self.round_is_complete(view.record):
            outgoing = self.aggregate(view.record, reason="all updates in")
        return AckStatus.ACCEPTED, "", outgoing

    def _update_for_closed_round(self, update: Update) -> tuple[AckStatus, str, list[Outgoing]]:
        """An update for a round that is not open: a late duplicate is acknowledged again,
        anything else refused (the store answers; this is rare, not per update)."""
        record = self.store.round(update.task, update.server_round)
        if record is None:
            return AckStatus.REJECTED, f"round {update.server_round} of {update.task} unknown", []
        if update.device_id not in self.store.assignments(update.task, update.server_round):
            return AckStatus.REJECTED, "no assignment for this device in that round", []
        if self.config.task(update.task).secure_aggregation.enabled:
            return AckStatus.REJECTED, "the task runs secure aggregation: send a masked input", []
        stored = self.store.reported_devices(update.task, update.server_round).values()
        if update.message_id in stored:
            return AckStatus.DUPLICATE, "already counted", []
        self.selection.note_late_delivery(update.task, update.server_round, update.device_id)
        return AckStatus.REJECTED, f"round {update.server_round} is {record.state.value}", []

    def round_is_complete(self, record: RoundRecord) -> bool:
        """Quota met, or every assigned device has either reported or declined."""
        task = self.config.task(record.task_id)
        view = self.book.view(record.task_id, record.round_number)
        if view is None:
            return False
        reported = len(view.reported)
        if reported >= task.schedule.devices_per_round:
            return True
        answered = view.answered() >= len(view.plans_json)
        return answered and reported >= task.schedule.min_updates

    def accept_decline(
        self, task_id: str, round_number: int, device_id: str, reason: str
    ) -> tuple[str, list[Outgoing]]:
        """A device said no: note it, and close the round early if nobody is left to wait
        for. Returns why the decline was refused ("" when noted) and what to publish."""
        view = self.book.view(task_id, round_number)
        if view is None:
            record = self.store.round(task_id, round_number)
            state = "unknown" if record is None else record.state.value
            return f"round {round_number} of {task_id} is {state}", []
        if not self.store.record_decline(task_id, round_number, device_id, reason):
            return "no assignment for this device in that round", []
        view.note_decline(device_id, reason)
        return "", self._after_decline(view.record)

    def _after_decline(self, record: RoundRecord) -> list[Outgoing]:
        """A device left the round: it may now have nobody left to wait for."""
        task = self.config.task(record.task_id)
        if task.secure_aggregation.enabled:
            outgoing, outcomes = self.secure.accept_decline(task, record.round_number)
            return outgoing + self._finish_secure(outcomes)
        if self.round_is_complete(record):
            return self.aggregate(record, reason="every device answered")
        return []

    def release_revoked(self, revoked: Set[str]) -> list[Outgoing]:
        """Take revoked devices out of the open rounds they were assigned to and have not
        answered, as if they had declined: their messages are refused from now on, so a
        round waiting for them would only wait out its deadline. In memory unless a
        revoked device is still assigned (rare), so it costs nothing on an idle tick."""
        outgoing: list[Outgoing] = []
        for view in list(self.book.views.values()):
            task_id, round_number = view.key
            leaving = {d for d in revoked if d in view.plans_json}
            leaving -= set(view.declined) | set(view.reported)
            if leaving and self.config.task(task_id).secure_aggregation.enabled:
                leaving -= set(self.store.reported_devices(task_id, round_number))  # masked inputs
            for device_id in sorted(leaving):
                logger.info(
                    "task %s round %d: %s was revoked; the round no longer waits for it",
                    task_id,
                    round_number,
                    device_id,
                )
                self.store.record_decline(task_id, round_number, device_id, "device revoked")
                view.note_decline(device_id, "device revoked")
            if leaving:
                outgoing += self._after_decline(view.record)
        return outgoing

    # -- closing ---------------------------------------------------------------------------

    def close_due_rounds(self) -> list[Outgoing]:
        """At the deadline: aggregate with a quorum, or fail the round and keep the model."""
        outgoing, outcomes = self.secure.tick()
        outgoing += self._finish_secure(outcomes)
        for view in list(self.book.views.values()):
            record = view.record
            task = self.config.task(record.task_id)
            if self.now() < record.deadline or task.secure_aggregation.enabled:
                continue  # secure rounds end through their phases (self.secure.tick)
            if view.key not in self.book.views:
                continue  # closed by an earlier round's messages in this same call
            received = len(view.reported)
            if received >= task.schedule.min_updates:
                outgoing += self.aggregate(record, reason="deadline with quorum")
            else:
                quorum = task.schedule.min_updates
                reason = (
                    f"deadline passed with {received} update(s), quorum is {quorum}; "
                    "global adapter unchanged"
                )
                outgoing += self._fail_round(record.task_id, record.round_number, reason)
        return outgoing

    def _fail_round(self, task_id: str, round_number: int, reason: str) -> list[Outgoing]:
        """Close the round as failed (the global adapter stays) and clear its assignments."""
        self.store.close_round(task_id, round_number, RoundState.FAILED, reason)
        logger.warning("task %s round %d failed: %s", task_id, round_number, reason)
        outgoing = self._cleared_assignments(task_id, round_number)
        self._round_closed(task_id, round_number, completed=False)
        return outgoing

    def _round_closed(self, task_id: str, round_number: int, completed: bool) -> None:
        """Drop the closed round's view, count it, and feed what its devices did to the
        scheduler's history (in memory: no replay of the task's past)."""
        view = self.book.round_closed(task_id, round_number, completed)
        if view is None:
            return
        outcomes = round_outcomes(
            view.record.opened_at,
            view.plans_json,
            view.schools,
            self.store.update_summaries(task_id, round_number),
        )
        self.selection.observe_closed(task_id, round_number, outcomes)

    def _cleared_assignments(self, task_id: str, round_number: int) -> list[Outgoing]:
        view = self.book.views.get((task_id, round_number))
        devices = view.plans_json if view else self.store.assignments(task_id, round_number)
        return cleared_assignments(self.fleet, devices)

    def aggregate(self, record: RoundRecord, reason: str) -> list[Outgoing]:
        task = self.config.task(record.task_id)
        view = self.book.view(task.id, record.round_number)
        if view is None:
            raise ValueError(f"round {record.round_number} of task {task.id!r} is not open")
        reference = self.book.reference(task.id)
        compute = streaming_result if streams_task(task) else batch_result
        result, considered = compute(self.store, task, view, reference, self.schools)
        for device_id, why in result.rejected_devices.items():  # acknowledged, then screened
            self.reject(device_id, "update-refused-at-aggregation", why)
        if result.is_empty:
            why = (
                f"every update refused: {result.rejected_devices}"
                if considered
                else "no update left after the schools' min_devices_per_aggregate"
            )
            return self._fail_round(task.id, record.round_number, why)
        return self._complete_round(
            record,
            reference,
            result.delta,
            len(result.accepted_devices),
            result.total_samples,
            reason,
        )

    def _round_metrics(
        self, task_id: str, round_number: int, evaluation: dict[str, float]
    ) -> dict[str, float]:
        """The new version's evaluation plus the devices' mean training loss."""
        metrics = dict(evaluation)
        losses = [
            u.metrics.get("train_loss") for u in self.store.update_summaries(task_id, round_number)
        ]
        known = [loss for loss in losses if loss is not None]
        if known:
            metrics["train_loss"] = sum(known) / len(known)
        return metrics

    def _complete_round(
        self,
        record: RoundRecord,
        reference: dict[str, torch.Tensor],
        delta: dict[str, torch.Tensor],
        aggregated: int,
        total_samples: int,
        reason: str,
    ) -> list[Outgoing]:
        """Apply the aggregate, write and evaluate the new version, close the round with
        its metrics and ledger row, and return the new model's messages."""
        task = self.config.task(record.task_id)
        try:
            new_state = apply_delta(reference, delta)
        except ValueError as error:
            return self._fail_round(task.id, record.round_number, str(error))
        body = AdapterBody.of(new_state)
        version_number = self.store.latest_adapter_version(task.id).version + 1  # type: ignore[union-attr]
        folder = self.versions.write(task.id, version_number, new_state, body)
        crash_point("version-written")  # mid-aggregation: the folder is there, the round open
        evaluation = self.versions.evaluate(task.id, new_state)
        metrics = self._round_metrics(task.id, record.round_number, evaluation)
        metrics.update({"updates": float(aggregated), "samples": float(total_samples)})
        privacy = spent_round_privacy(self.store, task, record.round_number, aggregated)
        if privacy is not None:
            metrics["epsilon"] = privacy.epsilon
        self.store.close_round(
            task.id,
            record.round_number,
            RoundState.COMPLETED,
            f"{reason}: aggregated {aggregated} update(s)",
            AdapterVersion(
                task.id,
                version_number,
                record.round_number,
                body.version,
                str(folder),
                self.now(),
                metrics=evaluation,
            ),
            metrics=metrics,
            privacy=privacy,
        )
        crash_point("round-closed")  # closed in the store; nothing published yet
        outgoing = self._cleared_assignments(task.id, record.round_number)
        self._round_closed(task.id, record.round_number, completed=True)
        self.book.new_version(task.id, body, new_state)
        logger.info(
            "task %s round %d completed (%s): version %d %s %s",
            task.id,
            record.round_number,
            reason,
            version_number,
            body.version[:12],
            {k: round(v, 4) for k, v in metrics.items()},
        )
        return outgoing + self.versions.publish(task.id, body, server_round=record.round_number)

    # -- secure aggregation ----------------------------------------------------------------

    def accept_secure(
        self, envelope: SecAggEnvelope, body: bytes
    ) -> tuple[AckStatus, str, list[Outgoing]]:
        """One device's secure-aggregation step (identity and signature checked by the
        daemon); the status is what a masked input is acknowledged with."""
        record = self.store.round(envelope.task, envelope.server_round)
        if record is None or record.state is not RoundState.OPEN:
            if record is not None and self.secure.already_kept(envelope, body):
                return AckStatus.DUPLICATE, "already counted", []
            state = "unknown" if record is None else record.state.value
            return AckStatus.REJECTED, f"round {envelope.server_round} is {state}", []
        status, reason, outgoing, outcomes = self.secure.accept(envelope, body)
        return status, reason, outgoing + self._finish_secure(outcomes)

    def _trusted_samples(self, task_id: str, round_number: int, devices: Iterable[str]) -> int:
        """The bounded sample counts (`trusted_sample_count`) of these devices' updates."""
        plans = self.store.assignments(task_id, round_number)
        wanted = set(devices)
        return sum(
            trusted_sample_count(u.num_samples, u.num_steps, stored_plan(plans[u.device_id]))
            for u in self.store.update_summaries(task_id, round_number)
            if u.device_id in wanted
        )

    def _finish_secure(self, outcomes: Sequence[SecureOutcome]) -> list[Outgoing]:
        """Close the secure rounds that ended: the mean of the survivors' sum (plus central
        DP noise) becomes the new version, or an abort fails the round."""
        outgoing: list[Outgoing] = []
        for outcome in outcomes:
            record = self.store.round(outcome.task_id, outcome.round_number)
            if record is None or record.state is not RoundState.OPEN:
                continue
            if outcome.result is None:
                reason = f"secure aggregation aborted: {outcome.reason}"
                outgoing += self._fail_round(outcome.task_id, outcome.round_number, reason)
                outgoing += self.secure.abort_messages(
                    outcome.task_id, outcome.round_number, outcome.reason
                )
                self.secure.finish(outcome.task_id, outcome.round_number, False, reason)
                continue
            outgoing += self._complete_round(
                record,
                self.book.reference(outcome.task_id),
                secure_mean(outcome.result, self.config.task(outcome.task_id)),
                outcome.result.num_inputs,
                self._trusted_samples(
                    outcome.task_id, outcome.round_number, outcome.result.contributors
                ),
                outcome.reason,
            )
            self.secure.finish(outcome.task_id, outcome.round_number, True, outcome.reason)
        return outgoing
