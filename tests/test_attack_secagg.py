"""Hostile enrolled devices against secure aggregation's unmasking step (issue 16, finding 1).

A device that answers the unmask request with wrong share values used to shift the published
adapter silently (the coordinator rebuilt each secret from the first t shares and checked
only their range), or, lying about a dropped device's mask key, made the round abort. Now
every rebuilt secret is verified (a self-mask seed against its owner's commitment, a mask
key against its advertised public key) and rebuilt from all the answers, so:

- the sum is exactly the one the honest answers give, the liar is named in the result and
  recorded as a `secagg-bad-share` rejection, and the round completes;
- a device whose own shares rebuild another seed than it committed to is named
  (`secagg-bad-secret`) and the round aborts, since its input cannot be unmasked;
- too many liars for the spare answers abort the round with a reason naming the devices.

Driven three ways: `SecAggServer` with hostile clients (bit-for-bit comparisons), the
coordinator's round manager in process, and the real daemon over a real Mosquitto with
scripted devices running the agent's own `SecureSession`.

The module imports only names that predate the fix, so against the old code every test
fails on its assertions (a wrong sum, an abort, no rejection), not on an import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.config import SecureAggregationConfig
from coordinator.mosquitto import MosquittoProcess
from coordinator.rounds import RoundManager
from coordinator.scheduler import DeviceCandidate
from coordinator.store import RoundState
from device_profiles.profile import find_profile
from edge_runtime.secagg import (
    PRIME,
    MaskedInput,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggResult,
    SecAggServer,
    ShareKeys,
    TensorLayout,
    UnmaskRequest,
    UnmaskResponse,
    message_body,
    parse_message,
    parse_roster,
    quantization_error_bound,
    quantization_of,
)
from edge_runtime.secagg.shamir import share_from_bytes, share_to_bytes
from edge_runtime.secagg_session import SecureSession
from edge_runtime.wire import (
    SECURE_AGGREGATION_CAPABILITY,
    AckStatus,
    DeviceChannel,
    SecAggEnvelope,
    SecAggStep,
    TaskAssignment,
    decode_frame,
    generate_private_key,
)
from tests.daemon_helpers import wait_until
from tests.test_secagg import (
    DEVICES,
    QUANTIZATION,
    assert_sum_within_bound,
    lora_delta,
    setup_round,
)
from tests.test_secure_rounds import DEVICES as BROKER_DEVICES
from tests.test_secure_rounds import (
    ROUND_DEADLINE,
    STEP_SECONDS,
    SecureDevice,
    _config,
    _deltas,
    _device_message,
    _enrolled_devices,
    _envelopes,
    _manager,
    _start,
    _stop,
)


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4321)
    return {device_id: lora_delta(generator) for device_id in DEVICES}


# -- hostile answers ---------------------------------------------------------------------


def _shifted(shares: dict[str, bytes], owners: set[str] | None = None) -> dict[str, bytes]:
    """The same shares, each of `owners` (all when None) moved to a random other value."""
    return {
        owner: share_to_bytes((share_from_bytes(share) + 1 + secrets.randbelow(PRIME - 1)) % PRIME)
        if owners is None or owner in owners
        else share
        for owner, share in shares.items()
    }


def lie_about_self_masks(response: UnmaskResponse) -> UnmaskResponse:
    return dataclasses.replace(response, self_mask_shares=_shifted(response.self_mask_shares))


def lie_about_mask_keys(response: UnmaskResponse) -> UnmaskResponse:
    return dataclasses.replace(response, mask_key_shares=_shifted(response.mask_key_shares))


def lie_about_everything(response: UnmaskResponse) -> UnmaskResponse:
    return lie_about_mask_keys(lie_about_self_masks(response))


def assert_identical(result: SecAggResult, expected: SecAggResult) -> None:
    assert result.contributors == expected.contributors and result.dropped == expected.dropped
    for name, tensor in expected.total.items():
        assert torch.equal(result.total[name], tensor), name


def named(result_or_abort: object) -> list[tuple[str, str]]:
    """(device, rejection category) of everyone a result or an abort names as a liar."""
    rejections = getattr(result_or_abort, "rejections", None)
    assert rejections is not None, "no rejections recorded: nobody was named"
    return [(rejection.device_id, rejection.fault.value) for rejection in rejections]


def unmask(
    inputs: dict, dropped: tuple[str, ...] = (), silent: tuple[str, ...] = ()
) -> tuple[SecAggServer, dict[str, UnmaskResponse]]:
    """A 5-device round (t = 3) up to the honest unmask answers, none delivered yet."""
    server, clients, masked = setup_round(inputs)
    server.collect_masked_inputs([m for d, m in masked.items() if d not in dropped])
    assert server.request is not None
    answers = {d: clients[d].unmask(server.request) for d in server.request.survivors}
    return server, {d: a for d, a in answers.items() if d not in silent}


# -- the library: SecAggServer with hostile answers --------------------------------------


@pytest.mark.parametrize("silent", [(), (DEVICES[2],)], ids=["all-answer", "one-silent"])
@pytest.mark.parametrize("liar", [DEVICES[0], DEVICES[4]], ids=["among-first-t", "last"])
def test_wrong_self_mask_shares_are_outvoted_and_the_liar_named(inputs, liar, silent):
    """5 answers (Berlekamp-Welch corrects one) or 4 (the bounded search finds the 3 honest
    ones); the liar among the first t by x (which alone decided before) or the last."""
    server, answers = unmask(inputs, silent=silent)
    expected = server.aggregate(list(answers.values()))
    attacked = {**answers, liar: lie_about_self_masks(answers[liar])}
    result = server.aggregate(list(attacked.values()))
    assert_identical(result, expected)  # bit for bit the honest sum
    assert_sum_within_bound(result, inputs)
    assert named(result) == [(liar, "secagg-bad-share")]
    assert all(liar in r.reason and "wrong shares" in r.reason for r in result.rejections)


def test_a_wrong_share_of_a_dropped_devices_mask_key_is_outvoted(inputs):
    """The rebuilt key of the dropped device would not match its public key: the round used
    to abort; now the other answers rebuild it and the round completes."""
    dropped = (DEVICES[4],)
    server, answers = unmask(inputs, dropped=dropped)
    expected = server.aggregate(list(answers.values()))
    liar = DEVICES[1]
    attacked = {**answers, liar: lie_about_mask_keys(answers[liar])}
    result = server.aggregate(list(attacked.values()))
    assert_identical(result, expected)
    assert result.dropped == dropped
    assert named(result) == [(liar, "secagg-bad-share")]
    assert "mask key" in result.rejections[0].reason


def test_a_share_crafted_to_rebuild_an_equivalent_mask_key_is_caught(inputs):
    """X25519 ignores five bits of a raw private key. A liar that knows which shares are
    interpolated can shift the rebuilt key by 128 (a cleared bit) and still pass a public
    key check; only a clamped key is accepted, so it is caught and outvoted."""
    server, answers = unmask(inputs, dropped=(DEVICES[4],))
    expected = server.aggregate(list(answers.values()))
    liar, basis = DEVICES[0], (1, 2, 3)  # x of the first t answers
    weight = 1
    for x in basis[1:]:
        weight = weight * (-x) * pow(basis[0] - x, -1, PRIME) % PRIME  # Lagrange l_1(0)
    share = share_from_bytes(answers[liar].mask_key_shares[DEVICES[4]])
    crafted = (share + 128 * pow(weight, -1, PRIME)) % PRIME
    attacked = {
        **answers,
        liar: dataclasses.replace(
            answers[liar], mask_key_shares={DEVICES[4]: share_to_bytes(crafted)}
        ),
    }
    result = server.aggregate(list(attacked.values()))
    assert_identical(result, expected)
    assert named(result) == [(liar, "secagg-bad-share")]


def test_two_liars_among_five_answers_are_both_outvoted(inputs):
    server, answers = unmask(inputs)
    expected = server.aggregate(list(answers.values()))
    liars = (DEVICES[0], DEVICES[3])
    attacked = {d: lie_about_everything(a) if d in liars else a for d, a in answers.items()}
    result = server.aggregate(list(attacked.values()))
    assert_identical(result, expected)
    assert named(result) == [(liar, "secagg-bad-share") for liar in liars]


def test_more_liars_than_spare_answers_abort_naming_the_devices(inputs):
    """4 answers, t = 3, 2 liars: no 3 answers rebuild a verified seed. Nothing is output."""
    server, answers = unmask(inputs, silent=(DEVICES[4],))
    liars = (DEVICES[1], DEVICES[2])
    attacked = {d: lie_about_self_masks(a) if d in liars else a for d, a in answers.items()}
    with pytest.raises(SecAggAbort, match="rebuild a self-mask seed matching its") as caught:
        server.aggregate(list(attacked.values()))
    message = str(caught.value)
    assert all(device in message for device in answers)  # the devices whose shares it holds
    assert "more than 1 of those devices revealed wrong shares" in message
    assert named(caught.value) == []  # which of them lied cannot be told: nobody is blamed


@pytest.mark.parametrize(
    ("answers", "threshold", "liars", "decoded"),
    [
        (5, 3, 1, True),  # Berlekamp-Welch corrects e = 1
        (4, 3, 1, True),  # no spare for Berlekamp-Welch: every 3-subset tried
        (20, 11, 4, True),  # Berlekamp-Welch, e = 4
        (20, 11, 5, True),  # beyond e: random draws among the C(20, 11) subsets find an honest one
        (3, 3, 1, False),  # no spare share: which one lied cannot be told
        (20, 11, 9, False),  # 11 honest of 20: the bounded search gives up
    ],
)
def test_the_decoder_outvotes_wrong_shares_within_its_bounds(answers, threshold, liars, decoded):
    from edge_runtime.secagg import ShareDecoder, split_secret

    secret = secrets.randbelow(2**256)
    shares = split_secret(secret, threshold, list(range(1, answers + 1)))
    wrong = set(range(2, 2 + liars))
    for x in wrong:
        shares[x] = (shares[x] + 1 + secrets.randbelow(PRIME - 1)) % PRIME
    decoding = ShareDecoder(threshold).decode(shares, lambda candidate: candidate == secret)
    if decoded:
        assert decoding.secret == secret and decoding.wrong_points == wrong
    else:
        assert decoding.secret is None and not decoding.dealt_wrong_secret


def _round_with_a_hostile_dealer(
    inputs: dict, tamper: Callable[[SecAggClient, ShareKeys], ShareKeys], dropped: tuple = ()
) -> tuple[SecAggServer, list[UnmaskResponse]]:
    layout = TensorLayout.of(inputs[DEVICES[0]])
    config = SecAggConfig(3, QUANTIZATION)
    server = SecAggServer("round-7", config, layout)
    clients = {d: SecAggClient(d, "round-7", config, layout) for d in DEVICES}
    roster = server.collect_advertisements([c.advertise_keys() for c in clients.values()])
    shares = [c.share_keys(roster) for c in clients.values()]
    shares[1] = tamper(clients[DEVICES[1]], shares[1])
    for device_id, forwarded in server.route_shares(shares).items():
        clients[device_id].receive_shares(forwarded)
    masked: list[MaskedInput] = [
        c.mask_input(inputs[d]) for d, c in clients.items() if d not in dropped
    ]
    request = server.collect_masked_inputs(masked)
    return server, [clients[d].unmask(request) for d in request.survivors]


def test_a_device_whose_shares_rebuild_another_seed_than_it_committed_to_is_named(inputs):
    """Its shares agree with each other (nobody lied about them), but the seed they rebuild
    is not the one committed to: its self-mask cannot be removed, so the round aborts."""

    def commit_to_another_seed(_: SecAggClient, message: ShareKeys) -> ShareKeys:
        return dataclasses.replace(message, self_mask_commitment=hashlib.sha256(b"x").digest())

    server, answers = _round_with_a_hostile_dealer(inputs, commit_to_another_seed)
    with pytest.raises(SecAggAbort) as caught:
        server.aggregate(answers)
    assert f"{DEVICES[1]!r} shared a self-mask seed that does not match its commitment" in str(
        caught.value
    )
    assert named(caught.value) == [(DEVICES[1], "secagg-bad-secret")]


def test_a_dropped_device_that_shared_another_mask_key_than_it_advertised_is_named(inputs):
    def share_another_key(client: SecAggClient, message: ShareKeys) -> ShareKeys:
        """Split a fresh mask key while the roster keeps the advertised one's public key."""
        advert = client.advertise_keys()
        roster = list(client._roster.values())  # noqa: SLF001 - a hostile double
        client._mask_key = X25519PrivateKey.generate()  # noqa: SLF001
        client._held_shares.clear()  # noqa: SLF001
        client.advertise_keys = lambda: advert  # type: ignore[method-assign]
        return client.share_keys(roster)

    server, answers = _round_with_a_hostile_dealer(inputs, share_another_key, (DEVICES[1],))
    with pytest.raises(SecAggAbort) as caught:
        server.aggregate(answers)
    assert "shared a mask key that does not match its advertised public key" in str(caught.value)
    assert named(caught.value) == [(DEVICES[1], "secagg-bad-secret")]


