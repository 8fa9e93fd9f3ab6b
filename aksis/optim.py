"""The optimizer and the learning-rate schedule of a training run.

- `make_optimizer`: AdamW (weight decay on matrices only: linear weights and embeddings, never biases or norm
  gains), plain Adam, SGD with momentum, or `Muon`; fused kernels where the trainer asks for them.
- `Muon`: Muon on the transformer blocks' weight matrices, AdamW on everything else, as one optimizer.
- `lr_factor`: linear warmup, then a cosine decay to `min_lr_ratio` of the peak that follows the share of the run
  done, in steps or in the seconds of a wall-clock budget, whichever is further along.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.optim.adamw import adamw

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


# The quintic Newton-Schulz iteration of Keller Jordan's Muon: coefficients chosen for the steepest slope at zero, so
# that five steps bring every singular value of the (normalised) momentum into about [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T: `steps` Newton-Schulz iterations in bfloat16 (as the reference
    implementations run them), on the wide orientation of g (fewer rows than columns), whose Gram matrix is smaller."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # every singular value at most 1: inside the iteration's basin
    for _ in range(steps):  # x <- a x + (b A + c A^2) x, A = x x^T; each addmm sums in float32 before rounding
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalised by Newton-Schulz) for the param groups marked `"muon": True`, AdamW for the
    others: one optimizer, so one state dict, one LR schedule (each group's peak scaled alike), one object for
    accelerate to wrap.

    A Muon group's update, per weight matrix W (rows x columns) with gradient G:

        B <- momentum * B + (1 - momentum) * G              (the momentum buffer)
        U <- (1 - momentum) * G + momentum * B              (Nesterov)
        W <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, rows / columns)) * orthogonalize(U)

    as in Keller Jordan's reference and `torch.optim.Muon` (tests/test_optim.py checks the update against the
    latter). The scaling keeps the update's RMS alike for tall and square matrices. The AdamW groups go through
    `torch.optim.adamw.adamw` (AdamW's own step), fused where the trainer asks for it.

    Several processes: accelerate's DDP averages the gradients before the step, so every process orthogonalises the
    same matrix and applies the same update, and the weights stay identical without the gather and scatter of the
    reference's distributed version (which only spreads the Newton-Schulz work over the processes; for the models
    trained here it is a small share of a step). Gradient accumulation needs nothing: the step sees the accumulated
    gradient, as AdamW does."""

    def __init__(self, groups: Iterable[dict[str, Any]], fused: bool = False) -> None:
        defaults = {"lr": 0.02, "weight_decay": 0.0, "muon": False, "momentum": 0.95, "betas": (0.9, 0.95)}
        super().__init__(list(groups), {**defaults, "eps": 1e-8, "fused": fused})
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates weight matrices only: put other parameters in an AdamW group")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            grad, state = p.grad, self.state[p]
            assert grad is not None  # params are those with a gradient
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - momentum)
            update = orthogonalize(grad.lerp(buf, momentum))
            p.mul_(1 - lr * decay)
            p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                # the step count as a float tensor on the parameter's device, where the fused kernel wants it
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],  # type: ignore[misc]
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=group["fused"] or None,
            foreach=None if group["fused"] else False,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def muon_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Muon for the weight matrices of the transformer blocks' linear layers; AdamW (`learning_rate`, betas,
    `weight_decay` on matrices) for the embeddings, the output layer (even when untied: it maps to the vocabulary,
    not between hidden states), norm gains and biases, as the reference recipes do."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.Module):
        raise ValueError("--optimizer muon needs an aksis GPT (its transformer blocks hold the matrices Muon updates)")
    hidden = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if id(p) in hidden]
    rest = [p for p in params if id(p) not in hidden]
    adam = {"muon": False, "lr": config.learning_rate, "betas": (config.beta1, config.beta2)}
    return [
        {"params": matrices, "muon": True, "lr": config.muon_lr, "momentum": config.muon_momentum,
         "weight_decay": config.muon_weight_decay},
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay, **adam},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, **adam},
    ]  # fmt: skip


def make_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """Weight decay only on matrices (linear weights, embeddings); never on biases or norm gains."""
    if config.optimizer == "muon":
        return Muon(muon_groups(model, config), fused=fused)
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
