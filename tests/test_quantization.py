"""Quantization package on tiny random models: schemes, loader, adapters, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from quantization.adapters import (
    AdapterConfig,
    attach_adapter,
    get_adapter_state,
    load_adapter,
    save_adapter,
    set_adapter_state,
)
from quantization.errors import (
    AdapterError,
    ModelFileError,
    ModelMismatchError,
    SchemeUnavailableError,
    UnknownSchemeError,
)
from quantization.loader import load_quantized
from quantization.models import save_checkpoint, tiny_bert_config, tiny_llama_config
from quantization.qlinear import NF4_CODEBOOK, NF4Linear
from quantization.schemes import (
    Scheme,
    available_schemes,
    is_quantized_linear,
    parse_scheme,
    quantize_model,
)

pytestmark = pytest.mark.quantization

USABLE = [s for s, reason in available_schemes().items() if reason is None]
QUANTIZING = [s for s in USABLE if s is not Scheme.NONE]

# Relative Frobenius error ||W_q - W|| / ||W|| bounds, asserted on random and real weights.
# NF4 (4 bit, block 64) measures ~0.09 on Gaussian weights; int8 per-row ~0.008.
RECONSTRUCTION_BOUND = {
    Scheme.NF4: 0.11,
    Scheme.BNB_NF4: 0.11,
    Scheme.INT8: 0.012,
    Scheme.BNB_INT8: 0.012,
}


def _relative_error(module: nn.Module, weight: torch.Tensor) -> float:
    if isinstance(module, NF4Linear) or hasattr(module, "dequantize"):
        restored = module.dequantize()
    else:  # bitsandbytes: recover the weight by multiplying with the identity
        eye = torch.eye(weight.shape[1])
        with torch.no_grad():
            restored = (module(eye) - (0 if module.bias is None else module.bias)).T
    return ((restored - weight).norm() / weight.norm()).item()


def test_parse_scheme_accepts_names_and_rejects_unknown() -> None:
    assert parse_scheme("NF4") is Scheme.NF4
    assert parse_scheme("bnb_int8") is Scheme.BNB_INT8
    with pytest.raises(UnknownSchemeError, match="'nf4'.*'int8'") as info:
        parse_scheme("fp3")
    assert "fp3" in str(info.value)


def test_available_schemes_reports_every_scheme_with_reason_or_none() -> None:
    schemes = available_schemes()
    assert set(schemes) == set(Scheme)
    assert schemes[Scheme.NONE] is None and schemes[Scheme.NF4] is None
    for scheme in (Scheme.BNB_NF4, Scheme.BNB_INT8):
        reason = schemes[scheme]
        try:
            import bitsandbytes  # noqa: F401

            imports = True
        except Exception:  # noqa: BLE001 - reporting path under test
            imports = False
        if not imports:
            assert reason is not None and "bitsandbytes" in reason


@pytest.mark.parametrize("scheme", QUANTIZING, ids=lambda s: s.value)
def test_reconstruction_error_on_random_weights(scheme: Scheme) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 512, generator=generator) * 0.02
    model = nn.Sequential(nn.Linear(512, 256, bias=False))
    model[0].weight.data.copy_(weight)
    quantize_model(model, scheme, skip_modules=())
    assert is_quantized_linear(model[0])
    assert _relative_error(model[0], weight) < RECONSTRUCTION_BOUND[scheme]


def test_nf4_codes_match_torchao_and_error_is_no_worse() -> None:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    reference = to_nf4(weight, 64, 256)
    assert tuple(round(v, 4) for v in reference.nf4.tolist()) == NF4_CODEBOOK
    ours = NF4Linear.from_weight(weight)
    assert torch.equal(ours.nf4_packed, reference.quantized_data)
    ours_error = (ours.dequantize() - weight).norm()
    torchao_error = (reference.get_original_weight() - weight).norm()
    assert ours_error <= torchao_error * 1.001


def test_quantize_model_keeps_no_full_precision_copy_and_skips_heads() -> None:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    quantize_model(model, Scheme.NF4)
    assert isinstance(model.classifier, nn.Linear) and not is_quantized_linear(model.classifier)
    for module in model.modules():
        if is_quantized_linear(module):
            held = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            assert all(
                t.shape != (module.out_features, module.in_features) or not t.is_floating_point()
                for t in held
            )
    assert not any(p.requires_grad for p in model.parameters())


def test_unavailable_scheme_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import quantization.schemes as schemes

    monkeypatch.setattr(
        schemes, "bnb_unavailable_reason", lambda kind, device_type=None: "no bitsandbytes here"
    )
    with pytest.raises(SchemeUnavailableError, match="no bitsandbytes here"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), "bnb-nf4")


# -- loader -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    folder = save_checkpoint(model, tmp_path_factory.mktemp("bert"))
    return folder, model


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    folder = save_checkpoint(model, tmp_path_factory.mktemp("llama"), max_shard_bytes=40_000)
    return folder, model


def test_sharded_checkpoint_is_written_as_shards(tiny_llama_folder) -> None:  # noqa: ANN001
    folder, _ = tiny_llama_folder
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize("scheme", USABLE, ids=lambda s: s.value)
def test_loader_streams_into_quantized_model_matching_full_precision(
    scheme: Scheme,
    tiny_bert_folder,
    tiny_llama_folder,  # noqa: ANN001
) -> None:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for folder, reference in (tiny_bert_folder, tiny_llama_folder):
        model = load_quantized(folder, scheme)
        assert type(model) is type(reference)
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
        assert all(p.device.type != "meta" for p in model.parameters())
        relative = ((got - want).norm() / want.norm()).item()
        bound = 1e-5 if scheme is Scheme.NONE else 0.15
        assert relative < bound, (folder, scheme, relative)
        if scheme is not Scheme.NONE:
            assert any(is_quantized_linear(m) for m in model.modules())


def test_loader_ties_output_embedding(tiny_llama_folder) -> None:  # noqa: ANN001
    model = load_quantized(tiny_llama_folder[0], "nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_quantized(tmp_path / "nowhere", "nf4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="config.json"):
        load_quantized(tmp_path / "empty", "nf4")


def test_missing_shard_is_a_clear_error(tiny_llama_folder, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    folder = Path(shutil.copytree(tiny_llama_folder[0], tmp_path / "copy"))
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelFileError, match=shard.name):
        load_quantized(folder, "nf4")


def test_truncated_safetensors_is_a_clear_error(tiny_bert_folder, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    folder = Path(shutil.copytree(tiny_bert_folder[0], tmp_path / "copy"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_quantized(folder, "nf4")


def test_config_weights_mismatch_is_a_clear_error(tiny_bert_folder, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    folder = Path(shutil.copytree(tiny_bert_folder[0], tmp_path / "copy"))
    config = tiny_bert_config(num_labels=2, intermediate_size=256)
    (folder / "config.json").write_text(config.to_json_string())
    with pytest.raises(ModelMismatchError, match=r"shape .*intermediate|expects"):
        load_quantized(folder, "int8")
    config = tiny_bert_config(num_labels=2, num_hidden_layers=3)
    (folder / "config.json").write_text(config.to_json_string())
    with pytest.raises(ModelMismatchError, match="layer.2"):
        load_quantized(folder, "int8")


def test_unknown_scheme_in_loader(tiny_bert_folder) -> None:  # noqa: ANN001
    with pytest.raises(UnknownSchemeError, match="q3"):
        load_quantized(tiny_bert_folder[0], "q3")


# -- adapters ---------------------------------------------------------------------------------


def test_adapter_config_validates_fields() -> None:
    with pytest.raises(AdapterError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(AdapterError, match="dropout"):
        AdapterConfig(dropout=1.5)
    with pytest.raises(AdapterError, match="target_modules"):
        AdapterConfig(target_modules="query")  # type: ignore[arg-type]


def _toy_batch(vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Label = whether token 7 occurs: learnable by adapters + head in a few dozen steps."""
    ids = torch.randint(8, vocab, (16, 10), generator=generator)
    labels = torch.arange(16) % 2
    ids[labels == 1, 3] = 7
    return ids, labels


