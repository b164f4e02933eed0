"""Update codec: exactness, error bounds, sizes, and every rejection."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as safetensors_save

from edge_runtime.wire import (
    CodecConfig,
    CodecError,
    LimitExceededError,
    ProtocolError,
    UpdateEncoding,
    decode_update,
    encode_update,
    tensor_shapes,
)


def lora_state(seed: int = 0, rank: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.0.q.lora_A.weight": torch.randn(rank, 64, generator=generator),
        "layer.0.q.lora_B.weight": torch.randn(96, rank, generator=generator) * 1e-3,
        "layer.0.bias_delta": torch.randn(96, generator=generator),
    }


CONFIGS = [
    CodecConfig(UpdateEncoding.FP32),
    CodecConfig(UpdateEncoding.INT8),
    CodecConfig(UpdateEncoding.FP32, top_k_fraction=0.1),
    CodecConfig(UpdateEncoding.INT8, top_k_fraction=0.1),
]


def test_fp32_is_exact() -> None:
    state = lora_state()
    encoded = encode_update(state, CONFIGS[0])
    decoded = decode_update(encoded.body, tensor_shapes(state))
    assert all(torch.equal(decoded[name], state[name]) for name in state)
    assert encoded.raw_bytes == sum(t.numel() * 4 for t in state.values())


def test_int8_error_is_bounded_per_group_and_near_quarter_size() -> None:
    state = lora_state(rank=8)
    state["big.lora_A.weight"] = torch.randn(8, 4096)
    state["big.lora_B.weight"] = torch.randn(4096, 8)
    encoded = encode_update(state, CONFIGS[1])
    decoded = decode_update(encoded.body, tensor_shapes(state))
    for name, tensor in state.items():
        matrix = tensor.reshape(tensor.shape[0] if tensor.dim() == 2 else 1, -1)
        per_column = matrix.shape[0] > matrix.shape[1]
        bound = matrix.abs().amax(dim=0 if per_column else 1, keepdim=True) / 254 + 1e-7
        error = (decoded[name] - tensor).reshape(matrix.shape).abs()
        assert bool((error <= bound).all()), name
    assert encoded.compression_ratio > 3.5


@pytest.mark.parametrize("config", CONFIGS[2:], ids=["fp32-topk", "int8-topk"])
def test_top_k_keeps_the_largest_entries(config: CodecConfig) -> None:
    state = lora_state()
    encoded = encode_update(state, config)
    decoded = decode_update(encoded.body, tensor_shapes(state))
    for name, tensor in state.items():
        kept = decoded[name] != 0
        k = max(1, -(-tensor.numel() // 10))
        assert int(kept.sum()) == k
        threshold = tensor.abs().flatten().kthvalue(tensor.numel() - k + 1).values
        assert bool((tensor.abs()[kept] >= threshold - 1e-6).all())
    assert encoded.encoded_bytes < encode_update(state, CONFIGS[1]).encoded_bytes


def test_non_finite_input_is_refused_at_encode() -> None:
    state = lora_state()
    state["layer.0.bias_delta"][3] = float("nan")
    with pytest.raises(CodecError, match="NaN/Inf"):
        encode_update(state, CONFIGS[1])


def test_wrong_names_and_shapes_are_refused() -> None:
    state = lora_state()
    body = encode_update(state, CONFIGS[1]).body
    shapes = tensor_shapes(state)
    renamed = {("other" if k.endswith("bias_delta") else k): v for k, v in shapes.items()}
    with pytest.raises(CodecError, match="expected names/shapes"):
        decode_update(body, renamed)
    reshaped = dict(shapes, **{"layer.0.q.lora_A.weight": (16, 64)})
    with pytest.raises(CodecError, match="expected names/shapes"):
        decode_update(body, reshaped)


def _forge(tensors: dict[str, torch.Tensor], encoding: str, shapes: dict, top_k: str = "") -> bytes:
    metadata = {
        "format": "schoolfl-update",
        "codec_version": "1",
        "encoding": encoding,
        "top_k_fraction": top_k,
        "shapes": json.dumps(shapes),
    }
    return safetensors_save(tensors, metadata=metadata)


@pytest.mark.parametrize(
    ("tensors", "encoding", "shapes", "top_k", "match"),
    [
        ({"w": torch.tensor([1.0, float("nan")])}, "fp32", {"w": [2]}, "", "NaN/Inf"),
        ({"w": torch.tensor([1.0, float("inf")])}, "fp32", {"w": [2]}, "", "NaN/Inf"),
        (
            {"w": torch.zeros(2, dtype=torch.float16)},
            "fp32",
            {"w": [2]},
            "",
            "expected torch.float32",
        ),
        ({"w": torch.zeros(3)}, "fp32", {"w": [2]}, "", "expected torch.float32 \\[2\\]"),
        ({"w": torch.zeros(2), "v": torch.zeros(1)}, "fp32", {"w": [2]}, "", "names wrong"),
        (
            {"w::q8": torch.zeros(1, 2, dtype=torch.int8), "w::scale": torch.tensor([-1.0])},
            "int8",
            {"w": [2]},
            "",
            "negative",
        ),
        (  # finite parts whose product overflows fp32: the dequantized update is Inf
            {
                "w::q8": torch.full((1, 2), 127, dtype=torch.int8),
                "w::scale": torch.tensor([3e38]),
            },
            "int8",
            {"w": [2]},
            "",
            "NaN/Inf",
        ),
        (
            {
                "w::idx": torch.tensor([0, 1], dtype=torch.int32),
                "w::q8": torch.full((2,), 127, dtype=torch.int8),
                "w::scale": torch.tensor([3e38]),
            },
            "int8",
            {"w": [4]},
            "0.5",
            "NaN/Inf",
        ),
        (
            {"w::idx": torch.tensor([0, 5], dtype=torch.int32), "w::val": torch.ones(2)},
            "fp32",
            {"w": [4]},
            "0.5",
            "outside",
        ),
        (
            {"w::idx": torch.tensor([1, 1], dtype=torch.int32), "w::val": torch.ones(2)},
            "fp32",
            {"w": [4]},
            "0.5",
            "strictly increasing",
        ),
        (
            {"w::idx": torch.tensor([0, 1], dtype=torch.int64), "w::val": torch.ones(2)},
            "fp32",
            {"w": [4]},
            "0.5",
            "int32",
        ),
        ({"w": torch.zeros(2)}, "bf17", {"w": [2]}, "", "unknown encoding"),
        ({"w": torch.zeros(2)}, "fp32", {"w": [-2]}, "", "invalid"),
    ],
)
def test_forged_bodies_are_refused(tensors, encoding, shapes, top_k, match) -> None:  # noqa: ANN001
    with pytest.raises(CodecError, match=match):
        decode_update(_forge(tensors, encoding, shapes, top_k))


def test_lying_shape_cannot_force_a_huge_allocation() -> None:
    body = _forge(
        {"w::idx": torch.tensor([0], dtype=torch.int32), "w::val": torch.ones(1)},
        "fp32",
        {"w": [2**30, 2**30]},
        "0.5",
    )
    with pytest.raises(LimitExceededError, match="max_elements"):
        decode_update(body)


@pytest.mark.parametrize("body", [b"", b"\x00" * 8, b"\xff" * 8 + b"{}", b"garbage" * 10])
def test_garbage_is_a_codec_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_update(body)


def test_metadata_missing_is_refused() -> None:
    with pytest.raises(CodecError, match="metadata|format"):
        decode_update(safetensors_save({"w": torch.zeros(2)}))
