"""A run's resumable state in safetensors and JSON only, so that resuming never unpickles anything.

    training_state/
      trainer_state.json           the trainer's own record (step, tokens, clock, settings: aksis.runs), and
                                   "state_format": 2
      optimizer.safetensors        every tensor of the optimizer's state, as "<param index>.<name>" (exp_avg, step...)
      optimizer.json               its param groups and any state that is not a tensor
      scheduler.json               the LR scheduler's state_dict
      rng-<process>.json           Python's and NumPy's random states, per process
      rng-<process>.safetensors    torch's random states (CPU, each CUDA device, MPS), per process

The model's weights are the step checkpoint's own model.safetensors, beside training_state/. Tensors go through
safetensors and everything else through JSON: a state downloaded from the Hub is data, never code.

Format 1 was accelerate's `save_state` (optimizer.bin, random_states_*.pkl, custom_checkpoint_*.pkl: pickles, which
can run code when loaded). Such a state still loads from a folder of one's own, with a warning, and is refused from
the Hub. Runs sharded with FSDP or DeepSpeed still save format 1 (their optimizer state is sharded, which
accelerate knows how to gather and this module does not).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FORMAT = 2
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")  # what format 1 (accelerate's save_state) wrote state into


class StateError(Exception):
    """A training state cannot be read or is refused; the message says what to do."""


def is_pickled(folder: Path) -> bool:
    """Whether `folder` (a training_state/) is format 1: accelerate's save_state, with pickles."""
    return not (folder / OPTIMIZER_TENSORS).exists() and any(
        path.suffix in PICKLE_SUFFIXES for path in folder.iterdir()
    )


# ----- optimizer and scheduler -----


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer's state_dict as optimizer.safetensors (its tensors) and optimizer.json (the rest)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                others.setdefault(str(index), {})[name] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    _write_json(folder / OPTIMIZER_JSON, {"param_groups": state_dict["param_groups"], "state": others})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what `save_optimizer` wrote (tensors go where the optimizer's parameters are)."""
    record = _read_json(folder / OPTIMIZER_JSON)
    state: dict[int, dict[str, Any]] = {int(index): dict(entries) for index, entries in record["state"].items()}
    for key, tensor in _read_tensors(folder / OPTIMIZER_TENSORS).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})


def save_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, folder: Path) -> None:
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)  # the schedule's functions: code, rebuilt by the trainer, never saved
    _write_json(folder / SCHEDULER_JSON, state)


def load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, folder: Path) -> None:
    state = _read_json(folder / SCHEDULER_JSON)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)  # as LambdaLR saves plain functions
    scheduler.load_state_dict(state)


# ----- random states -----


def save_rng(folder: Path, process: int) -> None:
    """This process's random states: Python's and NumPy's as JSON, torch's (CPU, CUDA, MPS) as safetensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # the legacy form: (name, keys, pos, has_gauss, cached)
    _write_json(
        folder / f"rng-{process}.json",
        {
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        },
    )
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    if torch.backends.mps.is_available():
        tensors["mps"] = torch.mps.get_rng_state()
    save_file(tensors, str(folder / f"rng-{process}.safetensors"))


def load_rng(folder: Path, process: int) -> None:
    """Restore this process's random states (a process the run did not have starts from process 0's)."""
    if not (folder / f"rng-{process}.json").exists():
        process = 0
    record = _read_json(folder / f"rng-{process}.json")
    try:
        version, internal, gauss = record["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = record["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"{folder / f'rng-{process}.json'} is not a random state aksis wrote ({err})") from None
    tensors = _read_tensors(folder / f"rng-{process}.safetensors")
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "mps" in tensors and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["mps"])


# ----- files -----


def _write_json(path: Path, data: Any) -> None:
    try:
        text = json.dumps(data, indent=1, allow_nan=True)
    except TypeError as err:  # a value of a kind JSON cannot hold: a bug here, not the user's
        raise StateError(f"cannot write {path.name}: {err}") from None
    path.write_text(text + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"{path} is missing: the training state is incomplete; resume from another step") from None
    except (OSError, ValueError, RecursionError) as err:
        raise StateError(f"{path} cannot be read ({err}): the training state is damaged") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise StateError(f"{path} is missing: the training state is incomplete; resume from another step") from None
    except (OSError, SafetensorError, ValueError) as err:
        raise StateError(f"{path} cannot be read ({err}): the training state is damaged") from None
