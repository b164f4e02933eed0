"""The trainer's device back-end (issue 18), on the CPU through the code path a GPU takes.

This machine has no GPU, so the CUDA device itself is stood in for in two ways, and says so:
`resolve_compute_device` gets a stand-in for "torch finds a GPU", and the trainer runs with
a CPU `ComputeDevice` whose compute dtype is bf16, which exercises autocast, the quantized
layers' half-precision path, fp32 master weights and CPU fp32 updates exactly as on a GPU.
Tests marked `gpu` run the real CUDA path and are skipped where torch has no CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from device_profiles.plan import TrainingPlan
from edge_runtime.agent_config import AgentConfigError, AgentSettings
from edge_runtime.eligibility import DeviceReadings, EligibilityPolicy, check_eligibility
from edge_runtime.trainer import LocalTrainer
from quantization.adapters import AdapterConfig
from quantization.compute_device import (
    CPU,
    ComputeDevice,
    ComputeDeviceError,
    cuda_unavailable_reason,
    free_memory_bytes,
    gpu_temperature,
    resolve_compute_device,
)
from quantization.qlinear import Int8Linear, NF4Linear
from quantization.task_data import LabelledText
from quantization.task_model import TaskModelSpec

CPU_BF16 = ComputeDevice(torch.device("cpu"), torch.bfloat16, "cpu under bf16 autocast")
"""Stands in for a GPU's compute path: autocast to bf16, fp32 master weights."""

has_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- choosing the device ----------------------------------------------------------------------


def test_auto_takes_the_gpu_only_when_torch_can_use_one() -> None:
    fake_gpu = ComputeDevice(torch.device("cuda", 0), torch.bfloat16, "Orin (stand-in)", True)
    assert (
        resolve_compute_device(
            "auto", unavailable_reason=lambda: None, cuda_device=lambda: fake_gpu
        )
        is fake_gpu
    )
    assert resolve_compute_device("auto", unavailable_reason=lambda: "no GPU") is CPU
    assert resolve_compute_device("cpu", unavailable_reason=lambda: None) is CPU


def test_cuda_without_a_gpu_is_refused_with_the_reason() -> None:
    with pytest.raises(ComputeDeviceError, match='device = "cuda" but no GPU here'):
        resolve_compute_device("cuda", unavailable_reason=lambda: "no GPU here")
    with pytest.raises(ComputeDeviceError, match="must be one of auto, cpu, cuda"):
        resolve_compute_device("gpu")
    with pytest.raises(AgentConfigError, match=r"\[agent\] device must be one of"):
        AgentSettings("fleet", "pi-1", "north", "/tmp/s", "/tmp/d", device="tpu")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only build's answer")
def test_cpu_only_torch_says_what_to_install() -> None:
    reason = cuda_unavailable_reason()
    assert reason is not None and "CPU-only build" in reason
    assert resolve_compute_device("auto") is CPU
    assert free_memory_bytes(CPU) > 0


# -- quantized layers under autocast ----------------------------------------------------------


@pytest.mark.parametrize("layer_class", [NF4Linear, Int8Linear], ids=["nf4", "int8"])
def test_quantized_linear_computes_in_the_autocast_dtype(layer_class: type) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator) * 0.05
    layer = layer_class.from_weight(weight, torch.randn(96, generator=generator) * 0.01)
    x = torch.randn(4, 128, generator=generator, requires_grad=True)
    reference = layer(x)
    with CPU_BF16.autocast():
        half = layer(x)
    assert half.dtype is torch.bfloat16 and reference.dtype is torch.float32
    relative = (half.float() - reference).norm() / reference.norm()
    assert relative < 2e-2, relative
    half.float().sum().backward()
    assert x.grad is not None and x.grad.dtype is torch.float32  # grads keep the input's dtype
    assert torch.isfinite(x.grad).all()


# -- the trainer on a device ------------------------------------------------------------------


EXAMPLES = [
    LabelledText(f"question about {w} number {i}", w) for i in range(12) for w in ("maths", "art")
]


def _trainer(folder: Path, device: ComputeDevice, scheme: str = "nf4") -> LocalTrainer:
    spec = TaskModelSpec(
        "subjects", "classification", str(folder), scheme, AdapterConfig(rank=4), ("art", "maths")
    )
    return LocalTrainer(spec, EXAMPLES, seed=0, device=device)


PLAN = TrainingPlan(scheme="nf4", local_steps=8, batch_size=8, seq_len=16, learning_rate=2e-2)


def _frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().cpu().clone()
        for name, tensor in model.state_dict().items()
        if "lora_" not in name and "modules_to_save" not in name
    }


