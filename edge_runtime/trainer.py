"""Local training of one task's adapter on the device's own data.

The quantized base is loaded once per task and kept between rounds (a round's fixed cost
matters on a Raspberry Pi); each round starts from the global adapter, runs the plan's
steps, stops early rather than miss the deadline, and returns the *delta* to the global
adapter plus what was actually done. Student data stays in this process.

On a GPU (`ComputeDevice`, chosen by the agent) the model, batches and optimizer live there
and forward passes run under autocast; the delta always comes back as fp32 CPU tensors.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from device_profiles.plan import TrainingPlan
from durable.crash_points import crash_point
from quantization.adapters import get_adapter_state, set_adapter_state
from quantization.causal_lm_loss import chunked_causal_lm_loss
from quantization.compute_device import CPU, ComputeDevice
from quantization.task_data import LabelledText
from quantization.task_model import (
    TaskModelSpec,
    build_task_model,
    causal_lm_batch,
    classification_accuracy,
    classification_batch,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    delta: dict[str, torch.Tensor]
    """Trained adapter minus the global adapter it started from."""
    num_examples: int
    """Size of the local data set: the FedAvg weight."""
    num_steps: int
    """Steps actually done (fewer than planned when the deadline came first)."""
    mean_loss: float
    first_loss: float
    last_loss: float
    seconds: float
    stopped_early: bool


class LocalTrainer:
    """One task's model, kept loaded across rounds, and the device's examples for it."""

    def __init__(
        self,
        spec: TaskModelSpec,
        examples: Sequence[LabelledText] | Sequence[str],
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        device: ComputeDevice = CPU,
    ) -> None:
        if not examples:
            raise ValueError(f"task {spec.task_id!r}: no local examples to train on")
        self.spec = spec
        self.examples = list(examples)
        self.device = device
        self.model, self.tokenizer = build_task_model(
            spec, seed=seed, device=None if device is CPU else device.torch_device
        )
        self.clock = clock
        self._seed = seed
        self._gradient_checkpointing = False
        self.global_loads = 0
        """Adapter states loaded into the model (`load_global`): one per round is the
        budget (a load checks every tensor and copies it into the model)."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return get_adapter_state(self.model)

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        set_adapter_state(self.model, state)
        self.global_loads += 1

    def _batch(self, indices: Sequence[int], seq_len: int) -> dict[str, torch.Tensor]:
        chosen = [self.examples[i] for i in indices]
        if self.spec.kind == "classification":
            batch = classification_batch(self.tokenizer, chosen, self.spec.labels, seq_len)  # type: ignore[arg-type]
        else:
            batch = causal_lm_batch(self.tokenizer, chosen, seq_len)  # type: ignore[arg-type]
        return self.device.move_batch(batch)

    def _batches(self, plan: TrainingPlan, round_seed: int) -> list[list[int]]:
        """Shuffled passes over the local data, cut into the plan's batches."""
        rng = random.Random(round_seed)
        order: list[int] = []
        while len(order) < plan.local_steps * plan.batch_size:
            epoch = list(range(len(self.examples)))
            rng.shuffle(epoch)
            order.extend(epoch)
        return [
            order[step * plan.batch_size : (step + 1) * plan.batch_size]
            for step in range(plan.local_steps)
        ]

    def train_round(
        self,
        global_state: dict[str, torch.Tensor],
        plan: TrainingPlan,
        *,
        deadline: float | None = None,
        round_seed: int = 0,
        on_step: Callable[[int, int], None] | None = None,
    ) -> TrainingResult:
        """Train from `global_state` for up to `plan.local_steps` steps.

        The trainer runs the plan's steps, batch size, sequence length and learning rate;
        its scheme and rank are already the model's (`spec`, built from the same plan).

        `deadline` is a `clock()` time: before each step the trainer predicts its end from
        the slowest step so far and stops if it would land past the deadline.

        `on_step(done, planned)` is called after each optimizer step, so the agent can show
        "training step i/n" while its loop is blocked here.
        """
        self.load_global(global_state)
        start_state = {name: t.clone() for name, t in global_state.items()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=plan.learning_rate, weight_decay=0.0)
        scaler = self.device.grad_scaler()  # fp16 only
        self._set_gradient_checkpointing(plan.gradient_checkpointing)
        self.model.train()
        losses: list[float] = []
        slowest_step = 0.0
        started = self.clock()
        stopped_early = False
        for indices in self._batches(plan, round_seed):
            step_start = self.clock()
            if deadline is not None and step_start + slowest_step > deadline:
                stopped_early = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss = self._accumulate_gradients(indices, plan, scaler, len(losses))
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
                scaler.update()
            crash_point("training-step")
            losses.append(loss)
            slowest_step = max(slowest_step, self.clock() - step_start)
            if on_step is not None:
                on_step(len(losses), plan.local_steps)
        self.model.eval()
        trained = get_adapter_state(self.model)
        delta = {name: trained[name] - start_state[name] for name in trained}
        if stopped_early:
            logger.info(
                "stopped after %d of %d steps to meet the deadline", len(losses), plan.local_steps
            )
        return TrainingResult(
            delta=delta,
            num_examples=len(self.examples),
            num_steps=len(losses),
            mean_loss=sum(losses) / len(losses) if losses else math.nan,
            first_loss=losses[0] if losses else math.nan,
            last_loss=losses[-1] if losses else math.nan,
            seconds=self.clock() - started,
            stopped_early=stopped_early,
        )

    def _set_gradient_checkpointing(self, enabled: bool) -> None:
        """The plan's first memory lever: recompute each block's activations in backward
        (non-reentrant, so frozen embeddings need no `requires_grad` trick)."""
        if enabled == self._gradient_checkpointing:
            return
        if enabled:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            self.model.gradient_checkpointing_disable()
        self._gradient_checkpointing = enabled

    def _loss(self, batch: dict[str, torch.Tensor], share: float, tokens: int) -> torch.Tensor:
        """One pass's loss, scaled so the passes of a step sum to the whole batch's mean:
        classification weighs each pass by its share of the examples, causal-LM divides
        by the whole batch's labelled tokens. The causal-LM head runs in chunks of positions
        (quantization/causal_lm_loss.py): never the full batch x sequence x vocab logits."""
        with self.device.autocast():
            if self.spec.kind == "classification":
                return self.model(**batch).loss.float() * share
            return chunked_causal_lm_loss(self.model, **batch, num_items_in_batch=tokens)

    def _accumulate_gradients(
        self,
        indices: Sequence[int],
        plan: TrainingPlan,
        scaler: torch.amp.GradScaler | None,
        step: int,
    ) -> float:
        """Forward and backward over one step's batch in `plan.passes_per_step` passes (the
        plan's second memory lever: activations scale with the micro-batch); returns the
        batch's loss. The summed gradient equals one full-batch pass's."""
        size = plan.examples_per_pass
        passes = [
            self._batch(indices[i : i + size], plan.seq_len) for i in range(0, len(indices), size)
        ]
        tokens = sum(_labelled_tokens(batch) for batch in passes)
        total = 0.0
        for batch in passes:
            if self.spec.kind != "classification" and _labelled_tokens(batch) == 0:
                continue  # nothing to predict in this pass (one-token texts)
            loss = self._loss(batch, len(batch["labels"]) / len(indices), tokens)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
            (loss if scaler is None else scaler.scale(loss)).backward()
            total += float(loss.detach())
        return total

    @torch.no_grad()
    def accuracy(
        self, examples: Sequence[LabelledText], seq_len: int = 64, batch_size: int = 32
    ) -> float:
        """Share of `examples` classified correctly (classification tasks only)."""
        if self.spec.kind != "classification":
            raise ValueError("accuracy is defined for classification tasks only")
        return classification_accuracy(
            self.model, self.tokenizer, examples, self.spec.labels, seq_len, batch_size
        )


def _labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions with a next-token label (causal-LM; HF shifts labels by one)."""
    return int((batch["labels"][:, 1:] != -100).sum()) if batch["labels"].dim() == 2 else 0
