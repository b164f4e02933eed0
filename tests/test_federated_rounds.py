"""Real federated rounds: a coordinator process and three agent processes with non-IID
shards train nf4 + LoRA MiniLM-L6 over a real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.mosquitto import MosquittoProcess
from coordinator.store import CoordinatorStore, RoundState
from tests.fleet import TASK, make_fleet, schoolfl

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROFILES = ["raspberry-pi-5-8gb", "laptop-mid-16gb", "laptop-low-4gb"]


def _accuracy_with_plain_peft(
    adapter_folder: str, fleet_labels: tuple[str, ...], held_out
) -> float:  # noqa: ANN001
    """Load the adapter the way a user would: PeftModel.from_pretrained on a full-precision
    base, and measure held-out accuracy."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from quantization.models import load_tokenizer, minilm_path
    from quantization.task_model import classification_accuracy

    base = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=len(fleet_labels)
    )
    model = PeftModel.from_pretrained(base, adapter_folder)
    return classification_accuracy(model, load_tokenizer(minilm_path()), held_out, fleet_labels)


def test_three_agents_three_rounds(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    torch.set_num_threads(1)
    fleet = make_fleet(tmp_path, mosquitto)
    fleet.write_coordinator_config()
    fleet.add_agents(fleet.shards, PROFILES)
    try:
        coordinator = fleet.start_coordinator()
        fleet.enroll_agents()
        for index in range(3):
            fleet.start_agent(index)
        coordinator.wait(timeout=480)
        assert coordinator.returncode == 0, fleet.log("coordinator")[-4000:]
    finally:
        fleet.stop_all()

    store = CoordinatorStore(tmp_path / "coordinator" / "coordinator.db")
    rounds = store.rounds(TASK)
    assert [r.state for r in rounds] == [RoundState.COMPLETED] * 3, [r.reason for r in rounds]
    for record in rounds:
        updates = store.updates(TASK, record.round_number)
        assert sorted(u.device_id for u in updates) == ["dev-0", "dev-1", "dev-2"]
    versions = store.adapter_versions(TASK)
    assert [v.version for v in versions] == [0, 1, 2, 3]
    before, after = versions[0].metrics["accuracy"], versions[-1].metrics["accuracy"]
    print(f"held-out accuracy (nf4 coordinator model): before {before:.3f}, after {after:.3f}")
    assert after > before + 0.1

    # Each device keeps the global adapter it last trained from, for classroom use.
    prediction = schoolfl(
        "agent",
        "predict",
        "--config",
        str(fleet.agent_configs[0]),
        "--task",
        TASK,
        "How do plants make food from sunlight?",
    )
    label = prediction.split("\t")[0]
    assert label in fleet.labels, prediction

    plain_after = _accuracy_with_plain_peft(versions[-1].folder, fleet.labels, fleet.held_out)
    print(f"held-out accuracy (PeftModel.from_pretrained on fp32 base): {plain_after:.3f}")
    assert plain_after > before + 0.1
