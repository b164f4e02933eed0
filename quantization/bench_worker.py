"""The measuring process of `schoolfl profile bench`: one fresh forked child per grid point.

Importing torch + transformers + peft costs ~10 s on the benchmark laptop and far more on a
Raspberry Pi, so a fresh interpreter per grid point would make the bench unusably slow. This
module runs as a small server (`python -m quantization.bench_worker`): it imports the
libraries once, then forks a fresh child for every request read from stdin (one JSON object
per line) and answers one JSON line on stdout. Each child builds its model, quantizes it,
attaches the adapter, resets the kernel's peak-RSS mark, trains as the agent trains (its
malloc threshold, int8 embeddings, the chunked causal-LM loss), and exits; the server reads
the child's own `ru_maxrss` with `os.wait4`. So a point's peak is that of one process that
did one thing, and it includes the imported libraries (the baseline the cost model adds).

No torch work happens in the server before fork (OpenMP thread pools must not exist in a
forking parent). Linux only, like the devices it measures.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import resource
import select
import signal
import statistics
import sys
import time
import traceback
from typing import Any

import psutil

from quantization.allocator import TRAINING_MMAP_THRESHOLD_BYTES, set_malloc_thresholds

logger = logging.getLogger(__name__)

ENCODER_TARGETS = {
    "q": "query",
    "k": "key",
    "v": "value",
    "o": "attention.output.dense",
    "up": "intermediate.dense",
}
"""PEFT matches target names as suffixes; BERT's FFN output ("output.dense") would also
match the attention output, so "down" is not offered for encoders."""
DECODER_TARGETS = {role: f"{role}_proj" for role in ("q", "k", "v", "o", "gate", "up", "down")}
LORA_DROPOUT = 0.0
"""The quantization package's default: no dropout copy of the LoRA input."""


def _rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Set this process's peak-RSS mark to its current RSS (Linux >= 4.0, clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS so the build-time peak does not linger in RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass  # not glibc: RSS may stay higher, which the measurement then shows


def peak_live_tensor_bytes(prof: Any) -> int:
    """High-water mark of tensors alive inside a `torch.profiler.profile(profile_memory=True)`
    block, from the CPU allocator's own alloc/free events in time order: exact and
    repeatable, unlike peak RSS, which also counts what glibc keeps after a free."""
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def _set_malloc_thresholds(mmap_bytes: int, trim_bytes: int | None = None) -> None:
    """Tune glibc malloc (no-op elsewhere).

    Built with random fp32 weights and then quantized, a model would leave its freed fp32
    weights in the heap (glibc raises its mmap threshold after the first large free), and the
    measured peak would include memory a streaming-loaded agent never holds. Building with a
    low mmap threshold gives every weight its own mapping, returned to the OS when freed.
    """
    set_malloc_thresholds(mmap_bytes, trim_bytes)


def _build_model(shape: dict[str, Any]) -> Any:
    """A randomly initialized model of `shape` (speed and memory need no trained weights)."""
    if shape["family"] == "encoder":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=shape["vocab"],
            hidden_size=shape["hidden"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            intermediate_size=shape["intermediate"],
            max_position_embeddings=shape["max_positions"],
            num_labels=shape.get("num_labels", 2),
            # SDPA's fused CPU kernel needs attention dropout off; LoRA dropout regularizes.
            attention_probs_dropout_prob=0.0,
        )
        return BertForSequenceClassification(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["max_positions"],
        tie_word_embeddings=shape.get("tied_embeddings", True),
    )
    return LlamaForCausalLM(config)


