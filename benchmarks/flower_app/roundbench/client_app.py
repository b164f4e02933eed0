"""A ClientApp with trivial training: it returns a float32 vector of the update's size, so
a Flower round measured with it is the deployment runtime's overhead and transfer only."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One tiny op on the received global vector (its first element), a vector back."""
    received = msg.content["arrays"].to_numpy_ndarrays()[0]
    update = np.full(received.shape, 1e-3, dtype=np.float32)
    update[0] += received[0]
    content = RecordDict(
        {"arrays": ArrayRecord([update]), "metrics": MetricRecord({"num-examples": 1})}
    )
    return Message(content=content, reply_to=msg)
