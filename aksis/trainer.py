"""The training loop, on `accelerate.Accelerator`: one code path for a laptop CPU, one GPU, or many processes
launched with `accelerate launch` (DDP, FSDP, DeepSpeed: accelerate's job, not ours).

A run is described by one `TrainConfig` and lives in one run folder (aksis.runs: metrics.jsonl, step-N/ checkpoints
with their training state, best/). Around the loop: the data (aksis.blocks), the loss (aksis.losses), the optimizer
and schedule (aksis.optim), pushes to the Hub (aksis.hub.PushSchedule). Notable choices:

- Data order comes from (seed, epoch) alone and the data position is counted in batches, so a resumed run
  skips exactly what it has seen and its losses equal those of an uninterrupted run.
- A NaN/inf loss stops the run without the optimizer applying it, leaving the checkpoints on disk intact. On one
  process with a fused optimizer (AdamW, Adam: the default on CPU and CUDA) the step's loss stays on the device,
  which skips the update of a non-finite loss by itself (the optimizer's `found_inf`, as a gradient scaler uses
  it); the host reads the losses only when it needs them (at log steps, before an evaluation or a save, at the
  end), so a GPU step waits for nothing. Otherwise (SGD, Muon, fp16, DeepSpeed, several processes) every step
  reads its loss before the update. Several processes also reduce the loss, a stop flag and the clock at every
  step, so that all agree on when to stop.
- Only the main process writes files.
- The LR scheduler is stepped here, once per optimizer step (not through `accelerator.prepare`, which would
  step it once per process). Step checkpoints hold the optimizer, schedule and RNG state in safetensors and JSON
  (aksis.training_state), so resuming never unpickles; a sharded run (FSDP, DeepSpeed) saves accelerate's state.
- A wall-clock budget (`max_time`) counts the seconds spent in the training loop (steps, evaluations, saves;
  not the setup before it, but a `torch.compile` happens in the first steps and counts), over all sessions of
  a run: the time already spent is saved with the run's state, so a resumed run gets what is left (raise
  --max-time to extend it). The run ends at the end of the step during which the budget runs out, then
  evaluates and saves as after any limit. The cosine decay then follows the share of the budget spent (or of
  the steps, when a step, token or epoch limit comes first; see `lr_factor`), so it reaches its floor when the
  run ends. The clock is averaged across processes at every step, so all agree on the learning rate and on
  when to stop. Such a run depends on the machine's speed: unlike a run limited by steps, it is not
  reproducible step for step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from tqdm.auto import tqdm

from aksis.blocks import EpochSampler, PackedBlocks, StreamingBlocks, TrainData, build_data
from aksis.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    base_model_of,
    load_gpt,
    load_tokenizer,
    read_model_config,
    resolve_file,
)
from aksis.config import ModelConfig, TrainConfig
from aksis.corpora import DataError
from aksis.device import DeviceError, pick_device
from aksis.hub import HubError, PushSchedule, download_checkpoint, is_hub_id
from aksis.losses import NonFiniteLoss, StepLosses, batch_loss, inputs_and_targets, target_loss_sums
from aksis.model import GPT
from aksis.optim import lr_factor, make_optimizer
from aksis.quantize import quantization_of
from aksis.runs import RunError, RunFolder, Trained, read_trainer_state, step_checkpoints
from aksis.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class TrainingError(Exception):
    """A run could not start or had to stop; the message says why and what to do."""


@dataclass
class RunState:
    """Where a run is; saved with every checkpoint so `--resume` continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # batches this process has consumed in the current epoch (or stream blocks / batch)
    tokens: int = 0  # training tokens seen, all processes together
    elapsed: float = 0.0  # seconds of training steps, over all sessions of the run
    clock: float = 0.0  # seconds in the training loop (steps, evaluations, saves), all sessions: what max_time counts
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0


@dataclass
class TrainResult:
    steps: int
    tokens: int
    stopped: str  # why the run ended: "max_steps", "epochs", "max_tokens", "max_time", "early stopping", "interrupted"
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_val_loss: float | None
    push_errors: list[str] = dataclasses.field(default_factory=list)  # pushes that failed after their retries