def _attach_lora(model: Any, shape: dict[str, Any], rank: int, targets: list[str]) -> Any:
    """LoRA through the quantization package when it offers `attach_adapter`, else PEFT."""
    table = ENCODER_TARGETS if shape["family"] == "encoder" else DECODER_TARGETS
    missing = [role for role in targets if role not in table]
    if missing:
        raise ValueError(
            f"LoRA target role(s) {missing} not supported for {shape['family']}; "
            f"use {', '.join(table)}"
        )
    names = tuple(table[role] for role in targets)
    try:
        from quantization.adapters import AdapterConfig, attach_adapter
    except ImportError:
        attach_adapter = None
    if attach_adapter is not None:
        config = AdapterConfig(
            rank=rank, alpha=2.0 * rank, dropout=LORA_DROPOUT, target_modules=names
        )
        return attach_adapter(model, config)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(names),
        task_type="SEQ_CLS" if shape["family"] == "encoder" else "CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _quantize(model: Any, scheme: str) -> Any:
    try:
        from quantization.schemes import quantize_model
    except ImportError:
        if scheme != "none":
            raise
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model
    return quantize_model(model, scheme)


def measure_train_point(request: dict[str, Any]) -> dict[str, Any]:
    """Build, quantize, adapt and train one grid point; return timings and memory marks."""
    import torch

    from quantization.causal_lm_loss import chunked_causal_lm_loss

    torch.set_num_threads(int(request["threads"]))
    torch.manual_seed(0)
    shape = request["shape"]
    baseline = _rss_bytes()
    _set_malloc_thresholds(64 * 1024)
    model = _build_model(shape)
    model = _quantize(model, request["scheme"])
    if request["scheme"] != "none":
        # As the agent builds a task model (TaskModelSpec.quantize_embeddings' default).
        from quantization.embeddings import quantize_embeddings

        quantize_embeddings(model)
    model = _attach_lora(model, shape, int(request["rank"]), list(request["target_modules"]))
    model.train()
    _release_free_heap()
    # Training: the threshold the agent sets for itself (quantization/allocator.py), so a
    # point's peak and step time are what the agent will see.
    _set_malloc_thresholds(TRAINING_MMAP_THRESHOLD_BYTES)
    ready_rss = _rss_bytes()
    peak_was_reset = _reset_peak_rss()

    batch, seq = int(request["batch_size"]), int(request["seq_len"])
    input_ids = torch.randint(0, shape["vocab"], (batch, seq))  # (B, S)
    if shape["family"] == "encoder":
        labels = torch.randint(0, shape.get("num_labels", 2), (batch,))  # (B,)
    else:
        labels = input_ids.clone()  # (B, S)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    durations, cpu_durations = [], []
    for step in range(int(request["warmup_steps"]) + int(request["steps"])):
        started, cpu_started = time.perf_counter(), time.process_time()
        if shape["family"] == "encoder":
            loss = model(input_ids=input_ids, labels=labels).loss
        else:  # the agent's loss: one chunk of logits at a time
            loss = chunked_causal_lm_loss(model, input_ids, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= int(request["warmup_steps"]):
            durations.append(time.perf_counter() - started)
            cpu_durations.append(time.process_time() - cpu_started)
    median = statistics.median(durations)
    return {
        "step_seconds": median,
        # CPU seconds of the process: on a shared machine with one torch thread, this is
        # the step time without the periods other processes held the core.
        "step_cpu_seconds": statistics.median(cpu_durations),
        "step_seconds_all": durations,
        "step_seconds_spread": (max(durations) - min(durations)) / median,
        "baseline_rss_bytes": baseline,
        "ready_rss_bytes": ready_rss,
        "peak_was_reset": peak_was_reset,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss": float(loss.detach()),
    }


def measure_machine(request: dict[str, Any]) -> dict[str, Any]:
    """fp32 matmul GFLOP/s and copy bandwidth (GB/s), medians of repeated runs."""
    import torch

    torch.set_num_threads(int(request["threads"]))
    size = int(request.get("matmul_size", 1024))
    a = torch.randn(size, size)  # (n, n)
    b = torch.randn(size, size)  # (n, n)
    torch.mm(a, b)
    matmul_times = []
    for _ in range(int(request.get("repeats", 7))):
        started = time.perf_counter()
        torch.mm(a, b)
        matmul_times.append(time.perf_counter() - started)
    elements = int(request.get("copy_megabytes", 256)) * 1024 * 1024 // 4
    source = torch.ones(elements)  # (n,)
    target = torch.empty(elements)  # (n,)
    target.copy_(source)
    copy_times = []
    for _ in range(int(request.get("repeats", 7))):
        started = time.perf_counter()
        target.copy_(source)
        copy_times.append(time.perf_counter() - started)
    schemes: dict[str, str | None] = {"none": None}
    try:
        # Only in a child: the bitsandbytes self-check runs torch ops, and a parent that has
        # run torch ops (OpenMP pools) deadlocks its forked children.
        from quantization.schemes import available_schemes

        schemes = {scheme.value: reason for scheme, reason in available_schemes().items()}
    except ImportError as error:
        schemes.update(
            {
                name: f"quantization package missing: {error}"
                for name in ("nf4", "int8", "bnb-nf4", "bnb-int8")
            }
        )
    return {
        "schemes": schemes,
        "cpu_fp32_gflops": 2 * size**3 / statistics.median(matmul_times) / 1e9,
        "memory_bandwidth_gbps": 2 * elements * 4 / statistics.median(copy_times) / 1e9,
        "matmul_spread": (max(matmul_times) - min(matmul_times)) / statistics.median(matmul_times),
    }


def _run_child(request: dict[str, Any], write_fd: int) -> None:
    """Body of a forked child: never returns; writes one JSON document to `write_fd`."""
    code = 0
    try:
        if request["op"] == "machine":
            result = measure_machine(request)
        else:
            result = measure_train_point(request)
        result["ok"] = True
        result["child_self_maxrss_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
    except BaseException as error:  # noqa: BLE001 - the child reports every failure as data
        result = {
            "ok": False,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }
        code = 1
    payload = json.dumps(result).encode()
    view = memoryview(payload)
    while view:
        written = os.write(write_fd, view)
        view = view[written:]
    os.close(write_fd)
    os._exit(code)


def _serve_one(request: dict[str, Any]) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_child(request, write_fd)
    os.close(write_fd)
    deadline = time.monotonic() + float(request.get("timeout_seconds", 600))
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status, usage = os.wait4(pid, 0)
    if chunks:
        try:
            result = json.loads(b"".join(chunks))
        except json.JSONDecodeError:
            result = {"ok": False, "error": "child wrote malformed output"}
    elif time.monotonic() >= deadline:
        result = {"ok": False, "error": f"timed out after {request.get('timeout_seconds')} s"}
    else:
        result = {"ok": False, "error": f"child died (wait status {status}); out of memory?"}
    result["child_maxrss_bytes"] = usage.ru_maxrss * 1024
    result["id"] = request.get("id")
    return result


def serve() -> None:
    """Import the heavy libraries once, then answer one forked measurement per stdin line."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401 - imported lazily by the first optimizer step otherwise
    import torch.optim  # noqa: F401

    try:
        # The quantization package imports these lazily; an agent has them loaded.
        import torchao.quantization.quant_primitives  # noqa: F401
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor  # noqa: F401
    except ImportError:
        pass  # torchao missing: only scheme "none" will be usable
    import transformers  # noqa: F401
    from transformers import BertForSequenceClassification, LlamaForCausalLM  # noqa: F401

    try:
        import quantization.schemes  # noqa: F401

        quantization_ok = True
    except ImportError:
        quantization_ok = False
    try:
        import quantization.adapters  # noqa: F401

        adapters_ok = True
    except ImportError:
        adapters_ok = False
    _release_free_heap()
    hello = {
        "ready": True,
        "baseline_rss_bytes": _rss_bytes(),
        "pid": os.getpid(),
        "quantization": quantization_ok,
        "adapters": adapters_ok,
    }
    sys.stdout.write(json.dumps(hello) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sys.stdout.write(json.dumps(_serve_one(request)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
