"""Properties of the cost model: monotonicity, memory fit, quantized footprint, speed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_profiles.calibration import Observation, fit_calibration, nonnegative_least_squares
from device_profiles.cost_model import activation_factor, predict
from device_profiles.errors import ProfileError
from device_profiles.plan import KNOWN_SCHEMES, TrainingPlan
from device_profiles.profile import Calibration, DeviceProfile, find_profile
from device_profiles.shapes import KNOWN_SHAPES, ModelShape
from device_profiles.step_counts import activations_are_mapped, adapter_parameter_count, count_step
from device_profiles.transfer import UPLOAD_BYTES_PER_PARAM, adapter_bytes

SHAPES = [KNOWN_SHAPES[name] for name in ("minilm-l6", "smollm2-135m", "llama-1.1b")]


@pytest.fixture(scope="module")
def pi4() -> DeviceProfile:
    return find_profile("raspberry-pi-4-4gb")


def _big(profile: DeviceProfile) -> DeviceProfile:
    """The same device with 1 TB of RAM: everything fits."""
    hardware = dataclasses.replace(profile.hardware, ram_bytes=1 << 40)
    return dataclasses.replace(profile, hardware=hardware)


plans = st.builds(
    TrainingPlan,
    scheme=st.sampled_from(["none", "int8", "nf4"]),
    rank=st.integers(1, 64),
    batch_size=st.integers(1, 16),
    seq_len=st.integers(8, 1024),
    local_steps=st.integers(1, 100),
)


@pytest.mark.parametrize("field_name", ["batch_size", "seq_len", "rank"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@settings(max_examples=40, deadline=None)
@given(plan=plans)
def test_step_time_and_memory_grow_with_batch_seq_rank(
    pi4: DeviceProfile, shape: ModelShape, field_name: str, plan: TrainingPlan
) -> None:
    bigger = dataclasses.replace(plan, **{field_name: getattr(plan, field_name) * 2})
    small, large = predict(pi4, shape, plan), predict(pi4, shape, bigger)
    assert large.step_seconds > small.step_seconds
    if activations_are_mapped(shape, plan) == activations_are_mapped(shape, bigger):
        assert large.peak_bytes > small.peak_bytes  # (across the mmap threshold: next test)
    assert large.round_seconds > small.round_seconds


def test_a_decoders_heap_slack_ends_where_its_activations_become_mappings(
    pi4: DeviceProfile,
) -> None:
    """Measured (RESULTS.md, issue 19): SmolLM2 at 4 x 128 trains in about its counted
    activations, while the calibration grid's smaller passes carry the fitted heap slack."""
    from device_profiles.step_counts import AGENT_MMAP_THRESHOLD_BYTES, BYTES_FP32

    shape = KNOWN_SHAPES["smollm2-135m"]
    tokens_at_threshold = AGENT_MMAP_THRESHOLD_BYTES / (BYTES_FP32 * shape.hidden)  # 455
    below = TrainingPlan(scheme="nf4", batch_size=1, seq_len=int(tokens_at_threshold))
    above = dataclasses.replace(below, seq_len=int(tokens_at_threshold) + 1)
    assert not activations_are_mapped(shape, below) and activations_are_mapped(shape, above)
    counts_below, counts_above = count_step(shape, below), count_step(shape, above)
    # Below: only the loss chunk's logits and the dequantized weight (tensors of MiBs) are
    # mappings; above, every activation is.
    assert 0 < counts_below.mapped_activation_bytes < counts_below.activation_bytes
    assert counts_above.activation_bytes == 0
    slack = activation_factor(pi4.calibration, "decoder") - 1
    drop = predict(pi4, shape, below).peak_bytes - predict(pi4, shape, above).peak_bytes
    grown = counts_above.all_activation_bytes - counts_below.all_activation_bytes
    assert drop == pytest.approx(slack * counts_below.activation_bytes - grown, rel=1e-6)
    # micro-batches cross back: the pass is what is allocated at once
    halves = dataclasses.replace(above, batch_size=2, micro_batch_size=1)
    assert activations_are_mapped(shape, halves)
    assert not activations_are_mapped(shape, dataclasses.replace(halves, seq_len=200))
    # encoders keep the factor everywhere (no encoder point beyond the threshold measured)
    minilm = KNOWN_SHAPES["minilm-l6"]
    assert not activations_are_mapped(minilm, dataclasses.replace(below, batch_size=64))


