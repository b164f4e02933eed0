"""The bench's grid plot: measured and predicted step time and peak memory per grid point."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from device_profiles.bench import observations_from
from device_profiles.calibration import Observation
from device_profiles.cost_model import predict
from device_profiles.profile import DeviceProfile

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_SCHEME_COLOURS = {
    "none": "tab:blue",
    "int8": "tab:orange",
    "nf4": "tab:green",
    "bnb-int8": "tab:red",
    "bnb-nf4": "tab:purple",
}
"""One colour per scheme, fixed so that plots of different machines compare at a glance."""

_MODEL_MARKERS = {"minilm-l6": "o", "smollm2-135m": "s", "llama-1.1b": "^"}
"""One marker per known model shape (others are drawn as diamonds)."""


def _plot_observation(
    profile: DeviceProfile,
    observation: Observation,
    time_axis: Axes,
    memory_axis: Axes,
    seen: set[str],
) -> None:
    """Filled marker measured, hollow one predicted; `seen` keeps one legend entry per label."""
    plan = observation.plan
    prediction = predict(profile, observation.model_shape, plan)
    tokens = plan.batch_size * plan.seq_len
    colour = _SCHEME_COLOURS.get(plan.scheme, "black")
    marker = _MODEL_MARKERS.get(observation.model_shape.name, "D")
    label = f"{observation.model_shape.name} {plan.scheme}"
    time_axis.scatter(
        tokens,
        observation.step_seconds,
        color=colour,
        marker=marker,
        label=None if label in seen else label,
    )
    time_axis.scatter(
        tokens,
        prediction.step_seconds,
        facecolors="none",
        edgecolors=colour,
        marker=marker,
        s=80,
    )
    memory_axis.scatter(tokens, observation.peak_bytes / 1e9, color=colour, marker=marker)
    memory_axis.scatter(
        tokens,
        prediction.peak_bytes / 1e9,
        facecolors="none",
        edgecolors=colour,
        marker=marker,
        s=80,
    )
    seen.add(label)


def _label(profile: DeviceProfile, figure: Figure, time_axis: Axes, memory_axis: Axes) -> None:
    """The title carries the measured rates, since every prediction on the plot rests on them."""
    time_axis.set(
        xscale="log",
        yscale="log",
        xlabel="tokens per step (batch x seq)",
        ylabel="step seconds",
        title="train step (filled: measured, hollow: model)",
    )
    memory_axis.set(
        xscale="log",
        xlabel="tokens per step",
        ylabel="peak RSS (GB)",
        title="peak memory (fresh process per point)",
    )
    time_axis.legend(fontsize=7)
    figure.suptitle(
        f"{profile.name}: {profile.throughput.cpu_fp32_gflops:.1f} GFLOPS, "
        f"{profile.throughput.memory_bandwidth_gbps:.1f} GB/s, "
        f"{profile.throughput.threads} thread(s)"
    )


def plot_grid(profile: DeviceProfile, path: Path) -> Path:
    """Two panels (step seconds, peak GB) against tokens per step, one colour per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    observations = observations_from(profile)
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    seen: set[str] = set()
    for observation in observations:
        _plot_observation(profile, observation, time_axis, memory_axis, seen)
    _label(profile, figure, time_axis, memory_axis)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
