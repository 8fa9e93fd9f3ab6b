"""The training loop, on `accelerate.Accelerator`: one code path for a laptop CPU, one GPU, or many
processes launched with `accelerate launch` (DDP, FSDP, DeepSpeed: accelerate's job, not ours).

A run is described by one `TrainConfig` and lives in one output folder:

    output_dir/
      metrics.jsonl        one JSON record per log step and per evaluation
      step-000500/         a checkpoint folder (loadable by GPT.from_pretrained) plus training_state/:
        training_state/    accelerate's save_state (weights, optimizer, RNG) + trainer_state.json (data position)
      best/                the checkpoint with the lowest validation loss so far (no training state)

Notable choices:
- Data order comes from (seed, epoch) alone and the data position is counted in batches, so a resumed run
  skips exactly what it has seen and its losses equal those of an uninterrupted run.
- A NaN/inf loss stops the run without the optimizer applying it, leaving the checkpoints on disk intact. On one
  process with a fused optimizer (AdamW, Adam: the default on CPU and CUDA) the step's loss stays on the device,
  which skips the update of a non-finite loss by itself (the optimizer's `found_inf`, as a gradient scaler uses
  it); the host reads the losses only when it needs them (at log steps, before an evaluation or a save, at the
  end), so a GPU step waits for nothing. Otherwise (SGD, fp16, DeepSpeed, several processes) every step reads
  its loss before the update. Several processes also reduce the loss, a stop flag and the clock at every step, so
  that all agree on when to stop.
- Only the main process writes files. Checkpoint folders are assembled under a temporary name and renamed
  into place, so an interrupted save never leaves a half-written `step-N`.
- The LR scheduler is stepped here, once per optimizer step (not through `accelerator.prepare`, which would
  step it once per process), and saved with `register_for_checkpointing`.
- A wall-clock budget (`max_time`) counts the seconds spent in the training loop (steps, evaluations, saves;
  not the setup before it, but a `torch.compile` happens in the first steps and counts), over all sessions of
  a run: the time already spent is saved in trainer_state.json, so a resumed run gets what is left (raise
  --max-time to extend it). The run ends at the end of the step during which the budget runs out, then
  evaluates and saves as after any limit. The cosine decay then follows the share of the budget spent (or of
  the steps, when a step, token or epoch limit comes first; see `lr_factor`), so it reaches its floor when the
  run ends. The clock is averaged across processes at every step, so all agree on the learning rate and on
  when to stop. Such a run depends on the machine's speed: unlike a run limited by steps, it is not
  reproducible step for step.
- Chat fine-tuning (`--data-format chat`) reads blocks of [ids; labels] and trains only where the labels are
  not IGNORE_INDEX (the assistant's replies); see `batch_loss` for how such a loss is normalised. Validation
  loss is the mean over the trained target tokens, in both formats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from tqdm.auto import tqdm

from aksis.checkpoint import CONFIG_FILE, CheckpointError, load_tokenizer, read_model_config, resolve_file
from aksis.config import ModelConfig, TrainConfig
from aksis.data import DataError, PackedBlocks, StreamingBlocks, TrainData, build_data
from aksis.hub import (
    TRAINING_STATE_BRANCH,
    BackgroundPusher,
    HubError,
    download_checkpoint,
    ensure_repo,
    is_hub_id,
    push_checkpoint,
)
from aksis.model import GPT, IGNORE_INDEX
from aksis.tokenizer import Tokenizer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
TRAINING_STATE_DIR = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


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


class EpochSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation of the blocks every epoch, drawn from (seed, epoch) alone, so a resumed run replays
    the same order. (No `set_epoch` method on purpose: accelerate would call it with its own counter.)"""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        return self.n


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


