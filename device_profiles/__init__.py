"""Device profiles: reference hardware figures, on-device benchmark, and the cost model.

The public names below are light (no torch, no numpy): the scheduler imports them to call
`predict` for every device of every round.
"""

from device_profiles.cost_model import Prediction, predict
from device_profiles.errors import BenchError, ProfileError, ProfileValidationError
from device_profiles.plan import KNOWN_SCHEMES, TrainingPlan
from device_profiles.profile import (
    Calibration,
    DeviceProfile,
    Hardware,
    Measurement,
    Network,
    Power,
    Throughput,
    find_profile,
    load_reference_profiles,
)
from device_profiles.shapes import KNOWN_SHAPES, ModelShape, resolve_shape
from device_profiles.transfer import adapter_bytes

__all__ = [
    "KNOWN_SCHEMES",
    "KNOWN_SHAPES",
    "BenchError",
    "Calibration",
    "DeviceProfile",
    "Hardware",
    "Measurement",
    "ModelShape",
    "Network",
    "Power",
    "Prediction",
    "ProfileError",
    "ProfileValidationError",
    "Throughput",
    "TrainingPlan",
    "adapter_bytes",
    "find_profile",
    "load_reference_profiles",
    "predict",
    "resolve_shape",
]
