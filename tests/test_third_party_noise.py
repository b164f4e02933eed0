"""The agent's imports and model build print none of the known third-party start-up noise."""

from __future__ import annotations

import subprocess
import sys

KNOWN_NOISE = ("Failed to load", "_pytree", "is_gradient_checkpointing", "pip install kernels")


def test_building_a_model_prints_no_known_noise(tmp_path) -> None:  # noqa: ANN001
    script = (
        "import logging, warnings\n"
        "warnings.simplefilter('default')\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from quantization.adapters import AdapterConfig, attach_adapter\n"
        "from quantization.loader import load_quantized\n"
        "from quantization.models import save_checkpoint, tiny_llama_config\n"
        "import peft, torchao, transformers\n"
        "model = transformers.LlamaForCausalLM(tiny_llama_config())\n"
        f"folder = save_checkpoint(model, {str(tmp_path)!r})\n"
        "attach_adapter(load_quantized(folder, 'nf4'), AdapterConfig(rank=2))\n"
        "logging.getLogger('torchao').error('still heard: errors')\n"
        "print('built')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "built" in done.stdout
    for text in KNOWN_NOISE:
        assert text not in done.stderr, done.stderr
    assert "still heard: errors" in done.stderr  # only the known messages are silenced
