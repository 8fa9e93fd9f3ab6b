"""The optimizer and the learning-rate schedule of a training run.

- `make_optimizer`: AdamW (weight decay on matrices only: linear weights and embeddings, never biases or norm
  gains), plain Adam, or SGD with momentum; fused kernels where the trainer asks for them.
- `lr_factor`: linear warmup, then a cosine decay to `min_lr_ratio` of the peak that follows the share of the run
  done, in steps or in the seconds of a wall-clock budget, whichever is further along.
"""

from __future__ import annotations

import math

import torch

from aksis.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int | None, min_ratio: float, spent: float = 0.0) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio` as the run progresses. Progress is
    the share of the steps after warmup done, (step - warmup) / (total - warmup), or `spent`, the share of a
    wall-clock budget spent, whichever is larger: the decay reaches `min_ratio` at the first limit of the run.
    (`total` is None for a stream bounded by time alone. Warmup counts steps even under a time budget: its
    job is to let Adam's moment estimates settle, which takes updates, not seconds.)"""
    if step < warmup:
        return (step + 1) / warmup
    progress = spent if total is None else max(spent, (step - warmup) / max(1, total - warmup))
    progress = min(1.0, progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """Weight decay only on matrices (linear weights, embeddings); never on biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    if config.optimizer == "sgd":
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    betas = (config.beta1, config.beta2)
    extra = {"fused": True} if fused else {}
    if config.optimizer == "adam":  # plain Adam: no weight decay at all
        return torch.optim.Adam(params, lr=config.learning_rate, betas=betas, **extra)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, **extra)