@settings(max_examples=40, deadline=None)
@given(plan=plans)
def test_round_time_grows_with_steps_and_step_time_does_not(
    pi4: DeviceProfile, plan: TrainingPlan
) -> None:
    shape = KNOWN_SHAPES["smollm2-135m"]
    more = dataclasses.replace(plan, local_steps=plan.local_steps + 1)
    a, b = predict(pi4, shape, plan), predict(pi4, shape, more)
    assert b.round_seconds > a.round_seconds
    assert b.step_seconds == a.step_seconds
    assert b.round_seconds == pytest.approx(
        b.download_seconds + b.compute_seconds + b.upload_seconds
    )
    assert b.compute_seconds == pytest.approx(more.local_steps * b.step_seconds)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_quantized_footprint_below_full_precision(pi4: DeviceProfile, shape: ModelShape) -> None:
    peaks = {
        scheme: predict(_big(pi4), shape, TrainingPlan(scheme=scheme)).peak_bytes
        for scheme in ("none", "int8", "nf4")
    }
    assert peaks["nf4"] < peaks["int8"]
    # Under the agent's allocator even MiniLM's int8 saves memory (measured 726 vs 739 MB at
    # 4 x 128, 569 vs 620 MB at 1 x 128): only its small layers' dequantized copies stay in
    # the heap. (With glibc's default threshold they ate the saving: RESULTS.md, issue 5.)
    assert peaks["int8"] < peaks["none"]
    weights = {
        scheme: count_step(shape, TrainingPlan(scheme=scheme)).weight_bytes
        for scheme in ("none", "int8", "nf4")
    }
    block = shape.block_linear_parameters()
    # int8 saves ~3 bytes and nf4 ~3.44 bytes per block weight against fp32, and both store the
    # frozen vocabulary matrices as int8 rows (3 bytes per weight saved, 4 per row spent).
    vocabulary = shape.vocab * shape.vocabulary_matrices()
    vocabulary_saved = 3 * vocabulary * shape.hidden - 4 * vocabulary
    assert weights["none"] - weights["int8"] == pytest.approx(
        3 * block + vocabulary_saved, rel=0.02
    )
    assert weights["none"] - weights["nf4"] == pytest.approx(
        (4 - 4.5 / 8) * block + vocabulary_saved, rel=0.02
    )


def test_memory_fit_logic(pi4: DeviceProfile) -> None:
    llama = KNOWN_SHAPES["llama-1.1b"]
    full = predict(pi4, llama, TrainingPlan(scheme="none", batch_size=1, seq_len=128))
    assert not full.fits
    assert "GiB usable" in full.reason and "needs" in full.reason
    assert full.peak_bytes > pi4.usable_ram_bytes / 1.15
    small = predict(pi4, KNOWN_SHAPES["minilm-l6"], TrainingPlan(batch_size=1, seq_len=64))
    assert small.fits and small.reason == ""
    # Exactly at the margin: a device with usable RAM = peak x 1.15 fits, one byte less not.
    needed = int(small.peak_bytes * 1.15) + 2
    for ram, expected in ((needed, True), (needed - 1024, False)):
        hardware = dataclasses.replace(pi4.hardware, ram_bytes=ram, os_reserved_bytes=0)
        verdict = predict(
            dataclasses.replace(pi4, hardware=hardware),
            KNOWN_SHAPES["minilm-l6"],
            TrainingPlan(batch_size=1, seq_len=64),
        )
        assert verdict.fits is expected
    bnb = predict(pi4, KNOWN_SHAPES["minilm-l6"], TrainingPlan(scheme="bnb-nf4"))
    assert not bnb.fits and "bnb-nf4 is not usable" in bnb.reason


