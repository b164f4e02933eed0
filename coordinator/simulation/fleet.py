"""A simulated fleet of schools: device mix, shared links, a school day, drop-outs, data.

Everything is drawn from one seed, so two schedulers compared on the same seed face the same
schools, devices, hidden device speeds, data shards and availability. What the schedulers see
is only what a real coordinator would: each device's reference profile, its school, and the
school's configured link. What they do not see, and must learn from reported durations and
drop-outs, is each device's true speed (some are much slower than their profile: thermal
throttling, a slow SD card, a busy laptop) and its true drop-out probability.

Tiers (names used in reports):
- well-equipped: laptops, Jetson Orin and Pi 5 on a 200/50 Mbit/s link;
- typical: Pi 4, Pi 5 and laptops on a 50/10 Mbit/s link;
- slow: Pi 4, Jetson Nano and low-end laptops on a rural 4/1 Mbit/s link.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from coordinator.plan_fitting import SchoolLink
from device_profiles.profile import DeviceProfile, find_profile
from quantization.school_questions import dirichlet_shards
from quantization.task_data import LabelledText

SECONDS_PER_DAY = 24 * 3600.0
START_HOUR = 8.0
"""The simulated clock starts on a Monday at 08:00."""

TIERS: dict[str, tuple[SchoolLink, tuple[str, ...]]] = {
    "well-equipped": (
        SchoolLink(200.0, 50.0),
        ("laptop-mid-16gb", "jetson-orin-nano-8gb", "raspberry-pi-5-8gb", "laptop-mid-16gb"),
    ),
    "typical": (
        SchoolLink(50.0, 10.0),
        ("raspberry-pi-4-4gb", "raspberry-pi-5-8gb", "laptop-low-4gb", "laptop-mid-16gb"),
    ),
    "slow": (
        SchoolLink(4.0, 1.0),
        ("raspberry-pi-4-4gb", "jetson-nano-4gb", "laptop-low-4gb", "raspberry-pi-4-4gb"),
    ),
}
TIER_SHARES = (("well-equipped", 0.3), ("typical", 0.4), ("slow", 0.3))


@dataclass(frozen=True)
class SimSchool:
    school_id: str
    tier: str
    link: SchoolLink


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    school: str
    profile: DeviceProfile
    true_slowness: float
    """Hidden multiplier on the profile's compute time (1.0: as the profile says)."""
    dropout_probability: float
    """Hidden chance, per assignment, that the device vanishes mid-round."""
    is_laptop: bool
    """Laptops are used in lessons and switched off at night; Pis and Jetsons stay on."""
    examples: tuple[LabelledText, ...]


@dataclass(frozen=True)
class SimFleet:
    schools: tuple[SimSchool, ...]
    devices: tuple[SimDevice, ...]
    held_out: tuple[LabelledText, ...]
    labels: tuple[str, ...]

    def school(self, school_id: str) -> SimSchool:
        return next(s for s in self.schools if s.school_id == school_id)

    def tier_schools(self, tier: str) -> tuple[str, ...]:
        return tuple(s.school_id for s in self.schools if s.tier == tier)


def build_fleet(
    examples: list[LabelledText],
    *,
    devices: int = 200,
    schools: int = 20,
    held_out: int = 200,
    label_skew: float = 0.3,
    seed: int = 0,
) -> SimFleet:
    """Schools by tier, devices by the tier's mix, and a Dirichlet(label_skew) split of the
    questions over schools (a school's devices share its questions evenly)."""
    if schools < 1 or devices < schools:
        raise ValueError(f"need at least one device per school, got {devices} for {schools}")
    rng = random.Random(seed)
    shuffled = list(examples)
    rng.shuffle(shuffled)
    if len(shuffled) - held_out < devices:
        raise ValueError(
            f"{len(shuffled)} questions cannot give {devices} devices one each after "
            f"{held_out} held out"
        )
    evaluation, pool = shuffled[:held_out], shuffled[held_out:]
    tiers: list[str] = []
    for tier, share in TIER_SHARES:
        tiers += [tier] * round(share * schools)
    tiers = (tiers + ["typical"] * schools)[:schools]
    sim_schools = tuple(
        SimSchool(f"school-{index:02d}-{tier}", tier, TIERS[tier][0])
        for index, tier in enumerate(tiers)
    )
    school_examples = dirichlet_shards(pool, schools, label_skew, seed)
    counts = [devices // schools + (1 if i < devices % schools else 0) for i in range(schools)]
    profiles: dict[str, DeviceProfile] = {}
    sim_devices = []
    for school, count, questions in zip(sim_schools, counts, school_examples, strict=True):
        mix = TIERS[school.tier][1]
        while len(questions) < count:  # a tiny school shard: its devices share questions
            questions = questions + questions
        for index in range(count):
            name = mix[rng.randrange(len(mix))]
            profile = profiles.setdefault(name, find_profile(name))
            is_laptop = name.startswith("laptop")
            slowness = rng.lognormvariate(0.0, 0.25) * (2.5 if rng.random() < 0.1 else 1.0)
            dropout = (0.12 if is_laptop else 0.03) + (0.05 if school.tier == "slow" else 0.0)
            sim_devices.append(
                SimDevice(
                    device_id=f"{school.school_id}-d{index:02d}",
                    school=school.school_id,
                    profile=profile,
                    true_slowness=slowness,
                    dropout_probability=dropout,
                    is_laptop=is_laptop,
                    examples=tuple(questions[index::count]),
                )
            )
    labels = tuple(sorted({e.label for e in examples}))
    return SimFleet(sim_schools, tuple(sim_devices), tuple(evaluation), labels)


def is_available(device: SimDevice, clock_seconds: float, rng: random.Random) -> bool:
    """Whether the device can train at this simulated time.

    Laptops: not during lessons (09:00-12:00, 13:00-15:30 on weekdays), not at night
    (22:00-07:00), not at weekends. Pis and Jetsons: always, bar a 5% chance of being off or
    busy at any given check.
    """
    if rng.random() < 0.05:
        return False
    if not device.is_laptop:
        return True
    hours = (START_HOUR * 3600.0 + clock_seconds) / 3600.0
    day, hour = divmod(hours, 24.0)
    if int(day) % 7 >= 5:
        return False
    if hour < 7.0 or hour >= 22.0:
        return False
    return not (9.0 <= hour < 12.0 or 13.0 <= hour < 15.5)