# -- the coordinator: the round manager in process ---------------------------------------


def test_share_keys_without_a_seed_commitment_are_refused(
    tmp_path: Path, tiny_bert_folder: Path, inputs
) -> None:
    """A seed nobody committed to could not be verified: its sender does not join U2."""
    server, clients, _ = setup_round(inputs)
    roster = list(server.roster.values())
    messages = [client.share_keys(roster) for client in clients.values()]
    messages[0] = dataclasses.replace(messages[0], self_mask_commitment=b"")
    server.route_shares(messages)
    assert server.shared_keys == DEVICES[1:]

    manager = _manager(
        tmp_path,
        tiny_bert_folder,
        schedule={"devices_per_round": 3, "min_updates": 3},
        secure_aggregation=SecureAggregationConfig(enabled=True),
    )
    capable = frozenset({SECURE_AGGREGATION_CAPABILITY})
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"d{i}", "s", profile, capabilities=capable) for i in range(3)]
    sessions = {
        a.device_id: SecureSession(a, a.device_id, generate_private_key())
        for a in (
            decode_frame(item.payload).expect(TaskAssignment)
            for item in manager.open_rounds_if_possible(candidates)
            if item.topic.endswith("/task") and item.payload
        )
    }
    rosters = []
    for session in sessions.values():
        rosters += _envelopes(manager.accept_secure(*_device_message(session.advertise_frame()))[2])
    envelope, body = rosters[0]
    threshold, roster = parse_roster(body)
    session = sessions[envelope.device_id]
    message = session.client.share_keys(roster, threshold)
    bare_frame = session.frame(
        SecAggStep.SHARE_KEYS,
        message_body(dataclasses.replace(message, self_mask_commitment=b"")),
    )[1]
    status, reason, _ = manager.accept_secure(*_device_message(bare_frame))
    assert status is AckStatus.REJECTED
    assert "sent no commitment to its self-mask seed" in reason


