"""A FedAvg ServerApp that times each round itself (time.monotonic at the start of
configure_train and at the end of aggregate_train) and writes the times to a JSON file
(atomically), because `flwr run` reports no per-round figures."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round's training starts and its aggregate exists."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.started: dict[int, float] = {}
        self.finished: dict[int, float] = {}
        self.replies: dict[int, int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started[server_round] = time.monotonic()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        self.finished[server_round] = time.monotonic()
        self.replies[server_round] = len(replies)
        return result


def _write_json(path: Path, document: dict[str, object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        json.dump(document, stream)
        stream.flush()
        os.fsync(stream.fileno())
    temporary.replace(path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """R rounds of FedAvg over every node (fraction_train 1.0, no federated evaluation:
    schoolfl's rounds have none either), then the per-round times."""
    rounds = int(context.run_config["num-server-rounds"])
    nodes = int(context.run_config["min-nodes"])
    size = int(context.run_config["update-size"])
    began = time.monotonic()
    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(size, dtype=np.float32)]),
        num_rounds=rounds,
    )
    _write_json(
        Path(str(context.run_config["timing-file"])),
        {
            "began": began,
            "rounds": [
                {
                    "round": r,
                    "seconds": strategy.finished[r] - strategy.started[r],
                    "replies": strategy.replies[r],
                }
                for r in sorted(strategy.finished)
            ],
            "pid": os.getpid(),
        },
    )
