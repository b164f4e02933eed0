"""Secure aggregation end to end in-process: sums, masking quality, drop-outs, refusals, wire."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from edge_runtime import secagg
from edge_runtime.secagg import (
    PRIME,
    SECAGG_MESSAGE_CLASSES,
    SHARE_BOX_PURPOSE,
    AdvertiseKeys,
    MaskedInput,
    QuantizationConfig,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggRefusal,
    SecAggServer,
    ShareKeys,
    TensorLayout,
    UnmaskRequest,
    UnmaskResponse,
    agree_seed,
    dequantize_sum,
    expand_seed,
    open_share_box,
    quantization_error_bound,
    quantize_delta,
    reconstruct_secret,
    ring_vector_from_bytes,
    run_round_in_process,
    share_box_aad,
    split_secret,
)
from edge_runtime.wire import SchemaError

DEVICES = tuple(f"school-{index}" for index in range(5))
QUANTIZATION = QuantizationConfig(clip_bound=8.0)  # randn never reaches 8 sigma here


def lora_delta(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoRA-sized delta: A (8x384), B (384x8) and a head (8x384), 9216 coordinates."""
    return {
        "layer0.lora_A": torch.randn(8, 384, generator=generator),
        "layer0.lora_B": torch.randn(384, 8, generator=generator),
        "head.weight": torch.randn(8, 384, generator=generator),
    }


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    return {device_id: lora_delta(generator) for device_id in DEVICES}


def plain_sum(inputs: dict, devices: tuple[str, ...]) -> dict[str, torch.Tensor]:
    names = inputs[devices[0]]
    return {name: sum(inputs[d][name].double() for d in devices) for name in names}


