"""The memory levers a plan fitter pulls when a plan's predicted peak does not fit a device.

They live here, below the coordinator, because two fitters pull them: the coordinator's
(`coordinator.plan_fitting`, per device per round) and the planner's (`schoolfl profile
plan`, `device_profiles.planner`), and both must price the plans the trainer runs.

Three ways to train the same model in less memory, in the order the issue ranks their cost:

1. Gradient checkpointing (`TrainingPlan.gradient_checkpointing`): keep only each block's
   input hidden states and recompute the block's forward in backward. Saved activations
   shrink from every block's to one block's plus the boundaries; the step pays roughly one
   more forward of the blocks (the cost model prices it).
2. Micro-batches with gradient accumulation (`TrainingPlan.micro_batch_size`): the batch
   runs as equal slices whose gradients add up to the full batch's, so activations scale
   with the slice. The FLOPs are the same; each extra pass streams (and dequantizes) the
   weights again and pays the per-pass framework cost.
3. A shorter sequence: the ladder's next rung in `coordinator.plan_fitting`, a grid axis
   in the planner (it changes what the model sees, so it comes after the two that change
   only time).

Levers 1 and 2 leave the gradient of the step as it was (up to float rounding), which is
why the fitter pulls them before it shrinks anything: a device that pulls them contributes
the same update, later.
"""

from __future__ import annotations

from dataclasses import replace

from device_profiles.plan import TrainingPlan


def smaller_micro_batch(batch_size: int, current: int) -> int:
    """The largest divisor of `batch_size` at most half of `current` (0: the whole batch),
    or 0 when `current` is already one example: micro-batches halve, staying divisors so
    every pass has the same size."""
    size = current or batch_size
    for candidate in range(size // 2, 0, -1):
        if batch_size % candidate == 0:
            return candidate
    return 0


def with_memory_levers(plan: TrainingPlan) -> tuple[TrainingPlan, ...]:
    """`plan` with each further memory lever pulled, in the order they are tried: gradient
    checkpointing on, then micro-batches of half the batch, a quarter, ... one example
    (each keeping checkpointing). Levers the plan already pulls are kept; the plan itself
    is not in the result."""
    variants: list[TrainingPlan] = []
    current = plan
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        variants.append(current)
    while (micro := smaller_micro_batch(current.batch_size, current.micro_batch_size)) > 0:
        current = replace(current, micro_batch_size=micro)
        variants.append(current)
    return tuple(variants)


def lever_note(plan: TrainingPlan) -> str:
    """The levers `plan` pulls, in words ('' for none)."""
    parts = []
    if plan.gradient_checkpointing:
        parts.append("gradient checkpointing")
    if plan.micro_batch_size and plan.micro_batch_size < plan.batch_size:
        parts.append(
            f"micro-batches of {plan.micro_batch_size} "
            f"({plan.passes_per_step} passes per step, gradients accumulated)"
        )
    return " and ".join(parts)