def _assert_trains_like_a_cpu(folder: Path, device: ComputeDevice) -> None:
    reference = _trainer(folder, CPU)
    trainer = _trainer(folder, device)
    start = reference.adapter_state()
    frozen = _frozen_state(trainer.model)
    expected = reference.train_round(start, PLAN, round_seed=3)
    result = trainer.train_round(start, PLAN, round_seed=3)
    assert result.num_steps == PLAN.local_steps and result.last_loss < result.first_loss
    # The update leaves the device as the CPU's does: same names, fp32, on the CPU.
    assert set(result.delta) == set(expected.delta)
    for name, tensor in result.delta.items():
        assert tensor.device.type == "cpu" and tensor.dtype is torch.float32, name
    # The adapter weights the optimizer updates stay fp32 on the device.
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype is torch.float32 for p in trainable)
    assert all(p.device.type == device.torch_device.type for p in trainable)
    # Same first loss up to half-precision rounding; the frozen base never changes.
    assert abs(result.first_loss - expected.first_loss) < 0.05 * abs(expected.first_loss) + 1e-3
    after = _frozen_state(trainer.model)
    assert all(torch.equal(after[name], frozen[name]) for name in frozen)


def test_trainer_on_the_autocast_path_matches_the_cpu(tiny_bert_folder: Path) -> None:
    _assert_trains_like_a_cpu(tiny_bert_folder, CPU_BF16)


@has_cuda
@pytest.mark.gpu
def test_trainer_on_cuda_matches_the_cpu(tiny_bert_folder: Path) -> None:
    from quantization.compute_device import cuda_compute_device

    _assert_trains_like_a_cpu(tiny_bert_folder, cuda_compute_device())


# -- eligibility on a GPU ---------------------------------------------------------------------


def _readings(**gpu: object) -> DeviceReadings:
    import datetime as dt

    return DeviceReadings(
        on_mains=True,
        battery_percent=None,
        cpu_percent=5.0,
        available_memory_bytes=8 * 2**30,
        temperature_celsius=40.0,
        local_time=dt.datetime(2026, 12, 2, 17, 0),
        **gpu,  # type: ignore[arg-type]
    )


def test_gpu_memory_and_temperature_decide_eligibility() -> None:
    policy = EligibilityPolicy(max_temperature_celsius=80.0, memory_margin_bytes=0)
    ok = check_eligibility(policy, _readings(gpu_free_memory_bytes=4 * 2**30), 2**30, 2**30)
    assert ok.eligible, ok.reasons
    short = check_eligibility(policy, _readings(gpu_free_memory_bytes=2**29), 2**30, 2**30)
    assert not short.eligible and "free GPU memory 512 MiB" in short.reasons[0]
    hot = check_eligibility(policy, _readings(gpu_temperature_celsius=91.0))
    assert not hot.eligible and "GPU temperature 91 C" in hot.reasons[0]
    # A Jetson (unified memory) reports no separate GPU memory: only RAM is checked.
    assert check_eligibility(policy, _readings(), 2**30, 64 * 2**30).eligible


def test_gpu_temperature_from_a_jetson_thermal_zone(tmp_path: Path) -> None:
    for index, (kind, millidegrees) in enumerate([("CPU-therm", 51000), ("GPU-therm", 47500)]):
        zone = tmp_path / f"thermal_zone{index}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(f"{millidegrees}\n")
    reading = gpu_temperature(tmp_path)
    assert reading.celsius == 47.5 and "GPU-therm" in reading.source
    empty = tmp_path / "none"
    empty.mkdir()
    if not torch.cuda.is_available():
        missing = gpu_temperature(empty)
        assert missing.celsius is None and "no GPU thermal zone" in missing.source


# -- bitsandbytes: imported only when asked for, and a base that stays fixed ----------------------


def test_bitsandbytes_is_imported_only_for_a_bnb_scheme() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, torch; from torch import nn; from quantization.schemes import quantize_model; "
        "quantize_model(nn.Sequential(nn.Linear(64, 64)), '{scheme}'); "
        "print('bitsandbytes' in sys.modules)"
    )
    answers = {}
    for scheme in ("nf4", "bnb-nf4"):
        done = subprocess.run(
            [sys.executable, "-c", probe.format(scheme=scheme)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert done.returncode == 0, done.stderr[-2000:]
        answers[scheme] = done.stdout.strip().splitlines()[-1]
    assert answers == {"nf4": "False", "bnb-nf4": "True"}


def test_bnb_nf4_base_survives_evaluation_unchanged() -> None:
    """bitsandbytes repacks NF4 weights for AVX512-BF16 CPUs on the first eval forward, and
    `state_dict()` undid it lossily; our layers opt out (quantization/bnb_backend.py)."""
    from quantization.bnb_backend import bnb_unavailable_reason, make_bnb_linear

    assert bnb_unavailable_reason("nf4", "cpu") is None  # CI installs the bnb extra
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    layer = make_bnb_linear(weight, None, "nf4", torch.device("cpu")).eval()
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with torch.no_grad():
        first = layer(torch.ones(2, 128))
        second = layer(torch.ones(2, 128))
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(first, second)
