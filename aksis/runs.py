"""A training run's folder: its layout, the one reader of its metrics log, and its step checkpoints.

    output_dir/
      metrics.jsonl        one JSON record per log step and per evaluation (copied into each checkpoint)
      step-000500/         a checkpoint folder (aksis.checkpoint) plus training_state/:
        training_state/    optimizer, LR schedule and RNG (aksis.training_state) + trainer_state.json
      best/                the checkpoint with the lowest validation loss so far (no training state)

`RunFolder` is what the trainer writes through: metrics records appended as they come (and trimmed back to the
step a resumed run continues from), the best model, and step checkpoints with the training state of every process
(in safetensors and JSON: aksis.training_state), assembled under a temporary name and renamed into place (so an
interrupted save never leaves a half-written step-N), only the newest `keep_last` kept. Only the main process
writes files (each process its own random state). It also answers the questions asked before a run starts: which
checkpoint `--resume` means, and whether the folder holds another run's checkpoints. `read_metrics` is the one
reader of metrics.jsonl, for the trainer, the model card and the app.

What may be said of a run in public (a model card, a pushed training state): `public_settings` leaves out the
settings that are places of this machine (PLACES) and names datasets, tokenizers and checkpoints by `public_name`:
a Hub id or a name as it is, a local path by its base name (a file's name may say what the data is, never where it
lives).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import pickle
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aksis import training_state
from aksis.checkpoint import (
    BEST_DIR,
    CONFIG_FILE,
    STEP_PREFIX,
    CheckpointError,
    load_weights,
    read_model_config,
    save_checkpoint,
)
from aksis.config import BOOKKEEPING, ModelConfig
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAINING_STATE_DIR = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(rf"^{STEP_PREFIX}(\d+)$")
# What an interrupted save, push or clean-up leaves in a run folder when the process is killed at the wrong moment:
# the temporary folders of save_checkpoint (best/ and a step being assembled), a step being assembled, a push's
# snapshot (hub.stage_checkpoint) and an old step being deleted (keep_last). Those named after a process (its pid)
# are left alone while that process lives: it may still be writing them.
LEFTOVER = re.compile(
    r"^\.(?:"
    rf"(?:{BEST_DIR}|{STEP_PREFIX}\d+|\.{STEP_PREFIX}\d+\.tmp)\.(?:tmp|old)-(?P<saving>\d+)-[0-9a-f]+"
    rf"|{STEP_PREFIX}\d+\.tmp"
    rf"|(?:{BEST_DIR}|{STEP_PREFIX}\d+)\.push-(?P<pushing>\d+)-\d+"
    rf"|{STEP_PREFIX}\d+\.deleting-(?P<deleting>\d+)-[0-9a-f]+"
    r")$"
)
# Settings that say where things are on the machine that trained, not how it trained: never pushed.
PLACES = ("output_dir", "data_cache", "resume")


class RunError(Exception):
    """A run folder cannot be used as asked; the message says what to do."""


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def is_local_path(value: str) -> bool:
    """Whether `value` names a place on this machine (an existing path, an absolute or relative path, a glob)
    rather than a Hub id (user/name) or a name (shakespeare)."""
    if Path(value).expanduser().exists() or glob.has_magic(value):
        return True
    name = value.split("@", 1)[0]  # a Hub id may carry a revision, which may hold slashes: user/name@refs/pr/1
    return value.startswith((".", "/", "~")) or "\\" in value or name.count("/") > 1 or os.path.isabs(value)


def public_name(value: str) -> str:
    """A dataset, tokenizer or checkpoint as a pushed file may name it: a Hub id or a name as it is; a local path by
    its base name (with its parent for a run's best/ or step-N/ checkpoint, whose own name says nothing)."""
    if not is_local_path(value):
        return value
    path = Path(value.rstrip("/\\"))
    if path.name == BEST_DIR or STEP_DIR.match(path.name):
        return f"{path.parent.name}/{path.name}"
    return path.name


def public_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's settings (TrainConfig's, or evaluate's) without the places of PLACES, every path by its public name."""
    return {k: public_value(v) for k, v in settings.items() if k not in PLACES}


def public_value(value: Any) -> Any:
    """`value` with each string that is a local path replaced by its public name, in lists and mappings too."""
    if isinstance(value, str):
        return public_name(value) if is_local_path(value) else value
    if isinstance(value, list):
        return [public_value(v) for v in value]
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    return value


def step_checkpoints(run: str | Path) -> list[Path]:
    """The resumable step-N checkpoints of a run folder (those with a training state), oldest first."""
    run = Path(run)
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if STEP_DIR.match(p.name) and (p / TRAINING_STATE_DIR).is_dir()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name)[1]))  # type: ignore[index]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, given as the file or the run or checkpoint folder holding it ([] when there is
    none). A line that is not a JSON record of a step is skipped: the trainer may be writing the last line as it is
    read, and a run killed mid-write leaves a cut one. A path is taken for the file by its .jsonl name, not by what is
    on disk: a run folder a trainer creates between a check and the read must not be read as the file."""
    path = Path(path)
    path = path if path.suffix == ".jsonl" else path / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """What trainer_state.json of a step checkpoint holds: the run's state, its context and its settings."""
    record: dict[str, Any] = json.loads((checkpoint / TRAINING_STATE_DIR / TRAINER_STATE_FILE).read_text())
    return record