def test_round_time_uses_profile_bandwidth(pi4: DeviceProfile) -> None:
    shape, plan = KNOWN_SHAPES["smollm2-135m"], TrainingPlan(rank=16)
    fast = dataclasses.replace(
        pi4, network=dataclasses.replace(pi4.network, down_mbps=200.0, up_mbps=60.0)
    )
    slow_prediction, fast_prediction = predict(pi4, shape, plan), predict(fast, shape, plan)
    assert fast_prediction.download_seconds < slow_prediction.download_seconds
    assert fast_prediction.upload_seconds < slow_prediction.upload_seconds
    explicit = predict(pi4, shape, plan, download_bytes=10e6, upload_bytes=0)
    assert explicit.download_seconds == pytest.approx(10e6 * 8 / 20e6 + 0.06)


def test_adapter_bytes() -> None:
    shape = KNOWN_SHAPES["smollm2-135m"]
    # q (576->576) and v (576->192) at rank 8 in 30 layers.
    assert adapter_parameter_count(shape, 8) == 30 * 8 * ((576 + 576) + (576 + 192))
    assert adapter_bytes(shape, 16) - adapter_bytes(shape, 8) == 4 * 30 * 8 * (1152 + 768)
    assert adapter_bytes(shape, 8, bytes_per_param=UPLOAD_BYTES_PER_PARAM) < adapter_bytes(shape, 8)


def test_gpu_profile_uses_gpu_rate() -> None:
    """A profile that says `cuda` is priced for the GPU path (issue 18: the shipped Orin
    does); the same device with `none` is priced for its CPU. tests/test_cost_model_gpu.py
    checks the GPU path's terms."""
    orin = find_profile("jetson-orin-nano-8gb")
    assert orin.hardware.accelerator == "cuda"
    cpu_only = dataclasses.replace(
        orin, hardware=dataclasses.replace(orin.hardware, accelerator="none")
    )
    shape, plan = KNOWN_SHAPES["smollm2-135m"], TrainingPlan()
    assert predict(orin, shape, plan).step_seconds < predict(cpu_only, shape, plan).step_seconds


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"rank": 0}, "rank"),
        ({"batch_size": -1}, "batch_size"),
        ({"seq_len": 1.5}, "seq_len"),
        ({"local_steps": 0}, "local_steps"),
        ({"scheme": "fp8"}, "scheme"),
        ({"target_modules": ("q", "lm_head")}, "target_modules"),
    ],
)
def test_training_plan_rejects_bad_values(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ProfileError, match=f"TrainingPlan.{field_name}"):
        TrainingPlan(**kwargs)


def test_nnls_matches_known_solution() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.random((30, 4))
    truth = np.array([2.0, 0.0, 0.5, 1.0])
    solution = nonnegative_least_squares(matrix, matrix @ truth)
    assert solution == pytest.approx(truth, abs=1e-8)
    assert (nonnegative_least_squares(matrix, -matrix @ truth) >= 0).all()


