"""Known, harmless start-up messages of our dependencies, silenced where they are raised.

Each one fills the first screen of every torch command and every log, and none asks anything
of the user. Each is silenced by its own logger or its exact warning text, so that anything
else these libraries say still shows:

- torchao's CPU wheel ships CUDA kernel libraries (`_C_mxfp8`, `_C_cutlass_90a`) and logs
  "Failed to load ..." for each when there is no GPU; we use only its CPU primitives.
- torchao registers Enum classes as pytree constants, and torch (>= 2.10) logs a
  deprecation warning from `torch.utils._pytree` for each, at every import.
- bitsandbytes' CPU backend tries to fetch a faster 4-bit kernel from the Hugging Face hub
  (`kernels` package) and logs "pip install kernels" when it cannot; it then uses its own
  kernel, which is what it measured with here (RESULTS.md).
- PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
  FutureWarning, once per adapter we attach.

Called when `quantization` is first imported, i.e. before any of these libraries is.
"""

from __future__ import annotations

import logging
import warnings

QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops")


def silence_known_noise() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
    )