class RunFolder:
    """The folder of one training run (see the module docstring). Only the main process of a run writes to it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.base_model: str | None = None  # the Hub model the run fine-tunes, written into its checkpoints
        self.metrics = self.path / METRICS_FILE
        self.best = self.path / BEST_DIR

    def step_dir(self, step: int) -> Path:
        return self.path / step_name(step)

    # ----- before a run -----

    def resume_point(self, resume: str | Path) -> Path:
        """The step checkpoint `--resume` names: "latest" (or "auto") is the newest in this folder; anything else is
        a step checkpoint's own folder (a Hub one already downloaded)."""
        if resume in ("latest", "auto"):
            found = step_checkpoints(self.path)
            if not found:
                raise RunError(
                    f"nothing to resume in {self.path}: it has no step-N checkpoint with a {TRAINING_STATE_DIR}/ "
                    "folder. Start without --resume, or give --output-dir of the run to continue"
                )
            return found[-1]
        path = Path(resume).expanduser()
        if not (path / TRAINING_STATE_DIR / TRAINER_STATE_FILE).is_file():
            raise RunError(
                f"cannot resume from {resume}: it is not a step-N checkpoint with a {TRAINING_STATE_DIR}/ folder "
                f"(only those are resumable; use --init-from to start a new run from a model)"
            )
        return path

    def check_new_run(self, overwrite: bool) -> None:
        """Never overwrite another run's checkpoints by accident: refuse a folder that holds them, or with
        `overwrite` delete them (and the metrics log)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--output-dir {self.path} is a file; give a folder")
        existing = [p for p in (*step_checkpoints(self.path), self.best) if (p / CONFIG_FILE).exists()]
        if not existing:
            return
        if not overwrite:
            earlier = read_model_config(existing[-1] / CONFIG_FILE)
            raise RunError(
                f"--output-dir {self.path} already holds the checkpoints of a run "
                f"({', '.join(p.name for p in existing)}; model {earlier.describe()}). Continue it with --resume, "
                "replace it with --overwrite, or choose another --output-dir"
            )
        log.warning("--overwrite: deleting the earlier run's checkpoints in %s", self.path)
        for path in existing:
            shutil.rmtree(path)
        self.metrics.unlink(missing_ok=True)

    def remove_leftovers(self) -> list[str]:
        """Remove what interrupted saves, pushes and clean-ups of earlier runs left in this folder (LEFTOVER: only
        those kinds, never anything else); the names removed."""
        if not self.path.is_dir():
            return []
        removed = []
        for path in sorted(self.path.iterdir()):
            match = LEFTOVER.match(path.name)
            if match is None or not path.is_dir() or path.is_symlink():
                continue
            pid = next((int(p) for p in match.groups() if p is not None), None)
            if pid is not None and _alive(pid):
                continue  # a save or push in progress (this process's own included: a push thread may be at it)
            try:
                shutil.rmtree(path)
            except OSError as err:  # a leftover that cannot go is no reason to stop a run
                log.warning("could not remove %s, left by an interrupted save: %s", path, err)
                continue
            removed.append(path.name)
        if removed:
            log.warning("removed what interrupted saves left in %s: %s", self.path, ", ".join(removed))
        return removed

    # ----- the metrics log -----

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def continue_log(self, resumed_from: Path | None, step: int) -> None:
        """Start the log of a session: a run resumed elsewhere brings its checkpoint's log along, and records past
        the resumed step (written after the checkpoint it continues from) are dropped."""
        self.path.mkdir(parents=True, exist_ok=True)
        history = resumed_from / METRICS_FILE if resumed_from is not None else None
        if history is not None and history.is_file() and not self.metrics.exists():
            shutil.copy(history, self.metrics)
        if self.metrics.exists():
            kept = [r for r in read_metrics(self.metrics) if int(r["step"]) <= step]
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    # ----- step checkpoints -----

    def save_model(
        self, acc: Accelerator, model: torch.nn.Module, config: ModelConfig, tokenizer: Tokenizer, target: Path
    ) -> None:
        """The model as a checkpoint folder at `target`, with the metrics so far; its weights are gathered first when
        they are sharded. Every process calls it."""
        if _sharded(acc):
            state_dict = acc.get_state_dict(model)  # collective: every process calls it
            plain = GPT(config)
            if acc.is_main_process:
                plain.load_state_dict(state_dict)
        else:
            plain = acc.unwrap_model(model, keep_torch_compile=False)
        if acc.is_main_process:
            save_checkpoint(plain, target, tokenizer=tokenizer, base_model=self.base_model)
            shutil.copy(self.metrics, target / METRICS_FILE)
        acc.wait_for_everyone()

    def save_step(
        self,
        acc: Accelerator,
        trained: Trained,
        config: ModelConfig,
        tokenizer: Tokenizer,
        step: int,
        state: dict[str, Any],
        keep_last: int,
    ) -> Path:
        """A resumable step-N checkpoint: the model's files, the metrics, the training state of every process, and
        the trainer's `state` (trainer_state.json). Every process calls it; its path."""
        staged = self.staging(step, empty=acc.is_main_process)
        acc.wait_for_everyone()
        self.save_model(acc, trained.model, config, tokenizer, staged)
        folder = staged / TRAINING_STATE_DIR
        if _sharded(acc):  # the optimizer state is sharded: accelerate gathers it (format 1, with pickles)
            with _quiet("accelerate"):  # it logs every file it writes, and warns about our (intended) tied weights
                acc.save_state(str(folder))
            state_format = 1
        else:
            if acc.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                training_state.save_optimizer(trained.optimizer, folder)
                training_state.save_scheduler(trained.scheduler, folder)
            acc.wait_for_everyone()
            training_state.save_rng(folder, acc.process_index)
            state_format = training_state.STATE_FORMAT
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.commit(staged, step, {**state, "state_format": state_format}, keep_last)
        acc.wait_for_everyone()
        return self.step_dir(step)

    def load_step(
        self, acc: Accelerator, trained: Trained, checkpoint: Path, settings: dict[str, Any], from_hub: bool = False
    ) -> dict[str, Any]:
        """Restore the training state of every process from a step checkpoint; what its trainer_state.json holds. A
        state with pickles (format 1: older aksis, or a sharded run) loads from a local folder with a warning and is
        refused from the Hub (`from_hub`), where a crafted pickle could run code. A warning names the `settings`
        (TrainConfig's) that differ from those the run was saved with, other than its bookkeeping
        (config.BOOKKEEPING: where it keeps its files, what it reports and where it pushes)."""
        folder = checkpoint / TRAINING_STATE_DIR
        if not folder.is_dir():
            raise RunError(f"{checkpoint} has no {TRAINING_STATE_DIR}/: it is not a resumable step checkpoint")
        if training_state.is_pickled(folder):
            if from_hub:
                raise RunError(
                    "this training state from the Hub holds pickles (saved by an older aksis, or by a sharded run), "
                    "which can run code when loaded: aksis loads those only from your own folders. If you trust the "
                    "repo, download it and resume from the folder"
                )
            log.warning(
                "%s holds pickles (saved by an older aksis, or by a sharded run): loading it as a trusted file of your "
                "own; the next save writes safetensors and JSON",
                folder,
            )
            try:
                with _quiet("accelerate"):
                    acc.load_state(str(folder))
            except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
                raise RunError(f"{folder} cannot be read ({err}): resume from another step checkpoint") from None
        elif _sharded(acc):
            raise RunError(f"{checkpoint} was saved by a run that was not sharded; resume it without FSDP or DeepSpeed")
        else:
            try:
                load_weights(acc.unwrap_model(trained.model, keep_torch_compile=False), checkpoint)
                training_state.load_optimizer(trained.optimizer, folder)
                training_state.load_scheduler(trained.scheduler, folder)
                training_state.load_rng(folder, acc.process_index)
            except (training_state.StateError, CheckpointError) as err:
                raise RunError(str(err)) from None
        record = read_trainer_state(checkpoint)
        # Compared in their public form: a training state pushed to the Hub names its dataset by its base name.
        before, now = public_settings(record.get("train_config") or {}), public_settings(settings)
        changed = [
            f"{k}: {before[k]!r} -> {v!r}"
            for k, v in now.items()
            if k in before and before[k] != v and k not in BOOKKEEPING
        ]
        if changed:
            log.warning("resuming with changed settings (the run will not match an uninterrupted one): %s", changed)
        return record

    def staging(self, step: int, empty: bool = True) -> Path:
        """The folder the checkpoint of `step` is assembled in before `commit`; with `empty`, what an interrupted
        save left there is removed first."""
        staged = self.path / f".{step_name(step)}.tmp"
        if empty and staged.exists():
            shutil.rmtree(staged)
        return staged

    def commit(self, staged: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
        """Write the trainer's `state` into a staged checkpoint, rename it into place as step-N, and remove older
        step checkpoints beyond the newest `keep_last`; the checkpoint's path."""
        (staged / TRAINING_STATE_DIR / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        final = self.step_dir(step)
        if final.exists():
            _delete(final)
        os.rename(staged, final)
        for old in step_checkpoints(self.path)[:-keep_last]:
            _delete(old)
        return final


def _delete(folder: Path) -> None:
    """Delete a step checkpoint: renamed out of the way first, so that a kill during the deletion leaves a leftover
    the next run removes (LEFTOVER), never a half-deleted step-N that looks like a checkpoint."""
    trash = folder.with_name(f".{folder.name}.deleting-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(folder, trash)
    shutil.rmtree(trash)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (on POSIX; elsewhere, where signal 0 is not a question, it is taken as ended)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@dataclass
class Trained:
    """What a step checkpoint saves the state of, besides the trainer's own record."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def _sharded(acc: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