def step_checkpoints(output_dir: Path) -> list[Path]:
    """The resumable `step-N` checkpoints of a run folder, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if STEP_DIR.match(p.name) and (p / TRAINING_STATE_DIR).is_dir()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name)[1]))  # type: ignore[index]


class Trainer:
    """Builds everything a run needs from a `TrainConfig` (data, tokenizer, model, optimizer, accelerator);
    `train()` runs it. `request_stop()` (also wired to SIGINT/SIGTERM) ends it at the next step with a
    resumable checkpoint."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir).expanduser()
        self._stop_requested = False  # asked for here (a signal, the app); may differ between processes
        self._stop_agreed = False  # what all processes know of the requests, as of the last step
        self._unread: list[tuple[int, torch.Tensor]] = []  # (step, its mean loss on the device) not read yet
        self._loss = math.nan  # the last loss read
        cpu = _use_cpu(config.device)
        if config.mixed_precision == "fp16" and cpu:
            raise TrainingError("--mixed-precision fp16 needs a CUDA GPU; on a CPU use bf16 (or no)")
        if config.report_to != "none":
            _require_tracker(config.report_to)
        # accelerate keeps its settings in process-wide singletons; a second run in one process (tests, the app)
        # may use other settings. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum_steps,
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=str(self.output_dir),
            # Batches come from pinned memory on a GPU (see _loader), so their copies need not wait.
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
        acc = self.accelerator
        if not acc.is_main_process:
            logging.getLogger("aksis").setLevel(logging.WARNING)
        self.resume_from = self._find_resume()
        if acc.is_main_process:
            self._check_output_dir()
        self.pusher: BackgroundPusher | None = None
        self._last_push_step: int | None = None
        if config.push_to_hub and acc.is_main_process:
            assert config.hub_model_id is not None  # TrainConfig checks it
            try:  # fail now, not after hours of training, when the repo cannot be written
                url = ensure_repo(config.hub_model_id, private=config.hub_private)
            except HubError as err:
                raise TrainingError(f"{err} (or train without --push-to-hub)") from err
            log.info("pushing checkpoints to %s", url)
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()  # upload bars from the push thread would tear through the training bar
            self.pusher = BackgroundPusher(push_checkpoint)
        acc.wait_for_everyone()

        set_seed(config.seed)
        tokenizer, model_config, init_model, self.block_size = self._model_source()
        with acc.main_process_first():  # the main process tokenizes and caches; the others read its cache
            try:
                self.data: TrainData = build_data(
                    config.dataset,
                    block_size=self.block_size,
                    tokenizer=tokenizer or config.tokenizer,
                    vocab_size=config.vocab_size,
                    stride=config.stride,
                    text_column=config.text_column,
                    streaming=config.streaming or None,
                    val_fraction=config.val_fraction,
                    seed=config.seed,
                    num_proc=config.num_proc,
                    cache_dir=Path(config.data_cache).expanduser() if config.data_cache else None,
                    data_format=config.data_format,
                )
            except DataError as err:
                raise TrainingError(str(err)) from err
        self.tokenizer: Tokenizer = self.data.tokenizer
        if tokenizer is None:  # a new model: its vocabulary is the tokenizer's
            model_config = dataclasses.replace(model_config, vocab_size=self.tokenizer.vocab_size)
        set_seed(config.seed)  # the same initial weights whatever the data preparation consumed
        self.model = GPT(model_config)
        if init_model is not None:
            self.model.load_state_dict(init_model.state_dict())
        self.model_config = model_config
        log.info(
            "model: %s, %.2fM parameters; tokenizer: %s (%d tokens)",
            _describe(model_config),
            self.model.num_params() / 1e6,
            self.tokenizer.name,
            self.tokenizer.vocab_size,
        )

        self._fused = acc.device.type in ("cuda", "cpu") and config.optimizer != "sgd"
        self.optimizer = make_optimizer(self.model, config, fused=self._fused)
        # Where the optimizer itself can skip a non-finite step, the loss need not reach the host every step.
        self._skips_on_device = (
            self._fused and acc.distributed_type == DistributedType.NO and config.mixed_precision != "fp16"
        )
        if config.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]
        self.train_loader, self.sampler = self._train_loader()
        val_loader = self._loader(self.data.validation)
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
        acc.register_for_checkpointing(self.scheduler)
        if self.resume_from is not None:
            self._load(self.resume_from)
        self._start_clock()

    # ----- setup -----

    def _find_resume(self) -> Path | None:
        resume = self.config.resume
        if resume is None:
            return None
        if resume in ("latest", "auto"):
            found = step_checkpoints(self.output_dir)
            if not found:
                raise TrainingError(
                    f"nothing to resume in {self.output_dir}: it has no step-N checkpoint with a {TRAINING_STATE_DIR}/ "
                    "folder. Start without --resume, or give --output-dir of the run to continue"
                )
            return found[-1]
        path = Path(resume).expanduser()
        if is_hub_id(resume):  # a training state pushed with --push-training-state
            with self.accelerator.main_process_first():  # one download; the others read the Hub cache
                try:
                    path = download_checkpoint(resume)
                except HubError as err:
                    raise TrainingError(str(err)) from err
        if not (path / TRAINING_STATE_DIR / TRAINER_STATE_FILE).is_file():
            raise TrainingError(
                f"cannot resume from {resume}: it is not a step-N checkpoint with a {TRAINING_STATE_DIR}/ folder "
                f"(only those are resumable; use --init-from to start a new run from a model)"
            )
        return path

    def _check_output_dir(self) -> None:
        """Never overwrite another run's checkpoints by accident."""
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--output-dir {out} is a file; give a folder")
        if self.resume_from is not None:
            return
        existing = [p for p in (*step_checkpoints(out), out / BEST_DIR) if (p / CONFIG_FILE).exists()]
        if not existing:
            return
        if not self.config.overwrite:
            earlier = read_model_config(existing[-1] / CONFIG_FILE)
            raise TrainingError(
                f"--output-dir {out} already holds the checkpoints of a run ({', '.join(p.name for p in existing)}; "
                f"model {_describe(earlier)}). Continue it with --resume, replace it with --overwrite, "
                "or choose another --output-dir"
            )
        log.warning("--overwrite: deleting the earlier run's checkpoints in %s", out)
        for path in existing:
            shutil.rmtree(path)
        (out / METRICS_FILE).unlink(missing_ok=True)

    def _model_source(self) -> tuple[Tokenizer | None, ModelConfig, GPT | None, int]:
        """(tokenizer, model config, model with initial weights, training context) for a resumed, fine-tuned or
        new model; the tokenizer is None when it is still to be built from the corpus."""
        config = self.config
        source = self.resume_from or (config.init_from and Path(config.init_from).expanduser())
        shape = dict(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, d_ff=config.d_ff)
        if source is None:
            settings = dict(arch=config.arch, block_size=config.block_size, dropout=config.dropout, **shape)
            overrides = {k: v for k, v in settings.items() if v is not None}
            try:
                model_config = ModelConfig.from_preset(config.preset, **overrides)
            except ValueError as err:
                raise TrainingError(str(err)) from err
            return None, model_config, None, model_config.block_size
        name = config.init_from if self.resume_from is None else str(source)
        given = [f"--{k.replace('_', '-')}" for k, v in shape.items() if v is not None]
        if given and self.resume_from is None:
            raise TrainingError(
                f"{', '.join(given)} shape(s) a new model; --init-from {name} keeps the shape of that model: "
                "drop them (or train a new model without --init-from)"
            )
        try:
            model_config = read_model_config(resolve_file(str(name), CONFIG_FILE))
            tokenizer = load_tokenizer(str(name))
            init = None if self.resume_from is not None else GPT.from_pretrained(str(name))
        except CheckpointError as err:
            raise TrainingError(f"cannot start from {name}: {err}") from err
        if self.resume_from is not None:  # accelerate's load_state restores the weights
            record = json.loads((self.resume_from / TRAINING_STATE_DIR / TRAINER_STATE_FILE).read_text())
            return tokenizer, model_config, None, int(record["block_size"])
        # Fine-tuning keeps the model's shape (its context included); training blocks may be shorter.
        block_size = config.block_size or model_config.block_size
        if block_size > model_config.block_size:
            raise TrainingError(
                f"--block-size {block_size} is longer than the context of {name} ({model_config.block_size} "
                f"tokens); use --block-size {model_config.block_size} or less"
            )
        dropout = model_config.dropout if config.dropout is None else config.dropout
        return tokenizer, dataclasses.replace(model_config, dropout=dropout), init, block_size

    def _train_loader(self) -> tuple[torch.utils.data.DataLoader, EpochSampler | None]:
        train = self.data.train
        if isinstance(train, StreamingBlocks):  # each process reads its own share of the stream
            train.rank, train.world_size = self.accelerator.process_index, self.accelerator.num_processes
            return self._loader(train), None
        sampler = EpochSampler(len(train), self.config.seed)
        return self._loader(train, sampler=sampler, drop_last=True), sampler

    def _loader(self, data: torch.utils.data.Dataset, **options: Any) -> torch.utils.data.DataLoader:
        # Pinned host memory on a GPU: a batch's copy to the device then runs beside the work already queued.
        pin = self.accelerator.device.type == "cuda"
        return torch.utils.data.DataLoader(
            data, batch_size=self.config.batch_size, generator=_rng(), pin_memory=pin, **options
        )

    def _total_steps(self) -> int | None:
        """The length of the run in optimizer steps: the first limit reached among steps, tokens, epochs (None
        for a stream bounded by --max-time alone)."""
        config = self.config
        limits = []
        if config.max_steps:
            limits.append(config.max_steps)
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
        assert self.sampler is not None
        return len(self.train_loader) // self.config.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step, all processes together."""
        cfg = self.config
        return cfg.batch_size * cfg.grad_accum_steps * self.accelerator.num_processes * self.block_size

    # ----- the clock of a time budget -----

    def _start_clock(self) -> None:
        self._clock_base, self._clock_started = self.state.clock, time.perf_counter()

    def _clock(self) -> float:
        """Seconds spent in the training loop, this session and earlier ones (this process's own count)."""
        return self._clock_base + time.perf_counter() - self._clock_started

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
            self.output_dir.mkdir(parents=True, exist_ok=True)
            history = self.resume_from / METRICS_FILE if self.resume_from is not None else None
            if history is not None and history.is_file() and not (self.output_dir / METRICS_FILE).exists():
                shutil.copy(history, self.output_dir / METRICS_FILE)  # resumed elsewhere: bring the log along
            self._trim_metrics()
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
        self._start_clock()
        with _signals_request_stop(self.request_stop):
            while not stopped:
                started = time.perf_counter()
                if not self._train_step(batches):  # the epoch is over
                    state.epoch += 1
                    state.batches_in_epoch = 0
                    if state.epoch >= config.epochs:
                        stopped = "epochs"
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
        self._read_losses()  # an epoch can end between two reads
        if stopped != "interrupted" and last_eval != state.step:
            self._evaluate()
        if last_saved != state.step:
            self._save_checkpoint(final=True)
            last_saved = state.step
        push_errors = self._finish_pushes()
        acc.end_training()
        last = self.output_dir / _step_name(last_saved) if last_saved is not None else None
        best = self.output_dir / BEST_DIR
        if stopped == "interrupted":
            log.info("stopped at step %d; continue with --resume (the checkpoint is %s)", state.step, last)
        return TrainResult(
            steps=state.step,
            tokens=state.tokens,
            stopped=stopped,
            last_checkpoint=last,
            best_checkpoint=best if (best / CONFIG_FILE).exists() else None,
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
            stream = self.data.train
            assert isinstance(stream, StreamingBlocks)
            stream.skip = done * self.config.batch_size
            return iter(self.train_loader)
        self.sampler.epoch = self.state.epoch
        # Stop at a whole number of optimizer steps: a partial accumulation would not be a full step.
        usable = self.steps_per_epoch * self.config.grad_accum_steps
        return _take(iter(self._epoch_loader()), usable - done)

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
        losses = []
        for _ in range(config.grad_accum_steps):
            batch = next(batches, None)
            if batch is None:
                return False
            batch = batch.to(acc.device, non_blocking=True)
            self.state.batches_in_epoch += 1
            with acc.accumulate(self.model):
                loss = batch_loss(self.model, batch)
                losses.append(loss.detach().float())
                flags = None
                if acc.sync_gradients:
                    step_loss = torch.stack(losses).mean()
                    if self._skips_on_device:
                        self.optimizer.optimizer.found_inf = (~torch.isfinite(step_loss)).float()  # type: ignore[attr-defined]
                        self._unread.append((self.state.step + 1, step_loss))
                    else:
                        # One reduction per step, before the update: every process learns the loss and any stop
                        # request, and the clock (the mean of the processes' clocks is what all use for the schedule
                        # and the budget).
                        local = torch.stack(
                            [
                                step_loss,
                                torch.tensor(float(self._stop_requested), device=acc.device),
                                torch.tensor(self._clock(), device=acc.device),
                            ]
                        )
                        flags = _start_copy_to_host(acc.reduce(local, "sum") / acc.num_processes)
                acc.backward(loss)
                if flags is not None:
                    # Read after the backward pass is queued, so that a GPU is not left idle while the host waits for
                    # the loss; still before the optimizer applies anything.
                    mean_loss, stop, self.state.clock = flags()
                    self._unread.append((self.state.step + 1, torch.tensor(mean_loss)))
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

    def _read_losses(self) -> float:
        """The loss of the last step, reading those of the steps since the last read (one wait for the device);
        stops the run at the first that is not finite (the optimizer has skipped its update)."""
        if self._unread:
            values = torch.stack([loss for _, loss in self._unread]).tolist()
            steps = [step for step, _ in self._unread]
            self._unread.clear()
            for step, value in zip(steps, values, strict=True):
                if not math.isfinite(value):
                    self._fail_non_finite(value, step)
            self._loss = values[-1]
        return self._loss

    def _fail_non_finite(self, loss: float, step: int) -> None:
        last = step_checkpoints(self.output_dir)
        kept = f"the last good checkpoint, {last[-1]}, is intact" if last else "no checkpoint had been saved yet"
        if step < self.state.step:  # read later: the optimizer skipped that update, and the steps since went on
            stopped = f"its update was skipped, and the run stopped at step {self.state.step} without saving"
        else:
            stopped = "stopped without applying it"
        self.accelerator.end_training()
        raise TrainingError(
            f"the training loss became {loss} at step {step}; {stopped} ({kept}). "
            "Lower --learning-rate, keep --grad-clip on, or use bf16 instead of fp16"
            + (", then --resume" if last else "")
        )

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
            self._save_model(self.output_dir / BEST_DIR)

    # ----- files -----

    def _log(self, values: dict[str, float]) -> None:
        state = self.state
        record = {"step": state.step, "tokens": state.tokens, **values, "elapsed": round(state.elapsed, 3)}
        self.accelerator.log(values, step=state.step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drop log records past the resumed step (written after the checkpoint we continue from)."""
        path = self.output_dir / METRICS_FILE
        if not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _record_step(line) <= self.state.step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _plain_model(self) -> GPT:
        """The model as a plain `GPT` with all its weights (gathered first when they are sharded)."""
        acc = self.accelerator
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            state_dict = acc.get_state_dict(self.model)  # collective: every process calls it
            model = GPT(self.model_config)
            if acc.is_main_process:
                model.load_state_dict(state_dict)
            return model
        plain: GPT = acc.unwrap_model(self.model, keep_torch_compile=False)
        return plain

    def _save_model(self, target: Path) -> None:
        model = self._plain_model()
        if self.accelerator.is_main_process:
            model.save_pretrained(target, tokenizer=self.tokenizer)
            shutil.copy(self.output_dir / METRICS_FILE, target / METRICS_FILE)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, final: bool = False) -> None:
        """A resumable `step-N` folder: model files, metrics, and the training state of every process. Built
        under a temporary name and renamed, then older step folders beyond `keep_last` are removed."""
        acc, state = self.accelerator, self.state
        final_dir = self.output_dir / _step_name(state.step)
        tmp = self.output_dir / f".{final_dir.name}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        self._save_model(tmp)
        with _quiet("accelerate"):  # it logs every file it writes, and warns about our (intended) tied weights
            acc.save_state(str(tmp / TRAINING_STATE_DIR))
        if acc.is_main_process:
            # The time spent includes this step's evaluation and this save (all but renaming it into place).
            record = {
                "state": {**dataclasses.asdict(state), "clock": max(state.clock, self._clock())},
                "block_size": self.block_size,
                "train_config": self.config.to_dict(),
            }
            (tmp / TRAINING_STATE_DIR / TRAINER_STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.rename(tmp, final_dir)
            self._push_step(final_dir, last=final)
            for old in step_checkpoints(self.output_dir)[: -self.config.keep_last]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        log.info("saved %s", final_dir)

    # ----- the Hub -----

    def _push_step(self, checkpoint: Path, last: bool) -> None:
        """Queue the push of a step checkpoint (tagged step-N), every `push_every` steps and at the end; with
        --push-training-state, its training state too (branch training-state)."""
        config, step = self.config, self.state.step
        if self.pusher is None:
            return
        due = self._last_push_step is None or step - self._last_push_step >= (config.push_every or 1)
        if not (due or last):
            return
        self._last_push_step = step
        assert config.hub_model_id is not None
        common = dict(repo_id=config.hub_model_id, license=config.hub_license, train_config=config.to_dict())
        self.pusher.submit(checkpoint, tag=f"step-{step}", commit_message=f"aksis: step {step}", **common)
        if config.push_training_state:
            self.pusher.submit(
                checkpoint,
                branch=TRAINING_STATE_BRANCH,
                with_training_state=True,
                samples=False,
                commit_message=f"aksis: training state at step {step}",
                **common,
            )

    def _finish_pushes(self) -> list[str]:
        """Push the best checkpoint (else the last) to main, wait for every queued push, and report."""
        if self.pusher is None:
            return []
        config = self.config
        assert config.hub_model_id is not None
        latest = self.output_dir / _step_name(self.state.step)
        if self._last_push_step != self.state.step and (latest / CONFIG_FILE).exists():
            self._push_step(latest, last=True)  # the last step, when --push-every skipped its save
        best = self.output_dir / BEST_DIR
        if (best / CONFIG_FILE).exists():
            loss = f", validation loss {self.state.best_val_loss:.4f}" if self.state.best_val_loss is not None else ""
            self.pusher.submit(
                best,
                repo_id=config.hub_model_id,
                license=config.hub_license,
                train_config=config.to_dict(),
                commit_message=f"aksis: best checkpoint (step {self.state.best_step}{loss})",
            )
        log.info("waiting for the pushes to %s to finish", config.hub_model_id)
        self.pusher.close()
        if self.pusher.errors:
            log.warning("%d push(es) failed; push later with `aksis push`", len(self.pusher.errors))
        else:
            log.info("pushed to %s", config.hub_model_id)
        return list(self.pusher.errors)

    def _load(self, checkpoint: Path) -> None:
        record = json.loads((checkpoint / TRAINING_STATE_DIR / TRAINER_STATE_FILE).read_text())
        with _quiet("accelerate"):
            self.accelerator.load_state(str(checkpoint / TRAINING_STATE_DIR))
        if self.config.optimizer != "sgd":
            # Loading replaces the param groups, "fused" included: the kernel is this run's choice, not the saved one's
            # (a run saved before CPU runs were fused would otherwise lose the fused step, and with it `found_inf`).
            for group in self.optimizer.param_groups:
                group["fused"] = self._fused
        self.state = RunState(**record["state"])
        before = record.get("train_config", {})
        changed = [
            f"{k}: {before[k]!r} -> {v!r}"
            for k, v in self.config.to_dict().items()
            if k in before and before[k] != v and k not in ("resume", "overwrite", "progress")
        ]
        if changed:
            log.warning("resuming with changed settings (the run will not match an uninterrupted one): %s", changed)
        log.info("resumed from %s at step %d", checkpoint, self.state.step)


def train(config: TrainConfig) -> TrainResult:
    """Run one training job described by `config`."""
    return Trainer(config).train()


# ----- losses -----


def inputs_and_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T), of a batch of blocks: text blocks (B, T+1) predict their own next
    token; chat blocks (B, 2, T+1) hold [ids; labels], and the target of position t is labels[t + 1]
    (IGNORE_INDEX where it is not trained)."""
    if batch.dim() == 2:
        return batch[:, :-1], batch[:, 1:]
    return batch[:, 0, :-1], batch[:, 1, 1:]


def target_loss_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the sum of the cross-entropy over trained targets (not IGNORE_INDEX) and their number,
    each (B,). Summed rather than averaged so blocks (and processes) can be pooled into a per-token mean."""
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T), 0 where ignored
    return losses.sum(1), (targets != IGNORE_INDEX).sum(1)


def batch_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch: the mean cross-entropy over its trained targets.

    Text: the model's own loss, over every target, exactly as always. Chat: the sum over the batch's trained
    targets divided by max(their number, 1). Each batch is normalised by its own count, as the model does for
    text (batches of an accumulated step and of several processes are then weighted equally, however many
    assistant tokens each holds). A batch cut entirely from prompts has no trained target: its loss is 0 with
    zero gradient, instead of the 0/0 = NaN that a plain mean gives and that would stop the run."""
    inputs, targets = inputs_and_targets(batch)
    if batch.dim() == 2:
        _, loss = model(inputs, targets)
        assert loss is not None
        return loss
    logits, _ = model(inputs)
    sums, counts = target_loss_sums(logits, targets)
    return sums.sum() / counts.sum().clamp(min=1)


# ----- helpers -----


def _use_cpu(device: str) -> bool:
    """Whether accelerate should be told to use the CPU (this also turns a multi-process launch into gloo)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    if device == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return device == "cpu"


def _require_tracker(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise TrainingError(f"--report-to {package} needs its package: pip install {package}")


def _start_copy_to_host(values: torch.Tensor) -> Callable[[], list[float]]:
    """Start copying `values` to the host; the returned function waits for that copy alone and gives the numbers.
    On a GPU the copy goes to pinned memory behind the work queued so far, and later work is not waited for."""
    if values.device.type != "cuda":
        return values.tolist
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[float]:
        copied.synchronize()
        return host.tolist()

    return wait


def _rng() -> torch.Generator:
    """A data loader's own generator: without one, each new iterator draws from the global RNG, and a resumed
    run (which starts its iterator at a different moment) would see different dropout masks."""
    return torch.Generator().manual_seed(0)


def _describe(config: ModelConfig) -> str:
    return (
        f"{config.arch}, {config.n_layer} layers x {config.n_embd}, {config.n_head} heads, "
        f"context {config.block_size}, vocab {config.vocab_size}"
    )


def _seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:g}s"


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # an unreadable line (e.g. cut by a crash) is dropped


def _take(iterator: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    for _ in range(max(n, 0)):
        item = next(iterator, None)
        if item is None:
            return
        yield item


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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


def metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's (or checkpoint's) metrics.jsonl."""
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
