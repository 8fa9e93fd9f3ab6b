"""aksis.optim: the learning-rate schedule and which parameters the optimizer decays."""

import itertools

import pytest
import torch
from conftest import tiny_config

from aksis.config import TrainConfig
from aksis.model import GPT
from aksis.optim import lr_factor, make_optimizer


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