def test_calibration_recovers_a_known_machine(pi4: DeviceProfile) -> None:
    truth = dataclasses.replace(
        pi4,
        calibration=Calibration(
            flop_efficiency=0.6,
            memory_efficiency=0.3,
            per_layer_seconds=0.001,
            fixed_seconds=0.02,
            dequant_int8=1.0,
            dequant_nf4=6.0,
            activation_factor_encoder=3.3,
            activation_factor_decoder=1.3,
            dequant_memory_fraction=0.4,
            memory_overhead_bytes=80e6,
        ),
    )
    observations = []
    for shape in SHAPES[:2]:
        for scheme in ("none", "int8", "nf4"):
            for batch, seq in ((1, 32), (2, 128), (4, 64), (8, 256)):
                plan = TrainingPlan(scheme=scheme, batch_size=batch, seq_len=seq)
                prediction = predict(_big(truth), shape, plan)
                observations.append(
                    Observation(shape, plan, prediction.step_seconds, prediction.peak_bytes)
                )
    fitted = dataclasses.replace(truth, calibration=fit_calibration(pi4, observations))
    for shape in SHAPES:
        plan = TrainingPlan(scheme="nf4", batch_size=3, seq_len=100, rank=12)
        expected, got = predict(_big(truth), shape, plan), predict(_big(fitted), shape, plan)
        assert got.step_seconds == pytest.approx(expected.step_seconds, rel=0.05)
        assert got.peak_bytes == pytest.approx(expected.peak_bytes, rel=0.05)


def test_known_schemes_match_quantization_package() -> None:
    from quantization.schemes import Scheme

    assert set(KNOWN_SCHEMES) == {scheme.value for scheme in Scheme}


def test_the_head_transient_is_the_trainers_chunk_not_the_whole_batch() -> None:
    """The trainer's causal-LM loss holds one chunk of logits at a time, so more examples add
    their block activations and hidden states, never batch x sequence x vocab logits."""
    from device_profiles.step_counts import (
        BYTES_FP32,
        LOSS_CHUNK_POSITIONS,
        _activation_elements_per_token,
    )
    from quantization.causal_lm_loss import DEFAULT_CHUNK_POSITIONS

    assert LOSS_CHUNK_POSITIONS == DEFAULT_CHUNK_POSITIONS
    shape = KNOWN_SHAPES["smollm2-135m"]
    one = TrainingPlan(scheme="nf4", batch_size=1, seq_len=LOSS_CHUNK_POSITIONS)
    eight = dataclasses.replace(one, batch_size=8)
    growth = (
        count_step(shape, eight).all_activation_bytes - count_step(shape, one).all_activation_bytes
    )
    extra_tokens = 7 * LOSS_CHUNK_POSITIONS
    per_token = _activation_elements_per_token(shape, one) * shape.layers + 2 * shape.hidden
    assert growth == pytest.approx(BYTES_FP32 * per_token * extra_tokens)
    # Full-size logits, log-softmax and gradient for those tokens would have been more again:
    assert 3 * BYTES_FP32 * shape.vocab * extra_tokens > 0.5 * growth


def test_the_heap_workspace_is_the_layers_below_the_agents_mmap_threshold() -> None:
    """Under the agent's allocator a dequantized copy of 1 MiB or more is its own mapping,
    returned to the OS when freed: only smaller layers leave a share in glibc's heap."""
    from device_profiles.step_counts import AGENT_MMAP_THRESHOLD_BYTES, BYTES_FP32
    from quantization.allocator import TRAINING_MMAP_THRESHOLD_BYTES

    assert AGENT_MMAP_THRESHOLD_BYTES == TRAINING_MMAP_THRESHOLD_BYTES
    smollm2 = KNOWN_SHAPES["smollm2-135m"]  # hidden 576, 3 KV heads of 64: k, v are 442 kB
    counts = count_step(smollm2, TrainingPlan(scheme="nf4"))
    small = {role for role, (i, o) in smollm2.linear_shapes().items() if 4 * i * o < 2**20}
    assert small == {"k", "v"}
    k_in, k_out = smollm2.linear_shapes()["k"]
    assert counts.heap_dequant_workspace_bytes == BYTES_FP32 * 2 * k_in * k_out * smollm2.layers
    assert counts.dequant_workspace_bytes == BYTES_FP32 * smollm2.block_linear_parameters()
    assert count_step(smollm2, TrainingPlan(scheme="none")).heap_dequant_workspace_bytes == 0
