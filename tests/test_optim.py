"""aksis.optim: the learning-rate schedule and which parameters the optimizer decays."""

import itertools
from typing import Any

import pytest
import torch
from conftest import tiny_config

from aksis.config import TrainConfig
from aksis.model import GPT
from aksis.optim import Muon, lr_factor, make_optimizer, orthogonalize


def test_learning_rate_warms_up_then_decays_to_the_minimum() -> None:
    factors = [lr_factor(step, warmup=10, total=110, min_ratio=0.1) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1)
    # Under a time budget the decay follows the share of it spent, or the steps when they are further along.
    assert lr_factor(20, warmup=10, total=None, min_ratio=0.1, spent=0.5) == pytest.approx(0.55)
    assert lr_factor(20, warmup=10, total=10**6, min_ratio=0.1, spent=1.0) == pytest.approx(0.1)
    assert lr_factor(60, warmup=10, total=110, min_ratio=0.1, spent=0.2) == pytest.approx(0.55)
    assert lr_factor(5, warmup=10, total=None, min_ratio=0.1, spent=0.9) == pytest.approx(0.6)  # warmup counts steps


def test_weight_decay_applies_to_matrices_only(arch: str) -> None:
    model = GPT(tiny_config(arch))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.AdamW) and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="sgd")), torch.optim.SGD)
    adam = make_optimizer(model, TrainConfig(optimizer="adam"))
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 0


# ----- Muon -----


def newton_schulz_by_hand(g: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton-Schulz steps in float64, written out from Keller Jordan's description: X <- aX + bAX +
    cA^2 X with A = X X^T, on the wide orientation, starting from g / ||g||_F."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    x = x.T if x.shape[0] > x.shape[1] else x
    x = x / x.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if g.shape[0] > g.shape[1] else x


def test_orthogonalize_is_newton_schulz_and_flattens_the_singular_values() -> None:
    g = torch.linspace(-1, 1, 48).view(12, 4) ** 3 + torch.eye(12, 4)  # tall, rank 4, spread singular values
    ortho = orthogonalize(g)
    assert ortho.shape == g.shape and ortho.dtype == g.dtype
    # bfloat16 against float64 (stopping at four steps would be 0.34 off)
    assert torch.allclose(ortho.double(), newton_schulz_by_hand(g), atol=0.05)
    singular = torch.linalg.svdvals(ortho.double())
    assert singular.min() > 0.6 and singular.max() < 1.25  # about 1, where g's span a factor of about 40
    u, _, vt = torch.linalg.svd(g.double(), full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vt).flatten(), ortho.double().flatten(), dim=0) > 0.98


def muon_config(**overrides: Any) -> TrainConfig:
    return TrainConfig(optimizer="muon", **overrides)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(arch: str) -> None:
    model = GPT(tiny_config(arch))
    optimizer = make_optimizer(model, muon_config(muon_lr=0.05, learning_rate=3e-3, weight_decay=0.1))
    muon, decay, no_decay = optimizer.param_groups
    block_linears = [m.weight for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)]
    assert muon["muon"] and muon["lr"] == 0.05 and [id(p) for p in muon["params"]] == [id(p) for p in block_linears]
    assert not decay["muon"] and decay["lr"] == 3e-3 and decay["weight_decay"] == 0.1
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert any(p is model.lm_head.weight for p in decay["params"])  # tied or not, the output layer is AdamW's
    assert no_decay["weight_decay"] == 0 and all(p.dim() == 1 for p in no_decay["params"])
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once
    with pytest.raises(ValueError, match="weight matrices only"):
        Muon([{"params": [torch.nn.Parameter(torch.ones(3))], "muon": True}])


def test_a_muon_step_equals_torch_muon_and_an_adamw_step_equals_torch_adamw() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 8))  # tall: the update is scaled by sqrt(3)
    b = torch.nn.Parameter(torch.randn(8))
    w_ref, b_ref = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    ours = Muon(
        [
            {"params": [w], "muon": True, "lr": 0.02, "momentum": 0.9, "weight_decay": 0.1},
            {"params": [b], "lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.0},
        ]
    )
    reference = [
        torch.optim.Muon([w_ref], lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=True),
        torch.optim.AdamW([b_ref], lr=1e-2, betas=(0.8, 0.9), weight_decay=0.0),
    ]
    start = w.detach().clone()
    for step in range(3):  # the momentum buffer and Adam's moments carry over
        grads = torch.randn(24, 8), torch.randn(8)
        w.grad, b.grad = grads
        w_ref.grad, b_ref.grad = (g.clone() for g in grads)
        ours.step()
        for optimizer in reference:
            optimizer.step()
        # Both orthogonalise in bfloat16 with the same roundings (without the sqrt(rows / columns) scaling the moves
        # would differ by 42%, without Nesterov by more).
        moved, moved_ref = w.detach() - start, w_ref.detach() - start
        assert (moved - moved_ref).norm() < 1e-4 * moved_ref.norm(), step
        assert torch.allclose(b, b_ref, atol=1e-6), step
