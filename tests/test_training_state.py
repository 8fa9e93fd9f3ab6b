"""A run's resumable state in safetensors and JSON (aksis.training_state): resuming never unpickles; an older state
with pickles loads from one's own folder with a warning and is refused from the Hub (issue 18, case 12)."""

import json
import logging
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Hub
from test_trainer import losses, run_config

from aksis.runs import TRAINER_STATE_FILE, TRAINING_STATE_DIR
from aksis.trainer import Trainer, TrainingError, train
from aksis.training_state import (
    StateError,
    load_optimizer,
    load_rng,
    load_scheduler,
    save_optimizer,
    save_rng,
    save_scheduler,
)


def test_optimizer_schedule_and_random_states_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    save_optimizer(optimizer, tmp_path)
    save_scheduler(scheduler, tmp_path)
    save_rng(tmp_path, 0)
    draws = (random.random(), np.random.rand(), torch.rand(3))

    fresh_model = torch.nn.Linear(4, 3)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=0.5)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 1 / (step + 1))
    load_optimizer(fresh, tmp_path)
    load_scheduler(fresh_scheduler, tmp_path)
    load_rng(tmp_path, 0)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    before, after = optimizer.state_dict(), fresh.state_dict()

    def groups(state: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**g, "betas": list(g["betas"])} for g in state["param_groups"]]  # JSON gives back a list

    assert groups(after) == groups(before)
    for index, entries in before["state"].items():
        assert all(torch.equal(value, after["state"][index][name]) for name, value in entries.items())
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json"] * 3 + [".safetensors"] * 2
    (tmp_path / "optimizer.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(StateError, match="optimizer.safetensors cannot be read .*: the training state is damaged"):
        load_optimizer(fresh, tmp_path)


def stopped_at_step_4(tmp_path: Path) -> Trainer:
    """A run of 8 steps stopped after its 4th (as SIGINT stops it), with its step-4 checkpoint."""
    trainer = Trainer(run_config(tmp_path, max_steps=8, save_every=4, dropout=0.1))
    calls = 0

    def stop_after_four_steps(module: torch.nn.Module, _: object) -> None:
        nonlocal calls
        calls += module.training  # evaluation passes don't count
        if calls == 4:
            trainer.request_stop()

    trainer.model.register_forward_pre_hook(stop_after_four_steps)
    assert trainer.train().steps == 4
    return trainer


def _never_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickled")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)


def test_a_step_checkpoint_holds_no_pickle_and_resumes_exactly_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = run_config(tmp_path / "a", max_steps=8, save_every=4, dropout=0.1)
    train(straight)
    stopped_at_step_4(tmp_path / "b")
    state = tmp_path / "b" / "run" / "step-000004" / TRAINING_STATE_DIR
    assert {p.suffix for p in state.iterdir()} == {".json", ".safetensors"}
    assert json.loads((state / TRAINER_STATE_FILE).read_text())["state_format"] == 2
    _never_unpickle(monkeypatch)
    resumed = train(run_config(tmp_path / "b", max_steps=8, save_every=4, dropout=0.1, resume="latest"))
    assert resumed.steps == 8
    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")  # exactly, step for step


def pickled_state(tmp_path: Path) -> Path:
    """A run stopped at step 4 whose step checkpoint holds the state as an older aksis saved it: accelerate's
    save_state, with pickles (format 1)."""
    trainer = stopped_at_step_4(tmp_path)
    folder = tmp_path / "run" / "step-000004" / TRAINING_STATE_DIR
    record = json.loads((folder / TRAINER_STATE_FILE).read_text())
    for path in folder.iterdir():
        path.unlink()
    trainer.accelerator.save_state(str(folder))  # the state at the end of step 4, as format 1 saved it
    (folder / TRAINER_STATE_FILE).write_text(json.dumps({k: v for k, v in record.items() if k != "state_format"}))
    assert (folder / "optimizer.bin").exists() and list(folder.glob("random_states_*.pkl"))
    return tmp_path / "run" / "step-000004"


def test_an_older_state_with_pickles_resumes_from_one_s_own_folder_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train(run_config(tmp_path / "a", max_steps=8, save_every=4, dropout=0.1))
    pickled_state(tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="aksis.runs"):
        resumed = train(run_config(tmp_path / "b", max_steps=8, save_every=4, dropout=0.1, resume="latest"))
    assert resumed.steps == 8 and "holds pickles" in caplog.text
    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")
    saved = tmp_path / "b" / "run" / "step-000008" / TRAINING_STATE_DIR
    assert {p.suffix for p in saved.iterdir()} == {".json", ".safetensors"}  # the next save is pickle-free


class Payload:
    """A pickle that runs code when loaded: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_state_with_pickles_from_the_hub_is_refused_and_never_loaded(tmp_path: Path, hub: Hub) -> None:
    from huggingface_hub import HfApi

    step = pickled_state(tmp_path / "victim")
    marker = tmp_path / "pwned"
    (step / TRAINING_STATE_DIR / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    repo = hub.fresh_repo_id("crafted")
    api = HfApi(token=hub.write_token)
    api.create_repo(repo)
    api.upload_folder(folder_path=step, repo_id=repo)
    with pytest.raises(TrainingError, match="this training state from the Hub holds pickles .* can run code"):
        Trainer(run_config(tmp_path / "elsewhere", max_steps=8, resume=repo))
    assert not marker.exists()


def test_a_damaged_state_is_a_clear_error(tmp_path: Path) -> None:
    train(run_config(tmp_path, max_steps=4, save_every=4))
    state = tmp_path / "run" / "step-000004" / TRAINING_STATE_DIR
    (state / "scheduler.json").unlink()
    with pytest.raises(TrainingError, match="scheduler.json is missing: the training state is incomplete"):
        Trainer(run_config(tmp_path, max_steps=8, resume="latest"))