def _relay_round(
    manager: RoundManager,
    liar: str,
    lie: Callable[[UnmaskResponse], UnmaskResponse],
    dropped: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Five devices through the manager's secure phases, `liar` answering the unmask
    request with `lie`; `dropped` decline after sharing keys (their masked input never
    comes). Returns the reference adapter and every device's delta."""
    capable = frozenset({SECURE_AGGREGATION_CAPABILITY})
    profile = find_profile("laptop-mid-16gb")
    candidates = [DeviceCandidate(f"d{i}", "s", profile, capabilities=capable) for i in range(5)]
    assignments = [
        decode_frame(item.payload).expect(TaskAssignment)
        for item in manager.open_rounds_if_possible(candidates)
        if item.topic.endswith("/task") and item.payload
    ]
    sessions = {
        a.device_id: SecureSession(a, a.device_id, generate_private_key()) for a in assignments
    }
    reference = manager.current["alpha"].state()
    generator = torch.Generator().manual_seed(3)
    deltas = {
        device: {n: 0.01 * torch.randn(t.shape, generator=generator) for n, t in reference.items()}
        for device in sessions
    }
    pending: list[tuple[SecAggEnvelope, bytes]] = []
    for session in sessions.values():
        pending += _envelopes(manager.accept_secure(*_device_message(session.advertise_frame()))[2])
    while pending:
        envelope, body = pending.pop(0)
        session = sessions[envelope.device_id]
        if envelope.step is SecAggStep.ABORT:
            continue  # the round failed (the test says how)
        if envelope.step is SecAggStep.UNMASK_REQUEST and envelope.device_id == liar:
            answer = lie(session.client.unmask(parse_message(UnmaskRequest, body)))
            reply: bytes | None = session.frame(SecAggStep.UNMASK_RESPONSE, message_body(answer))[1]
        else:
            reply = session.answer(envelope.step, body)
        if reply is not None:
            pending += _envelopes(manager.accept_secure(*_device_message(reply))[2])
        if envelope.step is not SecAggStep.FORWARDED_SHARES:
            continue
        if envelope.device_id in dropped:  # it shared keys, then declined: a drop-out
            reason, more = manager.accept_decline("alpha", 1, envelope.device_id, "battery low")
            assert reason == "", reason
        else:
            frame = session.masked_input(deltas[envelope.device_id], 5, 2, {"train_loss": 0.5})[1]
            status, reason, more = manager.accept_secure(*_device_message(frame))
            assert status is AckStatus.ACCEPTED, reason
        pending += _envelopes(more)
    return reference, deltas


@pytest.mark.parametrize(
    ("lie", "dropped"),
    [(lie_about_self_masks, ()), (lie_about_mask_keys, ("d4",))],
    ids=["self-mask-shares", "mask-key-shares-of-a-dropped-device"],
)
def test_the_round_manager_publishes_the_honest_mean_and_records_the_liar(
    tmp_path: Path, tiny_bert_folder: Path, lie: Callable, dropped: tuple[str, ...]
) -> None:
    manager = _manager(
        tmp_path,
        tiny_bert_folder,
        schedule={"devices_per_round": 5, "min_updates": 3},
        secure_aggregation=SecureAggregationConfig(enabled=True, clip_bound=0.5),
    )
    reference, deltas = _relay_round(manager, "d1", lie, dropped)
    record = manager.store.round("alpha", 1)
    assert record is not None and record.state is RoundState.COMPLETED, record.reason
    survivors = [d for d in sorted(deltas) if d not in dropped]
    # The new adapter is the old one plus the mean of every survivor's delta (the liar's
    # too: only its shares were wrong), within the quantization error: as without the lie.
    new_state = manager.current["alpha"].state()
    quantization = quantization_of(_secure_spec(manager))
    tolerance = quantization_error_bound(quantization, len(survivors)) / len(survivors)
    for name, tensor in reference.items():
        expected = tensor + sum(deltas[d][name] for d in survivors) / len(survivors)
        assert torch.allclose(new_state[name], expected, atol=tolerance + 1e-6), name
    assert f"summed {len(survivors)} masked inputs, {len(dropped)} dropped" in record.reason
    assert "revealed wrong shares and were outvoted: d1" in record.reason
    assert manager.store.rejection_counts() == {"secagg-bad-share": 1}
    [refused] = manager.store.refusals(1)
    assert (refused.device_id, refused.category) == ("d1", "secagg-bad-share")
    assert "'d1' revealed wrong shares" in refused.last_reason


def _secure_spec(manager: RoundManager):  # noqa: ANN202
    from coordinator.task_models import wire_task_spec

    spec = wire_task_spec(manager.config.task("alpha")).secure_aggregation
    assert spec is not None
    return spec


# -- the daemon over a real Mosquitto -----------------------------------------------------


class LyingDevice(SecureDevice):
    """Runs the agent's session like an honest device, except that it answers the unmask
    request with wrong share values (signed with its own enrolled key)."""

    def answer_unmask_with(self, lie: Callable[[UnmaskResponse], UnmaskResponse]) -> None:
        assert self.session is not None
        _, body = self.envelope(SecAggStep.UNMASK_REQUEST)
        answer = lie(self.session.client.unmask(parse_message(UnmaskRequest, body)))
        frame = self.session.frame(SecAggStep.UNMASK_RESPONSE, message_body(answer))[1]
        self.device.publish(DeviceChannel.SECAGG, frame)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("lie", "not_delivered"),
    [(lie_about_self_masks, 0), (lie_about_mask_keys, 1)],
    ids=["self-mask-shares", "mask-key-shares-of-a-dropped-device"],
)
def test_over_mosquitto_a_lying_device_is_outvoted_and_recorded(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    tiny_bert_folder: Path,
    lie: Callable,
    not_delivered: int,
) -> None:
    """Five enrolled devices over the real broker; dev-1 (among the first t by x, the shares
    the old coordinator used) lies in its unmask answer; `not_delivered` devices share keys
    but never deliver their masked input, so a mask key must be rebuilt too."""
    config = _config(tmp_path, mosquitto, tiny_bert_folder)
    daemon, loop = _start(config)
    operator, scripted = _enrolled_devices(tmp_path, mosquitto)
    liar = BROKER_DEVICES[1]
    devices = {name: LyingDevice(device.device) for name, device in scripted.items()}
    try:
        reference = daemon.rounds.current["t"].state()
        deltas = _deltas(reference)
        for device in devices.values():
            device.advertise()
        for device in devices.values():
            threshold, roster = parse_roster(device.answer(SecAggStep.ROSTER))
            assert threshold == 3 and len(roster) == 5
        for device in devices.values():
            device.answer(SecAggStep.FORWARDED_SHARES)
        survivors = BROKER_DEVICES[: 5 - not_delivered]
        for name in survivors:
            devices[name].send_masked(deltas[name])
        for name in survivors:
            if name == liar:
                devices[name].answer_unmask_with(lie)
            else:
                devices[name].answer(SecAggStep.UNMASK_REQUEST)

        wait_until(
            lambda: operator.round("t", 1).state is not RoundState.OPEN,  # type: ignore[union-attr]
            timeout=ROUND_DEADLINE + 4 * STEP_SECONDS + 30,
            what="the secure round to close",
        )
        record = operator.round("t", 1)
        assert record is not None and record.state is RoundState.COMPLETED, record.reason

        # The published adapter is the old one plus the mean of the survivors' deltas (the
        # liar's too: only its shares were wrong), within the quantization error: exactly
        # what the round gives without the attack.
        new_state = daemon.rounds.current["t"].state()
        spec = devices[liar].assignment.spec.secure_aggregation  # type: ignore[union-attr]
        quantization = quantization_of(spec)  # type: ignore[arg-type]
        tolerance = quantization_error_bound(quantization, len(survivors)) / len(survivors)
        for key, tensor in reference.items():
            expected = tensor + sum(deltas[name][key] for name in survivors) / len(survivors)
            assert torch.allclose(new_state[key], expected, atol=tolerance + 1e-6), key
        assert f"summed {len(survivors)} masked inputs, {not_delivered} dropped" in record.reason
        assert f"outvoted: {liar}" in record.reason

        assert daemon.rejected["secagg-bad-share"] == 1
        wait_until(  # the daemon writes refusal counts about once a second
            lambda: operator.rejection_counts().get("secagg-bad-share") == 1,
            what="the liar's refusal row",
        )
        rows = [row for row in operator.refusals(20) if row.category == "secagg-bad-share"]
        assert [row.device_id for row in rows] == [liar]
        assert f"{liar!r} revealed wrong shares" in rows[0].last_reason
    finally:
        _stop(daemon, loop)
        for device in devices.values():
            device.device.close()
        operator.close()