def max_abs_error(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max((result[name].double() - expected[name]).abs().max().item() for name in expected)


def assert_sum_within_bound(result: secagg.SecAggResult, inputs: dict) -> None:
    expected = plain_sum(inputs, result.contributors)
    bound = quantization_error_bound(QUANTIZATION, result.num_inputs)
    float32_rounding = 50 * 2.0**-24  # |sum| < 50: the float32 output's own rounding
    assert max_abs_error(result.total, expected) <= bound + float32_rounding


def setup_round(
    inputs: dict, threshold: int = 3
) -> tuple[SecAggServer, dict[str, SecAggClient], dict[str, MaskedInput]]:
    """Steps 0-2 by hand: advertise, share, mask (nothing delivered to the server yet)."""
    layout = TensorLayout.of(inputs[DEVICES[0]])
    config = SecAggConfig(threshold, QUANTIZATION)
    server = SecAggServer("round-7", config, layout)
    clients = {d: SecAggClient(d, "round-7", config, layout) for d in DEVICES}
    roster = server.collect_advertisements([c.advertise_keys() for c in clients.values()])
    routed = server.route_shares([c.share_keys(roster) for c in clients.values()])
    for device_id, forwarded in routed.items():
        clients[device_id].receive_shares(forwarded)
    masked = {d: c.mask_input(inputs[d]) for d, c in clients.items()}
    return server, clients, masked


@pytest.mark.parametrize("stochastic_rounding", [True, False])
def test_unmasked_sum_equals_plain_sum_within_quantization_bound(inputs, stochastic_rounding):
    quantization = QuantizationConfig(clip_bound=8.0, stochastic_rounding=stochastic_rounding)
    result = run_round_in_process(inputs, threshold=3, quantization=quantization)
    assert result.contributors == DEVICES and result.dropped == ()
    expected = plain_sum(inputs, DEVICES)
    bound = quantization_error_bound(quantization, 5) + 50 * 2.0**-24
    assert max_abs_error(result.total, expected) <= bound
    assert {name: t.shape for name, t in result.total.items()} == {
        name: t.shape for name, t in inputs[DEVICES[0]].items()
    }


@pytest.mark.parametrize("dropped", [(DEVICES[2],), (DEVICES[0], DEVICES[4])], ids=["one", "two"])
def test_dropping_after_masking_still_recovers_the_survivors_sum(inputs, dropped):
    result = run_round_in_process(
        inputs, threshold=3, quantization=QUANTIZATION, drop_after_masking=dropped
    )
    assert result.dropped == tuple(sorted(dropped))
    assert set(result.contributors) == set(DEVICES) - set(dropped)
    assert_sum_within_bound(result, inputs)


def test_silence_at_unmasking_keeps_the_input_in_the_sum(inputs):
    result = run_round_in_process(
        inputs,
        threshold=3,
        quantization=QUANTIZATION,
        drop_before_unmasking=(DEVICES[1], DEVICES[3]),
    )
    assert result.contributors == DEVICES
    assert_sum_within_bound(result, inputs)


def test_three_dropping_after_masking_aborts_before_any_unmasking(inputs):
    layout = TensorLayout.of(inputs[DEVICES[0]])
    server = SecAggServer("round-1", SecAggConfig(3, QUANTIZATION), layout)
    with pytest.raises(SecAggAbort, match="only 2 of 5 devices sent masked inputs; threshold is 3"):
        run_round_in_process(
            inputs,
            threshold=3,
            quantization=QUANTIZATION,
            drop_after_masking=DEVICES[:3],
            server=server,
        )
    assert server.request is None  # no shares were ever asked for
    assert_holds_only_masked_vectors(server, inputs)


def test_three_silent_at_unmasking_aborts_without_output(inputs):
    layout = TensorLayout.of(inputs[DEVICES[0]])
    server = SecAggServer("round-1", SecAggConfig(3, QUANTIZATION), layout)
    with pytest.raises(SecAggAbort, match="only 2 of 5 devices answered the unmask request"):
        run_round_in_process(
            inputs,
            threshold=3,
            quantization=QUANTIZATION,
            drop_before_unmasking=DEVICES[2:],
            server=server,
        )
    assert_holds_only_masked_vectors(server, inputs)


def assert_holds_only_masked_vectors(server: SecAggServer, inputs: dict) -> None:
    """Everything vector-shaped the server holds is uncorrelated with every true input."""
    held = [name for name, value in vars(server).items() if isinstance(value, torch.Tensor)]
    assert held == []  # no sum, no partially unmasked vector
    for device_id, vector in server.masked_inputs.items():
        codes = quantize_delta(inputs[device_id], server.layout, QUANTIZATION).double()
        correlation = np.corrcoef(vector.double().numpy(), codes.numpy())[0, 1]
        assert abs(correlation) < 0.05


def test_a_single_masked_input_looks_like_uniform_noise(inputs, monkeypatch):
    # Fixed keys and seeds (instead of OS randomness) make the p-values reproducible.
    rng = random.Random(7)
    monkeypatch.setattr("edge_runtime.secagg.client.new_seed", lambda: rng.randbytes(32))
    monkeypatch.setattr(
        "edge_runtime.secagg.client.generate_key_pair",
        lambda: X25519PrivateKey.from_private_bytes(rng.randbytes(32)),
    )
    _, _, masked = setup_round(inputs)
    words = ring_vector_from_bytes(masked[DEVICES[0]].vector, 32).double().numpy()  # (9216,)
    layout = TensorLayout.of(inputs[DEVICES[0]])
    true_update = torch.cat([inputs[DEVICES[0]][n].reshape(-1) for n, _ in layout.entries])
    correlation = np.corrcoef(words, true_update.double().numpy())[0, 1]
    assert abs(correlation) < 0.05
    ks = stats.kstest(words / 2.0**32, "uniform")
    counts = np.bincount((words // 2**24).astype(np.int64), minlength=256)  # top byte
    chi_square = stats.chisquare(counts)
    assert ks.pvalue > 0.01 and chi_square.pvalue > 0.01
    plain_codes = quantize_delta(inputs[DEVICES[0]], layout, QUANTIZATION).double().numpy()
    assert stats.kstest(plain_codes / 2.0**32, "uniform").pvalue < 1e-6  # the test has power


def test_client_never_reveals_both_share_kinds_of_one_device(inputs):
    server, clients, masked = setup_round(inputs)
    request = server.collect_masked_inputs([masked[d] for d in DEVICES if d != DEVICES[4]])
    assert request.dropped == (DEVICES[4],)
    response = clients[DEVICES[0]].unmask(request)
    assert set(response.mask_key_shares) == {DEVICES[4]}
    swapped = UnmaskRequest("round-7", tuple(sorted(DEVICES[1:])), (DEVICES[0],))
    with pytest.raises(SecAggRefusal):  # this device is no survivor in the swapped request
        clients[DEVICES[0]].unmask(swapped)
    swapped = UnmaskRequest("round-7", DEVICES[:2] + DEVICES[3:], (DEVICES[2],))
    with pytest.raises(SecAggRefusal, match="both a self-mask share and a mask-key share"):
        clients[DEVICES[0]].unmask(swapped)  # asks b of school-4 after its s-key share
    with pytest.raises(SecAggRefusal, match="split exactly"):
        clients[DEVICES[1]].unmask(UnmaskRequest("round-7", DEVICES[:4], ()))
    with pytest.raises(SchemaError, match="both survivor and dropped"):
        UnmaskRequest("round-7", DEVICES, (DEVICES[0],))
    with pytest.raises(SchemaError, match="both share kinds"):
        UnmaskResponse("round-7", DEVICES[0], {DEVICES[1]: bytes(33)}, {DEVICES[1]: bytes(33)})


def test_relay_cannot_open_share_boxes(inputs):
    layout = TensorLayout.of(inputs[DEVICES[0]])
    config = SecAggConfig(3, QUANTIZATION)
    clients = [SecAggClient(d, "round-7", config, layout) for d in DEVICES]
    roster = tuple(c.advertise_keys() for c in clients)
    message = clients[0].share_keys(roster)
    box = message.encrypted_shares[DEVICES[1]]
    relay_key = X25519PrivateKey.generate()  # the coordinator's own key: not in the agreement
    wrong_key = agree_seed(
        relay_key, roster[0].cipher_public_key, SHARE_BOX_PURPOSE, "round-7", DEVICES[:2]
    )
    aad = share_box_aad("round-7", DEVICES[0], DEVICES[1])
    with pytest.raises(InvalidTag):
        open_share_box(wrong_key, box, aad)
    # Redirecting the box to another recipient fails too, even for a device that can agree.
    clients[2].share_keys(roster)
    with pytest.raises(InvalidTag):
        clients[2].receive_shares([ShareKeys("round-7", DEVICES[0], {DEVICES[2]: box})])


def test_messages_round_trip_through_json(inputs):
    server, clients, masked = setup_round(inputs)
    request = server.collect_masked_inputs(list(masked.values()))
    messages = [
        clients[DEVICES[0]].advertise_keys(),
        clients[DEVICES[0]].share_keys(tuple(server.roster.values())),
        masked[DEVICES[0]],
        request,
        clients[DEVICES[0]].unmask(request),
    ]
    for message in messages:
        text = json.dumps(message.to_dict())
        decoded = SECAGG_MESSAGE_CLASSES[json.loads(text)["kind"]].from_dict(json.loads(text))
        assert decoded == message
    advert = messages[0].to_dict()
    with pytest.raises(SchemaError, match="expected kind"):
        MaskedInput.from_dict(advert)
    with pytest.raises(SchemaError, match="not valid base64"):
        AdvertiseKeys.from_dict({**advert, "mask_public_key": "@@@"})
    with pytest.raises(SchemaError, match="must be 32 bytes"):
        AdvertiseKeys.from_dict({**advert, "mask_public_key": "AAAA"})
    with pytest.raises(SchemaError, match="unknown fields"):
        AdvertiseKeys.from_dict({**advert, "extra": 1})
    with pytest.raises(SchemaError, match="expected version"):
        AdvertiseKeys.from_dict({**advert, "version": 2})


def test_shamir_reconstructs_from_any_threshold_subset_only():
    secret = random.Random(3).getrandbits(256)
    shares = split_secret(secret, 3, [1, 2, 3, 4, 5])
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5, 4]):
        assert reconstruct_secret({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(ValueError, match="need 3 shares"):
        reconstruct_secret({1: shares[1], 2: shares[2]}, 3)
    assert reconstruct_secret({1: shares[1], 2: shares[2]}, 2) != secret
    assert all(pow(a, PRIME - 1, PRIME) == 1 for a in (2, 3, 5, 7, 11, 13))  # Fermat: prime


def test_prg_is_deterministic_and_reduced_into_the_ring():
    seed = bytes(range(32))
    assert torch.equal(expand_seed(seed, 1000, 32), expand_seed(seed, 1000, 32))
    assert not torch.equal(expand_seed(seed, 1000, 32), expand_seed(bytes(32), 1000, 32))
    small = expand_seed(seed, 1000, 12)
    assert int(small.max()) < 2**12 and int(small.min()) >= 0


def test_quantization_wraps_the_ring_and_decodes_with_the_offset():
    config = QuantizationConfig(
        clip_bound=1.0, ring_bits=16, max_inputs=8, stochastic_rounding=False
    )
    layout = TensorLayout((("w", (4,)),))
    values = [torch.tensor([-1.0, -0.25, 0.5, 1.0]), torch.tensor([1.0, 0.3, -0.7, 3.0])]
    codes = [quantize_delta({"w": v}, layout, config) for v in values]
    ring_sum = (codes[0] + codes[1] + 2**16 * 5) % 2**16  # wraparound must not matter
    decoded = dequantize_sum(ring_sum, 2, layout, config)["w"]
    expected = values[0] + values[1].clamp(-1.0, 1.0)  # 3.0 is clipped to 1.0
    assert (decoded - expected).abs().max() <= quantization_error_bound(config, 2) + 1e-6
    with pytest.raises(SchemaError, match="max_inputs"):
        QuantizationConfig(ring_bits=8, max_inputs=1000)


def test_coordinator_ignores_masked_inputs_it_should_not_count(inputs, caplog):
    server, _, masked = setup_round(inputs)
    stranger = MaskedInput("round-7", "school-99", 32, 1, bytes(4))
    other_round = MaskedInput("round-8", DEVICES[1], 32, 1, bytes(4))
    with pytest.raises(SecAggAbort, match="only 1 of 5 devices sent masked inputs"):
        server.collect_masked_inputs([masked[DEVICES[0]], stranger, other_round])
    assert list(server.masked_inputs) == [DEVICES[0]]
    assert caplog.text.count("dropping masked input") == 2
    request = server.collect_masked_inputs([masked[d] for d in DEVICES[1:3]])
    assert request.survivors == DEVICES[:3] and request.dropped == DEVICES[3:]
