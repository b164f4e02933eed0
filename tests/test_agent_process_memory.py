"""What the agent does to its own process for memory (issue 19): glibc's mmap threshold set
at start, and bitsandbytes kept out when the profile offers no bnb scheme.

Each check runs in a fresh interpreter: both are process-wide settings that the pytest
process (which has imported everything already) cannot show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FRAGMENTING_ALLOCATIONS = """
import ctypes, json, sys, psutil
if sys.argv[1] == "configured":
    from quantization.allocator import configure_training_allocator
    configure_training_allocator()
rss = lambda: psutil.Process().memory_info().rss
big = bytearray(8 << 20)       # one large free raises glibc's dynamic threshold to 8 MiB
del big
before = rss()
chunks = [bytearray(4 << 20) for _ in range(24)]   # 96 MiB of 4 MiB "activations"
keep = bytearray(64 << 10)     # a small live block above them: the heap top cannot shrink
del chunks
print(json.dumps({"retained_mib": (rss() - before) / 2**20}))
"""


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not Path("/lib/x86_64-linux-gnu/libc.so.6").exists()
                    and not Path("/lib/aarch64-linux-gnu/libc.so.6").exists(),
                    reason="glibc only")  # fmt: skip
def test_fixed_mmap_threshold_returns_freed_buffers_to_the_os() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    default = json.loads(_run(FRAGMENTING_ALLOCATIONS, "default", env=env))
    configured = json.loads(_run(FRAGMENTING_ALLOCATIONS, "configured", env=env))
    # glibc's default keeps the freed 4 MiB buffers in the heap; the fixed threshold does not.
    assert default["retained_mib"] > 64, default
    assert configured["retained_mib"] < 16, configured


def test_environment_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantization.allocator import configure_training_allocator

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "left as the environment sets it" in configure_training_allocator()


KEEP_OUT = """
import sys
from quantization.bnb_backend import keep_bitsandbytes_out, bnb_unavailable_reason
assert keep_bitsandbytes_out()
import peft.tuners.lora  # PEFT imports bitsandbytes whenever it finds it installed
print(repr(("bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None,
            bnb_unavailable_reason("nf4", "cpu"))))
"""


def test_bitsandbytes_kept_out_and_a_bnb_plan_then_says_why() -> None:
    loaded, reason = eval(_run(KEEP_OUT))  # noqa: S307 - our own subprocess's repr of a tuple
    assert loaded is False
    assert reason is not None and "kept out of this agent process" in reason