@pytest.mark.parametrize("scheme", USABLE, ids=lambda s: s.value)
def test_only_adapters_train_and_quantized_weights_never_change(
    scheme: Scheme,
    tiny_bert_folder,  # noqa: ANN001
) -> None:
    torch.manual_seed(0)
    model = attach_adapter(load_quantized(tiny_bert_folder[0], scheme), AdapterConfig(rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    frozen = {
        n: t.clone()
        for n, t in model.state_dict().items()
        if "lora_" not in n and "modules_to_save" not in n
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids, labels = _toy_batch(256, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    after = model.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), name


def test_causal_lm_loss_goes_down_with_nf4(tiny_llama_folder) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = attach_adapter(load_quantized(tiny_llama_folder[0], "nf4"), AdapterConfig(rank=8))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 2] * 4)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_wrapping_in_lora_dequantizes_no_weight(
    tiny_llama_folder,  # noqa: ANN001
    scheme: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PEFT reads `.weight` ~22 times per layer while wrapping; each read used to dequantize."""
    from quantization.qlinear import QuantizedLinear

    base = load_quantized(tiny_llama_folder[0], scheme)
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear)
    real_weight = layer.dequantize()
    dequantized: list[str] = []
    original = type(layer).dequantize

    def counted(self: QuantizedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        dequantized.append(type(self).__name__)
        return original(self, dtype)

    monkeypatch.setattr(type(layer), "dequantize", counted)
    model = attach_adapter(base, AdapterConfig(rank=4))
    assert dequantized == []
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert wrapped.lora_A["default"].weight.device == real_weight.device
    # outside the wrapping the property is the real weight again
    assert torch.equal(wrapped.base_layer.weight, real_weight)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_adapter_state_names_do_not_depend_on_scheme(tiny_llama_folder) -> None:  # noqa: ANN001
    names = {
        scheme: sorted(
            get_adapter_state(
                attach_adapter(load_quantized(tiny_llama_folder[0], scheme), AdapterConfig(rank=2))
            )
        )
        for scheme in USABLE
    }
    first = names[Scheme.NONE]
    assert first and all(n == first for n in names.values())


def _trained_classifier(folder: Path, scheme: str) -> nn.Module:
    torch.manual_seed(0)
    model = attach_adapter(load_quantized(folder, scheme), AdapterConfig(rank=4))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # non-trivial adapter and head
    return model.eval()


def test_adapter_save_load_round_trip_is_exact(tiny_bert_folder, tmp_path: Path) -> None:  # noqa: ANN001
    model = _trained_classifier(tiny_bert_folder[0], "nf4")
    folder = save_adapter(model, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over
    other = attach_adapter(load_quantized(tiny_bert_folder[0], "int8"), AdapterConfig(rank=4))
    load_adapter(other, folder)
    saved, loaded = get_adapter_state(model), get_adapter_state(other)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    save_adapter(other, folder)  # overwrite in place stays a valid folder
    load_adapter(model, folder)


def test_saved_adapter_loads_into_plain_peft_model(tiny_bert_folder, tmp_path: Path) -> None:  # noqa: ANN001
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    model = _trained_classifier(tiny_bert_folder[0], Scheme.NONE)
    folder = save_adapter(model, tmp_path / "adapter")
    base = BertForSequenceClassification.from_pretrained(str(tiny_bert_folder[0])).eval()
    plain = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_set_adapter_state_rejects_bad_tensors(tiny_bert_folder) -> None:  # noqa: ANN001
    model = attach_adapter(load_quantized(tiny_bert_folder[0], "nf4"), AdapterConfig(rank=4))
    state = get_adapter_state(model)
    name = next(iter(state))
    with pytest.raises(AdapterError, match="missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != name})
    bad = dict(state, **{name: torch.full_like(state[name], float("nan"))})
    with pytest.raises(AdapterError, match="NaN"):
        set_adapter_state(model, bad)
    wrong_rank = dict(state, **{name: torch.zeros(1, 1)})
    with pytest.raises(AdapterError, match="shape"):
        set_adapter_state(model, wrong_rank)


def test_load_adapter_missing_folder(tmp_path: Path, tiny_bert_folder) -> None:  # noqa: ANN001
    model = attach_adapter(load_quantized(tiny_bert_folder[0], "nf4"), AdapterConfig(rank=4))
    with pytest.raises(ModelFileError, match="adapter_config.json"):
        load_adapter(model, tmp_path)


def test_quantize_model_on_config_built_model_trains(copy_module=copy) -> None:  # noqa: ANN001
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config()).eval()
    model = quantize_model(copy_module.deepcopy(reference), "int8")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    peft_model = attach_adapter(model, AdapterConfig(rank=2))
    ids = torch.randint(0, 256, (2, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
