"""The Train tab: a quick run of the tiny preset on the embedded Shakespeare or an uploaded text file, with a
live loss plot and progress; the result is picked in the model picker and can be pushed to the Hub. Also the
first-start flow: the welcome banner's button (shown when no model exists anywhere) starts the same run with
the defaults in one click.

How a run goes:
- The recipe is that of `training/configs/tiny-cpu.yaml` (`RECIPE`; a test keeps the two equal), with the
  steps and the tokenizer chosen here. It trains into `<checkpoints>/<name>`, a run folder like any other.
- One run at a time per app (`TrainingSlot`): a laptop CPU has no room for two, and a second request is told
  which run is going rather than left waiting in the queue.
- The `Trainer` (data preparation included: a first BPE takes seconds) runs in a worker thread (`TrainJob`).
  The event handler is a generator that polls the run's metrics.jsonl, which the trainer appends to as it
  goes, and yields the loss plot and a progress line; nothing in the trainer knows about the app.
- Stop calls the trainer's `request_stop()`: it finishes the step, saves a resumable step-N checkpoint and
  ends, so a stopped run is still a model in the picker.
- The training thread outlives the browser tab that started it (a closed tab does not stop a run); the run
  then shows up in the picker through "Refresh list".

On a public Space (`AppSettings.local_paths` off) visitors are strangers to each other and to the owner:
- a run never overwrites another (a fresh name each time); how many runs a visitor keeps, how many the Space keeps
  and when they expire are set in `aksis.ui.space_runs`, so visitors can neither fill the disk nor lock the tab;
- only the browser session (gr.Request.session_hash) that started a run may stop it, and push it (the Space's owner
  may push any);
- a push needs the visitor's own token: the app's HF_TOKEN (the owner's) is never used for a visitor's push.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from aksis.checkpoint import CONFIG_FILE, CheckpointError
from aksis.config import TrainConfig
from aksis.plots import loss_curves
from aksis.runs import METRICS_FILE, read_metrics
from aksis.ui.context import (
    AppContext,
    AppSettings,
    bound,
    echo,
    input_error,
    read_text_upload,
    spread,
    text_value,
    to_whole,
    user_errors,
)
from aksis.ui.inputs import slider
from aksis.ui.space_runs import make_room, mark_run, trained_by

if TYPE_CHECKING:  # the trainer (and accelerate) are imported when a run starts, not when the app starts
    from aksis.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

# training/configs/tiny-cpu.yaml, the laptop recipe: the tiny preset (2 layers x 128) with a 10k BPE, context
# 256, batches of 16, 300 steps (about one pass over the plays). Kept here because the app is also installed
# without the training/ folder; tests/test_ui_train.py checks that the two agree.
RECIPE: dict[str, Any] = dict(
    dataset="shakespeare",
    tokenizer="bpe",
    preset="tiny",
    block_size=256,
    batch_size=16,
    max_steps=300,
    learning_rate=2.0e-3,
    warmup_steps=30,
    min_lr_ratio=0.1,
    eval_every=100,
    eval_batches=10,
    log_every=10,
    device="cpu",
)
TOKENIZERS = ("bpe", "byte")
MAX_STEPS = 5000
CORPORA = ("shakespeare", "upload")
MAX_UPLOAD_BYTES = 20 << 20  # 20 MiB; more takes long to tokenize on a CPU: use training/train.py then
# One optimizer step of the recipe needs 16 blocks of 257 tokens; with the byte tokenizer (one token per byte)
# and the held-out validation share that is about 4.4 KB, so ask for a little more.
MIN_UPLOAD_CHARS = 5_000
UPLOAD_FILE = "corpus.txt"  # the upload, checked and re-saved as UTF-8 in the run folder (what the run read)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
POLL_SECONDS = 0.5
PROGRESS_ID = "train-progress"
CURVE_NAMES = {"training": "train", "validation": "validation"}  # aksis.plots' curves, as the plot's legend names them


class TrainingBusy(Exception):
    """Another run is training in this app."""


# ----- inputs -----


def check_upload(path: str | Path | None) -> str:
    """The text of an uploaded corpus, or a gr.Error that says what is wrong with it and what to upload: the
    checks of every upload (`read_text_upload`), a .txt name, and enough text for one batch of the recipe."""
    if path and isinstance(path, str | Path) and Path(path).suffix.lower() != ".txt":
        raise input_error(f"{Path(path).name} is not a .txt file: upload plain text (UTF-8) in a .txt file.")
    text = read_text_upload(path, "text file", MAX_UPLOAD_BYTES)
    chars = len(text.strip())
    if chars < MIN_UPLOAD_CHARS:
        raise input_error(
            f"{Path(str(path)).name} holds {chars:,} characters of text; the quick run needs at least "
            f"{MIN_UPLOAD_CHARS:,}."
        )
    return text


def default_name(corpus: str, upload: str | Path | None) -> str:
    """quick-<corpus>: quick-shakespeare, or quick-<file name> for an upload."""
    stem = Path(upload).stem if corpus == "upload" and upload else corpus
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "upload"
    return f"quick-{slug}"[:60]


def run_folder(checkpoints_dir: Path, name: str, corpus: str, upload: str | Path | None, overwrite: bool) -> Path:
    """Where the run goes. A name given is used as is: refused when it exists, unless `overwrite`. No name:
    quick-<corpus>, or the first free quick-<corpus>-2, -3, ... (so one click always starts a run)."""
    name = name.strip()
    if not name:
        base = default_name(corpus, upload)
        n = 1
        while (checkpoints_dir / (base if n == 1 else f"{base}-{n}")).exists():
            n += 1
        return checkpoints_dir / (base if n == 1 else f"{base}-{n}")
    if not NAME.fullmatch(name):
        raise ValueError(
            f"run name {name!r}: use letters, digits, '.', '_' and '-' (up to 80, starting with a letter or digit)"
        )
    folder = checkpoints_dir / name
    if folder.exists():
        if not folder.is_dir() or (folder / CONFIG_FILE).exists():
            raise ValueError(
                f"{folder} is {'a file' if not folder.is_dir() else 'a checkpoint folder, not a training run'}; "
                "choose another run name"
            )
        if not overwrite:
            raise ValueError(
                f"a run named {name!r} already exists in {checkpoints_dir}: choose another name, or tick "
                "'Overwrite' to replace it"
            )
    return folder


def quick_config(
    dataset: str, output_dir: Path, *, steps: int, tokenizer: str, overwrite: bool = False, **overrides: Any
) -> TrainConfig:
    """The recipe for `steps` steps of `tokenizer` on `dataset` into `output_dir`. Logging, evaluation and warmup
    follow the length of the run (the recipe's own values at its 300 steps), so short runs still draw a curve.
    `overrides` (any TrainConfig field) come last: tests use them for tiny blocks."""
    if not isinstance(tokenizer, str) or tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer {echo(tokenizer)}: choose one of {', '.join(TOKENIZERS)}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    settings = {
        **RECIPE,
        "dataset": dataset,
        "tokenizer": tokenizer,
        "max_steps": steps,
        "eval_every": max(1, min(RECIPE["eval_every"], steps // 3)),
        "log_every": max(1, min(RECIPE["log_every"], steps // 30)),
        "warmup_steps": min(RECIPE["warmup_steps"], steps // 10),
        "output_dir": str(output_dir),
        "overwrite": overwrite,
        "progress": False,  # no terminal bar from a worker thread: the app shows its own progress
        **overrides,
    }
    return TrainConfig(**settings)


# ----- the run -----


class TrainJob:
    """One training run in a worker thread: builds the `Trainer` (data, tokenizer, model) and trains. `error`
    holds what went wrong, `result` the `TrainResult` once it is done. `owner`: the browser session that started
    it (gr.Request.session_hash), None when started from Python."""

    def __init__(self, config: TrainConfig, owner: str | None = None) -> None:
        self.config = config
        self.owner = owner
        self.output_dir = Path(config.output_dir)
        self.name = self.output_dir.name
        self.total_steps = config.max_steps  # until the trainer knows the real length (an epoch may end first)
        self.started = time.monotonic()
        self.finished: float | None = None
        self.result: TrainResult | None = None
        self.error: str | None = None
        self.stop_requested = False
        self._trainer: Trainer | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"aksis-train-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from aksis.corpora import DataError
        from aksis.tokenizer import TokenizerError
        from aksis.trainer import Trainer, TrainingError

        try:
            trainer = Trainer(self.config)
            with self._lock:
                self.total_steps = trainer.total_steps
                self._trainer = trainer
                stop = self.stop_requested
            if stop:  # Stop came while the data was being prepared: nothing trained, nothing to save
                return
            self.result = trainer.train()
        except (TrainingError, DataError, TokenizerError, CheckpointError, ValueError, OSError) as err:
            self.error = str(err)
        except Exception as err:  # an unexpected failure is still reported to the user, with a trace in the log
            log.exception("training %s failed", self.name)
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.finished = time.monotonic()
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def request_stop(self) -> None:
        """End the run after the current step, with a saved checkpoint (or before training when it has not begun)."""
        with self._lock:
            self.stop_requested = True
            if self._trainer is not None:
                self._trainer.request_stop()

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class TrainingSlot:
    """Holds the app's one training run. `owner_only` (a public Space): only the session that started the run
    may stop it; otherwise (one person's app, where every tab is theirs) any session may."""

    def __init__(self, owner_only: bool = False) -> None:
        self._lock = threading.Lock()
        self.job: TrainJob | None = None
        self.owner_only = owner_only

    def start(
        self, config: TrainConfig, prepare: Callable[[], None] | None = None, owner: str | None = None
    ) -> TrainJob:
        """Start a run of `config` for the session `owner`; `prepare` runs first, once the slot is held (it writes
        into the run folder, which must not happen while another run might be using that folder). Raises
        TrainingBusy."""
        with self._lock:
            current = self.job
            if current is not None and not current.done:
                raise TrainingBusy(
                    f"the run {current.name!r} is training now (one run at a time in this app): wait for it to "
                    "finish or press Stop, then start again"
                )
            job = TrainJob(config, owner)
            if prepare is not None:
                prepare()
            self.job = job
        job.start()
        return job

    def stop(self, session: str | None = None) -> str:
        """Stop the run on behalf of `session` (gr.Request.session_hash); a message saying what happens."""
        job = self.job
        if job is None or job.done:
            return "No run is training."
        if self.owner_only and (job.owner is None or job.owner != session):
            return (
                f"The run **{job.name}** was started by another visitor: only they can stop it. It ends by itself "
                f"after {job.total_steps} steps."
            )
        job.request_stop()
        return f"Stopping **{job.name}**: it saves a checkpoint after the current step, then ends."


# ----- progress -----


def loss_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Training and validation loss against the step, in the long form a gr.LinePlot draws (one line per curve)."""
    curves = loss_curves(records)
    rows = [(step, loss, CURVE_NAMES[curve]) for curve, points in curves.items() for step, loss in points]
    # Gradio's plot builds its chart (the kind of each axis, the curves' colours) from the frame it first shows and
    # afterwards only swaps the data. So every frame has typed columns (an empty frame's would make both axes
    # categorical: every step and loss its own tick) and names both curves: one with no point yet gets a row
    # without a loss (NaN, which the line skips), else it would be drawn in no colour at all.
    rows += [(0, math.nan, CURVE_NAMES[curve]) for curve, points in curves.items() if not points]
    frame = pd.DataFrame(rows, columns=["step", "loss", "curve"])
    return frame.astype({"step": "int64", "loss": "float64", "curve": "str"})


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def progress_text(job: TrainJob, records: list[dict[str, Any]]) -> str:
    """One line: where the run is (step / total, tokens/s, time left, latest losses), or how it ended."""
    head = f"**{job.name}**"
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    losses = []
    if train:
        losses.append(f"loss {train[-1]['loss']:.3f}")
    if val:
        losses.append(f"validation loss {val[-1]['val_loss']:.3f}")
    if job.done:
        if job.error is not None:
            return f"{head}: failed after {_duration(job.elapsed)}: {job.error}"
        result = job.result
        if result is None:
            return f"{head}: stopped before training began; nothing was saved."
        how = "stopped by request" if result.stopped == "interrupted" else f"done ({result.stopped})"
        parts = [f"{head}: {how} at step {result.steps} after {_duration(job.elapsed)}", *losses]
        return " · ".join(parts) + "."
    if not train:
        if job.stop_requested:
            return f"{head}: stopping before training begins…"
        first = " (a BPE tokenizer is trained on the corpus the first time)" if job.config.tokenizer == "bpe" else ""
        return f"{head}: preparing the data and the model{first}… {_duration(job.elapsed)}"
    step, total = int(train[-1]["step"]), job.total_steps or 0
    parts = [f"{head}: step {step} / {total}"]
    speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if speeds:
        parts.append(f"{speeds[-1]:,.0f} tokens/s")
    elapsed = train[-1].get("elapsed")
    if elapsed and step and total > step:
        # The trainer's elapsed counts training steps only; evaluations and saves add a little.
        parts.append(f"about {_duration(elapsed / step * (total - step))} left")
    if job.stop_requested:
        parts.append("stopping after this step")
    return " · ".join([*parts, *losses])


# ----- the event handlers -----


@dataclass(frozen=True)
class RunRequest:
    """What a visitor asks the tab to train, as sent (start_run checks each). The defaults are the first-start
    button's: the recipe on the embedded Shakespeare, under the next free quick- name."""

    corpus: Any = "shakespeare"  # "shakespeare" or "upload"
    upload: Any = None  # the uploaded file's path
    name: Any = ""  # the run's name; empty: quick-<corpus>
    overwrite: Any = False
    steps: Any = RECIPE["max_steps"]
    tokenizer: Any = RECIPE["tokenizer"]


RUN_INPUTS = ("corpus", "upload", "name", "overwrite", "steps", "tokenizer")  # /train's parameters, in order


def start_run(
    slot: TrainingSlot,
    settings: AppSettings,
    run: RunRequest,
    loaded: list[str] | None = None,
    owner: str | None = None,
    **overrides: Any,
) -> TrainJob:
    """Check the inputs and start a run for the session `owner`; ValueError or gr.Error (bad input) or
    TrainingBusy otherwise. `loaded`: the sources the app's model store holds, which a run must not overwrite (the
    store would keep serving the old weights). `overrides` go to `quick_config`."""
    corpus, upload, overwrite, tokenizer = run.corpus, run.upload, run.overwrite, run.tokenizer
    name = text_value(run.name, "run name")
    if overwrite is not None and not isinstance(overwrite, bool):
        raise input_error(f"Overwrite is ticked or not (true or false), got {echo(overwrite)}.")
    overwrite = bool(overwrite)
    if corpus not in CORPORA:
        raise ValueError(f"corpus {echo(corpus)}: choose one of {', '.join(CORPORA)}")
    if overwrite and not settings.local_paths:
        raise ValueError(
            "this Space does not overwrite runs (another visitor's may have that name): untick "
            "'Overwrite' and give a new run name, or leave it empty for the next free one"
        )
    text = check_upload(upload) if corpus == "upload" else None
    # The API may send any number (or none): int(None) or int(inf) would fail with Python's own message.
    steps = to_whole(run.steps, "steps", 1, MAX_STEPS)
    checkpoints_dir = Path(settings.checkpoints_dir)
    # The folder is checked twice: here for a clear message before any work, and in `prepare`, where the slot is
    # held and no other run can create a folder in between.
    output_dir = run_folder(checkpoints_dir, name, corpus, upload, overwrite)
    dataset = str(output_dir / UPLOAD_FILE) if text is not None else "shakespeare"
    device = settings.device or "auto"
    config = quick_config(
        dataset, output_dir, steps=steps, tokenizer=tokenizer, overwrite=overwrite, device=device, **overrides
    )

    def prepare() -> None:
        from aksis.checkpoint import is_local

        if any(Path(source).resolve() == output_dir.resolve() for source in loaded or [] if is_local(source)):
            raise ValueError(
                f"the run {output_dir.name!r} is loaded in the app, which would go on serving its old weights: "
                "choose another run name"
            )
        if not settings.local_paths:  # a Space: expired runs go, and the visitor's count is checked
            busy = [Path(source) for source in loaded or [] if is_local(source)]
            make_room(checkpoints_dir, owner, settings.run_hours * 3600, busy)
        if name.strip():
            run_folder(checkpoints_dir, name, corpus, upload, overwrite)  # refused if another run took it since
        elif output_dir.exists():  # the next free default name, taken since
            raise ValueError(f"{output_dir.name!r} was just taken by another run; start again")
        output_dir.mkdir(parents=True, exist_ok=True)
        if not settings.local_paths:
            mark_run(output_dir, owner)
        (output_dir / METRICS_FILE).unlink(missing_ok=True)  # an overwritten run's curve must not show
        if text is not None:
            (output_dir / UPLOAD_FILE).write_text(text, encoding="utf-8")

    return slot.start(config, prepare, owner)


def follow(job: TrainJob, poll: float = POLL_SECONDS) -> Iterator[tuple[pd.DataFrame, str]]:
    """(loss curves, progress line) while the job runs, whenever either changes, and once more when it ends."""
    last: tuple[int, str] | None = None
    while True:
        done = job.done  # read before the records, so the last yield sees every record
        records = read_metrics(job.output_dir)
        text = progress_text(job, records)
        if done or (len(records), text) != last:
            last = (len(records), text)
            yield loss_frame(records), text
        if done:
            return
        job.wait(poll)


def finished_source(job: TrainJob) -> str | None:
    """The run folder to pick once the job is done, when it left a checkpoint (None when it failed or
    stopped before its first step)."""
    from aksis.checkpoint import find_checkpoint

    if job.error is not None or job.result is None:
        return None
    try:
        find_checkpoint(job.output_dir)
    except CheckpointError:
        return None
    return str(job.output_dir)


@spread("run", RunRequest, RUN_INPUTS)
def run_training(
    ctx: AppContext, slot: TrainingSlot, run: RunRequest, request: gr.Request | None = None
) -> Iterator[Any]:
    """The `/train` event: start a run for the visitor's session, then yield its loss plot and progress as it goes;
    at the end, the new model picked (with the status line and the first-start banner, when the page has them)."""
    status, welcome = ctx.extra.get("status"), ctx.extra.get("welcome")
    session = request.session_hash if request is not None else None
    with user_errors("start training"):
        try:
            job = start_run(slot, ctx.settings, run, ctx.store.loaded(), session)
        except TrainingBusy as err:
            raise input_error(f"Not started: {err}") from err
    rest = [gr.skip()] * (1 + (status is not None) + (welcome is not None))  # the picker, status, banner
    for frame, text in follow(job):
        yield frame, text, *rest
    if job.error is not None:
        raise input_error(f"Training {job.name} failed: {job.error}")
    source = finished_source(job)
    if source is None:
        return
    final: list[Any] = [
        gr.Dropdown(choices=ctx.store.choices(ctx.settings.model), value=source, allow_custom_value=True)
    ]
    if status is not None:
        with user_errors("load the trained model"):
            final.append(ctx.store.get(source).describe())
    if welcome is not None:
        final.append(gr.Column(visible=False))
    yield frame, f"{text} It is now picked in the model picker.", *final


def push_run(
    source: str | None, repo_id: str, token: str | None, settings: AppSettings, session: str | None = None
) -> str:
    """Push the picked local model (a run's best/ or newest step-N, or a checkpoint folder) to `repo_id`, with
    `token`, else (only in one's own app) the app's own login or HF_TOKEN. A public Space never lends its token
    (its owner's) to a visitor, who could otherwise overwrite any repo the owner may write to, and pushes a run only
    for the visitor who trained it (`session`), or for its owner (a token of `settings.space_owner`)."""
    from huggingface_hub import get_token

    from aksis.checkpoint import find_checkpoint, is_local
    from aksis.hub import is_hub_id, push_checkpoint

    source = text_value(source, "picked model").strip()
    repo_id = text_value(repo_id, "repo id").strip()
    token = text_value(token, "token").strip() or None
    if not source or not is_local(source):
        raise ValueError(
            "pick a local model (a run trained here, or a folder) to push; the picked one "
            f"{'is ' + repr(source) if source else 'is empty'}"
        )
    inside = Path(source).expanduser().resolve().is_relative_to(settings.checkpoints_dir.resolve())
    if not settings.local_paths and not inside:  # a Space pushes only what was trained here
        raise ValueError(f"this app pushes only the runs in {settings.checkpoints_dir}/: pick one of those")
    if not is_hub_id(repo_id) or "@" in repo_id:
        raise ValueError(f"repo id {echo(repo_id)}: give user/name or org/name")
    if token is None and not settings.local_paths:
        raise ValueError("no Hub token: paste a write token of your own into the token box (this Space lends none)")
    if token is None and not get_token():
        raise ValueError("no Hub token: paste a write token into the token box, or set HF_TOKEN for the app")
    checkpoint = find_checkpoint(source)
    if not settings.local_paths and not trained_by(Path(source), session):
        check_space_owner(token, settings.space_owner, Path(source).name, repo_id)
    commit = push_checkpoint(checkpoint, repo_id, token=token, commit_message=f"aksis: {Path(source).name}")
    return f"Pushed `{checkpoint}` to **{repo_id}** (commit `{commit[:8]}`). Load it back with the id `{repo_id}`."


def check_space_owner(token: str | None, owner: str | None, run: str, repo_id: str) -> None:
    """ValueError unless `token` is a token of the Space's owner: a run someone else trained is theirs to push."""
    from aksis.hub import HUB_FAILURES, explain

    refusal = (
        f"the run {run!r} was trained by another visitor (or is the Space's own): only they can push it. Train a run "
        "of your own to push it"
    )
    if owner is None or token is None:
        raise ValueError(refusal)
    from huggingface_hub import HfApi

    try:
        name = HfApi().whoami(token=token).get("name")
    except HUB_FAILURES as err:
        raise explain(err, repo_id, "push to") from None
    if name != owner:
        raise ValueError(refusal)


# ----- the tab -----


def build(ctx: AppContext) -> None:
    slot = TrainingSlot(owner_only=not ctx.settings.local_paths)
    ctx.extra["training"] = slot
    settings = ctx.settings

    with gr.Tab("Train", elem_id="train-tab"):
        gr.Markdown(
            "Train a tiny GPT (2 layers × 128, the recipe of `training/configs/tiny-cpu.yaml`) right here: "
            "about one pass over the plays, a few minutes on a laptop CPU. It trains into "
            f"`{settings.checkpoints_dir}/<run name>` and is picked in the model picker when done. "
            "For bigger models and corpora use `training/train.py`."
        )
        with gr.Row():
            with gr.Column():
                corpus = gr.Radio(
                    [("Shakespeare (embedded)", "shakespeare"), ("my .txt file", "upload")],
                    value="shakespeare",
                    label="Corpus",
                    elem_id="train-corpus",
                )
                upload = gr.File(
                    file_types=[".txt"],
                    type="filepath",
                    label=f"Text file (UTF-8, {MIN_UPLOAD_CHARS:,} characters to {MAX_UPLOAD_BYTES >> 20} MiB)",
                    elem_id="train-upload",
                )
                tokenizer = gr.Radio(
                    [("BPE, 10k tokens (the recipe)", "bpe"), ("bytes (no tokenizer training)", "byte")],
                    value=RECIPE["tokenizer"],
                    label="Tokenizer",
                    elem_id="train-tokenizer",
                )
            with gr.Column():
                name = gr.Textbox(
                    label="Run name",
                    placeholder="empty: quick-<corpus> (the next free one)",
                    elem_id="train-name",
                )
                # A Space never overwrites (start_run refuses): no box to tick there.
                overwrite = gr.Checkbox(
                    label="Overwrite a run of this name", visible=settings.local_paths, elem_id="train-overwrite"
                )
                steps = slider(1, MAX_STEPS, value=RECIPE["max_steps"], step=1, label="Steps", elem_id="train-steps")
                with gr.Row():
                    start = gr.Button("Train", variant="primary", elem_id="train-start")
                    stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
        progress = gr.Markdown(elem_id=PROGRESS_ID)
        plot = gr.LinePlot(
            loss_frame([]),
            x="step",
            y="loss",
            color="curve",
            title="Loss (nats per token)",
            height=300,
            elem_id="train-plot",
        )

        with gr.Accordion("Share on the Hugging Face Hub", open=False, elem_id="train-hub"):
            whose = (
                "comes from HF_TOKEN when the app has one, or from the box below"
                if settings.local_paths
                else "of your own goes in the box below (it is used for this push only, never stored)"
            )
            gr.Markdown(
                "Push the picked local model (its best checkpoint) to a model repo, with a model card. A token "
                f"with write access {whose}."
            )
            with gr.Row():
                repo = gr.Textbox(label="Repo id", placeholder="user/tiny-shakespeare", elem_id="hub-repo")
                token = gr.Textbox(
                    label="Hub token (not needed when HF_TOKEN is set)" if settings.local_paths else "Hub token",
                    type="password",
                    elem_id="hub-token",
                )
            push = gr.Button("Push", elem_id="hub-push")
            pushed = gr.Markdown(elem_id="hub-push-status")

    status = ctx.extra.get("status")
    welcome = ctx.extra.get("welcome")
    outputs: list[Any] = [plot, progress, ctx.picker]
    if status is not None:
        outputs.append(status)
    if welcome is not None:
        outputs.append(welcome)

    def quick_start(request: gr.Request | None = None) -> Iterator[Any]:
        """The first-start button: a RunRequest's defaults."""
        yield from run_training(ctx, slot, **asdict(RunRequest()), request=request)

    def stop_run(request: gr.Request | None = None) -> str:
        return slot.stop(request.session_hash if request is not None else None)

    def push_picked(source: str | None, repo_id: str, token: str, request: gr.Request | None = None) -> str:
        with user_errors("push to the Hub"):
            return push_run(source, repo_id, token, settings, request.session_hash if request is not None else None)

    # concurrency_limit=None: the slot allows one run, and a second request must reach it to be told so,
    # rather than wait silently in the queue behind the first.
    controls = dict(corpus=corpus, upload=upload, name=name, overwrite=overwrite, steps=steps, tokenizer=tokenizer)
    start.click(
        bound(run_training, ctx, slot),  # the API's parameters: run_training's own after these two
        [controls[n] for n in RUN_INPUTS],
        outputs,
        api_name="train",
        concurrency_limit=None,
    )
    # A file dropped in means: train on it.
    upload.upload(lambda: "upload", None, corpus, api_visibility="private", queue=False)
    stop.click(stop_run, None, progress, api_name="stop_training", concurrency_limit=None)
    push.click(push_picked, [ctx.picker, repo, token], pushed, api_name="push")
    if ctx.welcome_button is not None:
        # Show the Train tab (its button is the tab's elem_id + "-button"), where the run's progress is drawn.
        ctx.welcome_button.click(
            None, js="() => { document.getElementById('train-tab-button')?.click(); }", api_visibility="private"
        )
        ctx.welcome_button.click(quick_start, None, outputs, api_visibility="private", concurrency_limit=None)
