"""A secure round read back from the coordinator's stores: what each device sent at each
step, the unmask request, and a `SecAggServer` replayed through a phase.

The coordinator keeps no in-memory protocol state (a restart must resume any phase), so
every decision is taken from these views; every stored message passed the round's checks
on arrival, so replaying it cannot fail where the original did not.
"""

from __future__ import annotations

from collections.abc import Callable

from coordinator.config import TaskConfig
from coordinator.secure.store import SecurePhase, SecureRoundState, SecureRoundStore
from coordinator.store import CoordinatorStore
from coordinator.task_models import wire_task_spec
from edge_runtime.secagg import (
    AdvertiseKeys,
    SecAggAbort,
    SecAggConfig,
    SecAggServer,
    ShareKeys,
    TensorLayout,
    UnmaskRequest,
    UnmaskResponse,
    masked_input_from_body,
    parse_message,
    quantization_of,
    secagg_round_id,
)
from edge_runtime.wire import ProtocolError, SecAggStep, SecureAggregationSpec


class SecureStepRefused(ProtocolError):
    """A device's secure-aggregation message that the round cannot take (late, from a device
    outside the round, or inconsistent with what the device sent before)."""


def secure_spec(task: TaskConfig) -> SecureAggregationSpec:
    """The secure-aggregation part of the task's wire spec (refused for a plain task)."""
    spec = wire_task_spec(task).secure_aggregation
    if spec is None:
        raise SecureStepRefused(f"task {task.id} does not run secure aggregation")
    return spec


class RoundReplay:
    """Read-only views of secure rounds over the main store and the secure store."""

    def __init__(
        self,
        store: CoordinatorStore,
        secure_store: SecureRoundStore,
        layout_of: Callable[[str], TensorLayout],
    ) -> None:
        self.store = store
        self.secure_store = secure_store
        self.layout_of = layout_of
        """Task id -> the layout of its global adapter, which every masked input has."""

    def senders(self, state: SecureRoundState, step: SecAggStep) -> set[str]:
        return self.secure_store.senders(state.task_id, state.round_number, step.value)

    def masked_senders(self, state: SecureRoundState) -> set[str]:
        return set(self.store.reported_devices(state.task_id, state.round_number))

    def _stored(self, state: SecureRoundState, step: SecAggStep) -> dict[str, bytes]:
        return self.secure_store.messages(state.task_id, state.round_number, step.value)

    def adverts(self, state: SecureRoundState) -> list[AdvertiseKeys]:
        stored = self._stored(state, SecAggStep.ADVERTISE_KEYS)
        return [parse_message(AdvertiseKeys, body) for body in stored.values()]

    def shares(self, state: SecureRoundState) -> dict[str, ShareKeys]:
        stored = self._stored(state, SecAggStep.SHARE_KEYS)
        return {device: parse_message(ShareKeys, body) for device, body in stored.items()}

    def responses(self, state: SecureRoundState) -> list[UnmaskResponse]:
        stored = self._stored(state, SecAggStep.UNMASK_RESPONSE)
        return [parse_message(UnmaskResponse, body) for body in stored.values()]

    def unmask_request(self, task: TaskConfig, state: SecureRoundState) -> UnmaskRequest:
        """What `SecAggServer.collect_masked_inputs` would ask, from the stored senders
        alone (every stored message passed the server's checks on arrival), so answering
        each unmask response does not replay the masked vectors; SecAggAbort below t."""
        sharers = self.senders(state, SecAggStep.SHARE_KEYS)
        survivors = tuple(sorted(self.masked_senders(state) & sharers))
        if len(survivors) < max(2, state.threshold):
            raise SecAggAbort(
                f"only {len(survivors)} of {len(sharers)} devices sent masked inputs; "
                f"threshold is {state.threshold}. The round is aborted and nothing is revealed"
            )
        dropped = tuple(sorted(sharers - set(survivors)))
        return UnmaskRequest(secagg_round_id(task.id, state.round_number), survivors, dropped)

    def server(
        self, task: TaskConfig, state: SecureRoundState, through: SecurePhase
    ) -> SecAggServer:
        """A SecAggServer fed the stored messages of every phase up to `through`."""
        round_id = secagg_round_id(task.id, state.round_number)
        spec = secure_spec(task)
        config = SecAggConfig(max(2, state.threshold), quantization_of(spec))
        server = SecAggServer(round_id, config, self.layout_of(task.id))
        server.collect_advertisements(self.adverts(state))
        if through is SecurePhase.ADVERTISING:
            return server
        server.route_shares(list(self.shares(state).values()))
        if through is SecurePhase.SHARING:
            return server
        server.collect_masked_inputs(
            [
                masked_input_from_body(round_id, update.device_id, spec, update.body)
                for update in self.store.updates(task.id, state.round_number)
            ]
        )
        return server