class Trainer:
    """Builds everything a run needs from a `TrainConfig` (data, tokenizer, model, optimizer, accelerator);
    `train()` runs it. `request_stop()` (also wired to SIGINT/SIGTERM) ends it at the next step with a
    resumable checkpoint."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.run = RunFolder(config.output_dir)
        self._stop_requested = False  # asked for here (a signal, the app); may differ between processes
        self._stop_agreed = False  # what all processes know of the requests, as of the last step
        self.losses = StepLosses()
        self.accelerator = acc = _accelerator(config)
        if not acc.is_main_process:
            logging.getLogger("aksis").setLevel(logging.WARNING)
        if acc.is_main_process:  # what saves and pushes of a killed run left in this folder
            self.run.remove_leftovers()
        self.resume_from = _resume_point(config, self.run, acc)
        # Only the main process writes files and pushes.
        self.pushes = _check_destinations(config, self.run, self.resume_from) if acc.is_main_process else None
        acc.wait_for_everyone()

        set_seed(config.seed)
        start = _starting_point(config, self.resume_from)
        self.run.base_model = start.base_model
        self.block_size = start.block_size
        with acc.main_process_first():  # the main process tokenizes and caches; the others read its cache
            self.data: TrainData = _data(config, start.block_size, start.tokenizer)
        self.tokenizer: Tokenizer = self.data.tokenizer
        model_config = start.config
        if start.tokenizer is None:  # a new model: its vocabulary is the tokenizer's
            model_config = dataclasses.replace(model_config, vocab_size=self.tokenizer.vocab_size)
        set_seed(config.seed)  # the same initial weights whatever the data preparation consumed
        self.model = GPT(model_config)
        if start.weights is not None:
            self.model.load_state_dict(start.weights.state_dict())
        self.model_config = model_config
        log.info(
            "model: %s, %.2fM parameters; tokenizer: %s (%d tokens)",
            model_config.describe(),
            self.model.num_params() / 1e6,
            self.tokenizer.name,
            self.tokenizer.vocab_size,
        )

        self._fused = acc.device.type in ("cuda", "cpu") and config.optimizer != "sgd"
        self.optimizer = make_optimizer(self.model, config, fused=self._fused)
        # Where the optimizer itself can skip a non-finite step, the loss need not reach the host every step.
        self._skips_on_device = (
            self._fused
            and config.optimizer != "muon"  # Muon's update of the matrices does not skip on `found_inf`
            and acc.distributed_type == DistributedType.NO
            and config.mixed_precision != "fp16"
        )
        if config.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        train = self.data.train
        self.sampler = EpochSampler(len(train), config.seed) if isinstance(train, PackedBlocks) else None
        if isinstance(train, StreamingBlocks):  # each process reads its own share of the stream
            train.rank, train.world_size = acc.process_index, acc.num_processes
        pin = acc.device.type == "cuda"
        self.train_loader = _loader(
            train, config.batch_size, pin, sampler=self.sampler, drop_last=self.sampler is not None
        )
        val_loader = _loader(self.data.validation, config.batch_size, pin)
        self.model, self.optimizer, self.val_loader = acc.prepare(self.model, self.optimizer, val_loader)
        if self.sampler is not None:
            self.train_loader = acc.prepare(self.train_loader)
        self.total_steps = self._total_steps()
        self.state = RunState()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step, config.warmup_steps, self.total_steps, config.min_lr_ratio, self._budget_spent()
            ),
        )
        acc.register_for_checkpointing(self.scheduler)  # for a sharded run's state, which accelerate saves
        if self.resume_from is not None:
            self._load(self.resume_from)
        self._clock = _Clock(self.state.clock)

    # ----- setup -----

    def _total_steps(self) -> int | None:
        """The length of the run in optimizer steps: the first limit reached among steps, tokens, epochs (None
        for a stream bounded by --max-time alone)."""
        config = self.config
        limits = [config.max_steps] if config.max_steps else []
        if config.max_tokens:
            limits.append(math.ceil(config.max_tokens / self.tokens_per_step))
        if isinstance(self.data.train, PackedBlocks):
            limits.append(config.epochs * self.steps_per_epoch)
            if self.steps_per_epoch == 0:
                raise TrainingError(
                    f"the training split has {len(self.data.train)} blocks of {self.block_size} tokens, "
                    f"fewer than one optimizer step needs ({self.config.batch_size} per batch x "
                    f"{config.grad_accum_steps} accumulation x {self.accelerator.num_processes} processes): "
                    "give more text, or lower --batch-size or --block-size"
                )
        elif not limits and not config.max_time:
            raise TrainingError("a streamed dataset has no epochs: give --max-steps or --max-tokens (or --max-time)")
        return min(limits, default=None)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader) // self.config.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step, all processes together."""
        cfg = self.config
        return cfg.batch_size * cfg.grad_accum_steps * self.accelerator.num_processes * self.block_size

    def _budget_spent(self) -> float:
        """The share of --max-time spent, by the clock all processes agreed on at the last step (0 without one)."""
        return self.state.clock / self.config.max_time if self.config.max_time else 0.0

    # ----- the loop -----

    def request_stop(self) -> None:
        """End the run after the current step, saving a resumable checkpoint (thread- and signal-safe)."""
        self._stop_requested = True

    def train(self) -> TrainResult:
        acc, config, state = self.accelerator, self.config, self.state
        if config.report_to != "none":
            acc.init_trackers("aksis", config={k: v for k, v in config.to_dict().items() if v is not None})
        if acc.is_main_process:
            self.run.continue_log(self.resume_from, state.step)
        log.info(
            "training for %s, %d tokens a step, on %s (%d process%s, %s)",
            self._length(),
            self.tokens_per_step,
            acc.device,
            acc.num_processes,
            "" if acc.num_processes == 1 else "es",
            acc.distributed_type.value,
        )
        last_saved = last_eval = state.step if self.resume_from is not None else None
        stopped = self._limit_reached()
        timed = config.max_time is not None  # the progress bar counts seconds of the budget, else steps
        progress = tqdm(
            total=round(config.max_time) if config.max_time else self.total_steps,
            initial=min(int(state.clock), round(config.max_time)) if config.max_time else state.step,
            desc="training",
            unit="s" if timed else "step",
            disable=not (config.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        self.model.train()
        batches = self._batches()
        window_start, window_tokens = time.perf_counter(), 0
        self._clock = _Clock(state.clock)
        with _signals_request_stop(self.request_stop):
            while not stopped:
                started = time.perf_counter()
                if not self._train_step(batches):  # the epoch is over
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                    stopped = "epochs" if state.epoch >= config.epochs else ""
                    batches = self._batches()
                    continue
                state.step += 1
                state.tokens += self.tokens_per_step
                window_tokens += self.tokens_per_step
                progress.update(min(int(state.clock), progress.total) - progress.n if timed else 1)
                stopped = self._limit_reached() or ("interrupted" if self._stop_agreed else "")
                evaluate = not stopped and state.step % config.eval_every == 0
                save = not stopped and state.step % (config.save_every or config.eval_every) == 0
                logged = state.step % config.log_every == 0 or state.step == 1
                if logged or stopped or evaluate or save:
                    loss = self._read_losses()  # stops here if a loss since the last read was not finite
                state.elapsed += time.perf_counter() - started  # (a read waits for the steps it reads)

                # Once in a while: log the training loss, evaluate (keeping the best model), save a checkpoint.
                if logged:
                    now = time.perf_counter()
                    speed = window_tokens / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, 0
                    lr = float(self.scheduler.get_last_lr()[0])
                    extra = {"step": state.step} if timed else {}
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}", **extra)
                    self._log({"loss": loss, "lr": lr, "tokens_per_s": speed})
                if evaluate:
                    self._evaluate()
                    last_eval = state.step
                    if config.patience and state.evals_since_best >= config.patience:
                        stopped = "early stopping"
                if save and not stopped:
                    self._save_checkpoint()
                    last_saved = state.step
                if last_eval == state.step or last_saved == state.step:  # tokens/s counts training time only
                    window_start, window_tokens = time.perf_counter(), 0
        progress.close()

        # The end: the last losses, a final evaluation and checkpoint, the pushes.
        self._read_losses()  # an epoch can end between two reads
        if stopped != "interrupted" and last_eval != state.step:
            self._evaluate()
        if last_saved != state.step:
            self._save_checkpoint(final=True)
            last_saved = state.step
        push_errors: list[str] = []
        if self.pushes is not None:
            latest = self.run.step_dir(state.step)
            push_errors = self.pushes.finish(latest, state.step, self.run.best, state.best_step, state.best_val_loss)
        acc.end_training()
        last = self.run.step_dir(last_saved) if last_saved is not None else None
        if stopped == "interrupted":
            log.info("stopped at step %d; continue with --resume (the checkpoint is %s)", state.step, last)
        return TrainResult(
            steps=state.step,
            tokens=state.tokens,
            stopped=stopped,
            last_checkpoint=last,
            best_checkpoint=self.run.best if (self.run.best / CONFIG_FILE).exists() else None,
            best_val_loss=state.best_val_loss,
            push_errors=push_errors,
        )

    def _limit_reached(self) -> str:
        """Which limit of the run is reached ("" while none is): steps, tokens, the epochs, or the time budget."""
        config, state = self.config, self.state
        if config.max_steps and state.step >= config.max_steps:
            return "max_steps"
        if config.max_tokens and state.tokens >= config.max_tokens:
            return "max_tokens"
        if self.total_steps is not None and state.step >= self.total_steps:
            return "epochs"
        if config.max_time and state.clock >= config.max_time:
            log.info("the time budget of %s is spent after %d steps", _seconds(config.max_time), state.step)
            return "max_time"
        return ""

    def _length(self) -> str:
        """The planned length of the run, for the log."""
        if self.config.max_time is None:
            return f"{self.total_steps} steps"
        budget = _seconds(self.config.max_time)
        return budget if self.total_steps is None else f"{budget} (or {self.total_steps:,} steps if they end first)"

    def _batches(self) -> Iterator[torch.Tensor]:
        """This epoch's batches, from the current data position."""
        done = self.state.batches_in_epoch
        if self.sampler is None:  # a stream: skip the blocks already read
            assert isinstance(self.data.train, StreamingBlocks)
            self.data.train.skip = done * self.config.batch_size
            return iter(self.train_loader)
        self.sampler.epoch = self.state.epoch
        # Stop at a whole number of optimizer steps: a partial accumulation would not be a full step.
        usable = self.steps_per_epoch * self.config.grad_accum_steps
        batches = iter(self._epoch_loader())
        return (batch for _, batch in zip(range(max(usable - done, 0)), batches, strict=False))

    def _epoch_loader(self) -> torch.utils.data.DataLoader:
        """The training loader of this epoch, past the batches already read (of a resumed epoch)."""
        done = self.state.batches_in_epoch
        if not done:
            return self.train_loader
        loader = self.accelerator.skip_first_batches(self.train_loader, done)
        # accelerate's copy of the loader forgets its non-blocking copies to the device; keep them.
        if hasattr(loader, "_non_blocking"):
            loader._non_blocking = self.train_loader._non_blocking  # type: ignore[attr-defined]
        return loader

    def _train_step(self, batches: Iterator[torch.Tensor]) -> bool:
        """One optimizer step over `grad_accum_steps` batches (False, and no step, when the epoch has no full step
        left). Its mean loss over all the batches and processes joins `_unread`."""
        acc, config = self.accelerator, self.config
        batch_losses = []
        for _ in range(config.grad_accum_steps):
            batch = next(batches, None)
            if batch is None:
                return False
            batch = batch.to(acc.device, non_blocking=True)
            self.state.batches_in_epoch += 1
            with acc.accumulate(self.model):
                loss = batch_loss(self.model, batch)
                batch_losses.append(loss.detach().float())
                read = self._note_loss(torch.stack(batch_losses).mean()) if acc.sync_gradients else None
                acc.backward(loss)
                if read is not None:
                    # Read after the backward pass is queued, so that a GPU is not left idle while the host waits for
                    # the loss; still before the optimizer applies anything.
                    mean_loss, stop, self.state.clock = read()
                    self.losses.add(self.state.step + 1, torch.tensor(mean_loss))
                    self._read_losses()
                    self._stop_agreed = stop > 0
                if acc.sync_gradients and config.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if self._skips_on_device:  # one process: its own request and clock, as the step ends
            self._stop_agreed, self.state.clock = self._stop_requested, self._clock()
        self.scheduler.step()
        return True

    def _note_loss(self, step_loss: torch.Tensor) -> Callable[[], list[float]] | None:
        """Before the backward pass of a step's last batch: where the optimizer skips a non-finite step by itself,
        keep the step's loss on the device (None). Otherwise start the one reduction of the step, whose result
        (mean loss, any stop request, the mean of the processes' clocks) the returned function waits for."""
        acc = self.accelerator
        if self._skips_on_device:
            self.optimizer.optimizer.found_inf = (~torch.isfinite(step_loss)).float()  # type: ignore[attr-defined]
            self.losses.add(self.state.step + 1, step_loss)
            return None
        stop = torch.tensor(float(self._stop_requested), device=acc.device)
        local = torch.stack([step_loss, stop, torch.tensor(self._clock(), device=acc.device)])
        return StepLosses.copy_to_host(acc.reduce(local, "sum") / acc.num_processes)

    def _read_losses(self) -> float:
        """The loss of the last step, reading those of the steps since the last read (one wait for the device);
        stops the run at the first that is not finite (the optimizer has skipped its update)."""
        try:
            return self.losses.read()
        except NonFiniteLoss as bad:
            last = step_checkpoints(self.run.path)
            kept = f"the last good checkpoint, {last[-1]}, is intact" if last else "no checkpoint had been saved yet"
            if bad.step < self.state.step:  # read late: the optimizer skipped that update, and the steps since went on
                stopped = f"its update was skipped, and the run stopped at step {self.state.step} without saving"
            else:
                stopped = "stopped without applying it"
            self.accelerator.end_training()
            raise TrainingError(
                f"{bad}; {stopped} ({kept}). Lower --learning-rate, keep --grad-clip on, or use bf16 instead of fp16"
                + (", then --resume" if last else "")
            ) from None

    # ----- evaluation -----

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss per trained target token (every token for text, the assistant's for chat) over
        (at most) `eval_batches` batches per process, all processes together."""
        acc = self.accelerator
        self.model.eval()
        sums, counts = [], []
        for i, batch in enumerate(self.val_loader):
            if i >= self.config.eval_batches:
                break
            inputs, targets = inputs_and_targets(batch)
            logits, _ = self.model(inputs)
            block_sums, block_counts = target_loss_sums(logits, targets)
            sums.append(acc.gather_for_metrics(block_sums))
            counts.append(acc.gather_for_metrics(block_counts))
        self.model.train()
        # build_data guarantees trained targets in the validation split, but the first eval_batches might hold
        # none (a long chat prompt): max(count, 1) then reports 0 rather than NaN.
        return (torch.cat(sums).sum() / torch.cat(counts).sum().clamp(min=1)).item()

    def _evaluate(self) -> None:
        """Evaluate, log, and keep the best checkpoint."""
        state = self.state
        val_loss = self.evaluate()
        improved = state.best_val_loss is None or val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
        else:
            state.evals_since_best += 1
        self._log({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        log.info("step %d: validation loss %.4f%s", state.step, val_loss, " (best)" if improved else "")
        if improved:
            self.run.save_model(self.accelerator, self.model, self.model_config, self.tokenizer, self.run.best)

    # ----- the run folder -----

    def _log(self, values: dict[str, float]) -> None:
        state = self.state
        self.accelerator.log(values, step=state.step)
        if self.accelerator.is_main_process:
            self.run.log({"step": state.step, "tokens": state.tokens, **values, "elapsed": round(state.elapsed, 3)})

    @property
    def _trained(self) -> Trained:
        return Trained(self.model, self.optimizer, self.scheduler)

    def _save_checkpoint(self, final: bool = False) -> None:
        """A resumable step-N checkpoint (and its push)."""
        acc, state = self.accelerator, self.state
        # The time spent includes this step's evaluation and this save (all but renaming it into place).
        record = {
            "state": {**dataclasses.asdict(state), "clock": max(state.clock, self._clock())},
            "block_size": self.block_size,
            "train_config": self.config.to_dict(),
        }
        args = (acc, self._trained, self.model_config, self.tokenizer, state.step, record, self.config.keep_last)
        checkpoint = self.run.save_step(*args)
        if self.pushes is not None:
            self.pushes.saved(checkpoint, state.step, last=final)
        log.info("saved %s", checkpoint)

    def _load(self, checkpoint: Path) -> None:
        try:
            record = self.run.load_step(
                self.accelerator, self._trained, checkpoint, self.config.to_dict(), from_hub=_from_hub(self.config)
            )
        except RunError as err:
            raise TrainingError(str(err)) from None
        if self.config.optimizer != "sgd":
            # Loading replaces the param groups, "fused" included: the kernel is this run's choice, not the saved one's
            # (a run saved before CPU runs were fused would otherwise lose the fused step, and with it `found_inf`).
            for group in self.optimizer.param_groups:
                group["fused"] = self._fused
        self.state = RunState(**record["state"])
        log.info("resumed from %s at step %d", checkpoint, self.state.step)


# ----- setup -----


def _from_hub(config: TrainConfig) -> bool:
    """Whether --resume names a checkpoint on the Hub (pushed with --push-training-state)."""
    return config.resume is not None and config.resume not in ("latest", "auto") and is_hub_id(config.resume)


def _resume_point(config: TrainConfig, run: RunFolder, acc: Accelerator) -> Path | None:
    """The step checkpoint --resume names: in the run folder, a local one, or one pushed to the Hub."""
    resume = config.resume
    if resume is None:
        return None
    if _from_hub(config):
        with acc.main_process_first():  # one download; the others read the Hub cache
            try:
                resume = str(download_checkpoint(resume))
            except HubError as err:
                raise TrainingError(str(err)) from err
    try:
        return run.resume_point(resume)
    except RunError as err:
        raise TrainingError(str(err)) from err


def _check_destinations(config: TrainConfig, run: RunFolder, resume_from: Path | None) -> PushSchedule | None:
    """Before anything is built: a new run's folder must not hold another run's checkpoints, and a Hub repo to push
    to must be writable (fail now, not after hours of training); the run's push schedule, if it pushes."""
    try:
        if resume_from is None:
            run.check_new_run(config.overwrite)
        if not config.push_to_hub:
            return None
        assert config.hub_model_id is not None  # TrainConfig checks it
        arch = config.arch or ModelConfig.from_preset(config.preset).arch
        return PushSchedule.open(
            config.hub_model_id,
            private=config.hub_private,
            arch=arch if config.init_from is None and resume_from is None else None,  # else: the checkpoint's
            every=config.push_every,
            training_state=config.push_training_state,
            license=config.hub_license,
            train_config=config.to_dict(),
            move_tags=config.overwrite or resume_from is not None,  # this run's own tags, or another's it replaces
        )
    except RunError as err:
        raise TrainingError(str(err)) from err
    except HubError as err:
        raise TrainingError(f"{err} (or train without --push-to-hub)") from err


def _loader(data: torch.utils.data.Dataset, batch_size: int, pin: bool, **options: Any) -> torch.utils.data.DataLoader:
    """A loader from pinned host memory on a GPU (`pin`: a batch's copy to the device then runs beside the work already
    queued), with its own generator: without one, each new iterator draws from the global RNG, and a resumed run
    (which starts its iterator at a different moment) would see different dropout masks."""
    generator = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, generator=generator, pin_memory=pin, **options)


class _Clock:
    """Seconds spent in the training loop, this session and earlier ones (this process's own count): what
    --max-time counts."""

    def __init__(self, spent: float) -> None:
        self.spent, self.started = spent, time.perf_counter()

    def __call__(self) -> float:
        return self.spent + time.perf_counter() - self.started


def _accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator: on the device --device names (the best there is for auto), or the devices of an
    `accelerate launch`."""
    try:
        cpu = pick_device(config.device).type == "cpu"
    except DeviceError as err:
        raise TrainingError(f"--device: {err}") from err
    if config.mixed_precision == "fp16" and cpu:
        raise TrainingError("--mixed-precision fp16 needs a CUDA GPU; on a CPU use bf16 (or no)")
    if config.report_to != "none":
        _require_tracker(config.report_to)
    # accelerate keeps its settings in process-wide singletons; a second run in one process (tests, the app)
    # may use other settings. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(Path(config.output_dir).expanduser()),
        # Batches come from pinned memory on a GPU (see _loader), so their copies need not wait.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )


@dataclass
class _Start:
    """What a run starts from: a new model (from a preset), a checkpoint to fine-tune (--init-from), or its own step
    checkpoint (--resume, whose weights accelerate's load_state restores)."""

    config: ModelConfig
    tokenizer: Tokenizer | None  # None: a new model, whose tokenizer is still to be built from the corpus
    weights: GPT | None  # the initial weights of a fine-tune
    block_size: int  # the training context
    base_model: str | None = None  # the Hub model it was fine-tuned from, remembered in its checkpoints


def _starting_point(config: TrainConfig, resume_from: Path | None) -> _Start:
    shape = dict(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, d_ff=config.d_ff)
    if resume_from is None and config.init_from is None:  # a new model
        settings = dict(arch=config.arch, block_size=config.block_size, dropout=config.dropout, **shape)
        try:
            model_config = ModelConfig.from_preset(
                config.preset, **{k: v for k, v in settings.items() if v is not None}
            )
        except ValueError as err:
            raise TrainingError(str(err)) from err
        return _Start(model_config, None, None, model_config.block_size)
    name = str(resume_from or config.init_from)
    given = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None]
    if given and resume_from is None:
        raise TrainingError(
            f"{', '.join(given)} shape(s) a new model; --init-from {name} keeps the shape of that model: "
            "drop them (or train a new model without --init-from)"
        )
    try:
        model_config = read_model_config(resolve_file(name, CONFIG_FILE))
        tokenizer = load_tokenizer(name)
        weights = None if resume_from is not None else load_gpt(name)
    except CheckpointError as err:
        raise TrainingError(f"cannot start from {name}: {err}") from err
    if weights is not None and (scheme := quantization_of(weights)) != "none":
        raise TrainingError(
            f"cannot start from {name}: it holds {scheme} weights, made for inference; fine-tune from the "
            "full-precision checkpoint it was made from"
        )
    if resume_from is not None:
        block_size = int(read_trainer_state(resume_from)["block_size"])
        return _Start(model_config, tokenizer, None, block_size, base_model_of(name))
    # Fine-tuning keeps the model's shape (its context included); training blocks may be shorter.
    block_size = config.block_size or model_config.block_size
    if block_size > model_config.block_size:
        raise TrainingError(
            f"--block-size {block_size} is longer than the context of {name} ({model_config.block_size} "
            f"tokens); use --block-size {model_config.block_size} or less"
        )
    dropout = model_config.dropout if config.dropout is None else config.dropout
    return _Start(
        dataclasses.replace(model_config, dropout=dropout), tokenizer, weights, block_size, base_model_of(name)
    )


def _data(config: TrainConfig, block_size: int, tokenizer: Tokenizer | None) -> TrainData:
    try:
        return build_data(
            config.dataset,
            block_size=block_size,
            tokenizer=tokenizer or config.tokenizer,
            vocab_size=config.vocab_size,
            stride=config.stride,
            text_column=config.text_column,
            streaming=config.streaming or None,
            val_fraction=config.val_fraction,
            val_split=config.val_split,
            seed=config.seed,
            num_proc=config.num_proc,
            cache_dir=Path(config.data_cache).expanduser() if config.data_cache else None,
            data_format=config.data_format,
        )
    except DataError as err:
        raise TrainingError(str(err)) from err


def train(config: TrainConfig) -> TrainResult:
    """Run one training job described by `config`."""
    return Trainer(config).train()


# ----- helpers -----


def _require_tracker(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise TrainingError(f"--report-to {package} needs its package: pip install {package}")


def _seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:g}s"


@contextlib.contextmanager
def _signals_request_stop(request_stop: Callable[[], None]) -> Iterator[None]:
    """While training, SIGINT (Ctrl-C) and SIGTERM end the run cleanly at the next step. Signal handlers can
    only be installed from the main thread (the app trains in a worker thread and calls request_stop itself)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.warning("%s received: saving a checkpoint at the end of this step", signal.Signals(signum).name)
        request_stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
