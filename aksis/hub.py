"""Sharing checkpoints on the Hugging Face Hub: push a checkpoint folder as a commit (with a model card and a
loss curve), tag it, find a user's aksis models, and pull a run's training state to resume elsewhere.

Pulling a checkpoint needs nothing from here: everything that loads one (`GPT.from_pretrained`,
`--checkpoint-path`, `--init-from`) takes a local folder or a Hub id, optionally `user/name@revision`, through
the Hub cache (aksis.checkpoint).

Tokens come from huggingface_hub itself (HF_TOKEN, or the login saved by `hf auth login`); aksis never reads,
prints or stores one. Hub failures become `HubError`s that say what to do; a failed push never touches the
local checkpoint.

The model card (the repo's README.md) is written from the checkpoint: YAML metadata (library_name: aksis,
pipeline_tag, tags, datasets, license, and `model-index` with the results of eval_results.json), then the
architecture, the training setup and data, a loss curve drawn from metrics.jsonl (loss_curve.png), sample
generations and how to use the model.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi, ModelCardData, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import disable_progress_bars

from aksis.checkpoint import (
    BEST_DIR,
    CARD_FILE,
    CONFIG_FILE,
    EVAL_RESULTS_FILE,
    REQUIRED_FILES,
    load_model,
    read_json,
    read_model_config,
    split_revision,
)
from aksis.config import ModelConfig
from aksis.corpora import HUB_CORPORA
from aksis.generation import generate
from aksis.model import GPT
from aksis.plots import loss_curves, loss_figure
from aksis.runs import STEP_DIR, TRAINING_STATE_DIR, read_metrics, read_trainer_state

log = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"
TRAINING_STATE_BRANCH = "training-state"
SAMPLE_PROMPTS = ("The ", "Once upon a time", "ROMEO:")


class HubError(Exception):
    """A Hub operation failed; the message says what to do (and never holds a token)."""


def _transport_errors() -> tuple[type[Exception], ...]:
    """The connection errors of the HTTP libraries huggingface_hub may run on (httpx2 in 2.x, httpx, requests)."""
    found: list[type[Exception]] = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()
# Everything a Hub call may raise for a bad id, bad credentials, a missing repo or no network.
HUB_FAILURES: tuple[type[Exception], ...] = (
    hf_errors.HfHubHTTPError,
    hf_errors.OfflineModeIsEnabled,
    hf_errors.HFValidationError,
    hf_errors.LocalEntryNotFoundError,
    OSError,
    *TRANSPORT_ERRORS,
)


def _explain(err: Exception, repo_id: str, action: str) -> HubError:
    """A HubError for a huggingface_hub failure while `action` (e.g. "push to") on `repo_id`."""
    if hf_constants.HF_HUB_OFFLINE:
        return HubError(f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, hf_errors.RepositoryNotFoundError) or status == 404:
        return HubError(
            f"cannot {action} {repo_id}: the repo does not exist, or your token cannot see it. Check the id, and "
            "log in (`hf auth login` or HF_TOKEN) with a token that has access"
        )
    if status in (401, 403):
        access = "write access" if action.startswith(("push", "create")) else "access"
        return HubError(
            f"cannot {action} {repo_id}: no {access} ({status}). Log in with `hf auth login` or set HF_TOKEN to "
            f"a token with {access} to that user or organisation"
        )
    if isinstance(err, hf_errors.HFValidationError):
        return HubError(f"cannot {action} {repo_id!r}: not a valid Hub repo id (write it user/name)")
    if isinstance(err, TRANSPORT_ERRORS):
        reason = type(err).__name__
        return HubError(f"cannot {action} {repo_id}: the Hub cannot be reached ({reason}); check the network")
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return HubError(f"cannot {action} {repo_id}: that revision does not exist")
    return HubError(f"cannot {action} {repo_id}: {type(err).__name__}: {err}")


# ----- the model card -----


def plot_loss_curve(records: Sequence[dict[str, Any]], target: Path) -> bool:
    """Draw training and validation loss against tokens seen into `target` (PNG); False when there is nothing
    to draw."""
    figure = loss_figure(loss_curves(records, x="tokens"), x="tokens")
    if figure is None:
        return False
    figure.savefig(target)
    return True


def _eval_results(folder: Path, dataset: str) -> list[EvalResult]:
    """`model-index` entries from eval_results.json: {"dataset": ..., "split": ..., "metrics": {name: value}}
    (or a flat {name: value})."""
    path = folder / EVAL_RESULTS_FILE
    if not path.is_file():
        return []
    data = read_json(path)
    metrics = data.get("metrics", data)
    name = str(data.get("dataset", dataset))
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=name,
            dataset_name=name,
            dataset_split=data.get("split"),
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in metrics.items()
        if isinstance(value, int | float) and math.isfinite(value)
    ]


def _hub_dataset(dataset: str | None) -> str | None:
    """The Hub id of a training dataset, for the card's `datasets:` (None for local files and embedded text)."""
    if not dataset:
        return None

    if dataset in HUB_CORPORA:
        return HUB_CORPORA[dataset].path
    if "/" in dataset and not Path(dataset).expanduser().exists() and dataset.count("/") == 1:
        return dataset
    return None


def _samples(folder: Path, prompts: Sequence[str]) -> list[tuple[str, str]]:
    """A few generations of the checkpoint (CPU, seeded) for the card."""
    model, tokenizer, defaults = load_model(folder, device="cpu")
    config = replace(defaults, max_new_tokens=48, seed=0, num_beams=1)
    return [(p, generate(model, tokenizer, p, config).text) for p in prompts]


def model_card(
    folder: str | Path,
    repo_id: str,
    *,
    train_config: dict[str, Any] | None = None,
    license: str | None = None,
    samples: Sequence[tuple[str, str]] = (),
    loss_curve: bool = False,
) -> str:
    """The README.md of a checkpoint folder's Hub repo."""
    folder = Path(folder)
    config = read_model_config(folder / CONFIG_FILE)
    train = train_config or {}
    records = read_metrics(folder)
    dataset = train.get("dataset")
    hub_dataset = _hub_dataset(dataset)
    arch = config.arch
    results = _eval_results(folder, hub_dataset or str(dataset or "unknown"))
    data = ModelCardData(
        library_name="aksis",
        pipeline_tag="text-generation",
        tags=["aksis", "text-generation", f"{arch}-style"],
        license=license,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )
    n_params = _parameter_count(config)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {n_params / 1e6:.1f}M-parameter decoder-only transformer language model, trained with "
        "[aksis](https://pypi.org/project/aksis/).",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| flavour | {_flavour(arch)} |",
        f"| layers | {config.n_layer} |",
        f"| model width (n_embd) | {config.n_embd} |",
        f"| attention heads (key/value) | {config.n_head} ({config.n_kv_head}) |",
        f"| MLP width (d_ff) | {config.d_ff} |",
        f"| context | {config.block_size} tokens |",
        f"| vocabulary | {config.vocab_size:,} tokens |",
        f"| parameters | {n_params:,} |",
        "",
    ]
    if train or records:
        lines += ["## Training", ""]
        if dataset:
            where = f"[{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})" if hub_dataset else f"`{dataset}`"
            fmt = " (conversations, loss on the assistant's replies)" if train.get("data_format") == "chat" else ""
            lines.append(f"- data: {where}{fmt}")
        for key, label in (
            ("init_from", "fine-tuned from"),
            ("tokenizer", "tokenizer"),
            ("batch_size", "batch size per process"),
            ("grad_accum_steps", "gradient accumulation"),
            ("optimizer", "optimizer"),
            ("learning_rate", "peak learning rate"),
            ("mixed_precision", "mixed precision"),
        ):
            if train.get(key) is not None:
                lines.append(f"- {label}: `{train[key]}`")
        last = records[-1] if records else {}
        if last:
            lines.append(f"- trained for {last.get('step', 0):,} steps, {last.get('tokens', 0):,} tokens")
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        if vals:
            best = min(vals)
            lines.append(f"- best validation loss: {best:.4f} nats/token (perplexity {math.exp(min(best, 50)):.2f})")
        lines.append("")
        if loss_curve:
            lines += [f"![training and validation loss]({LOSS_CURVE_FILE})", ""]
    if results:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {r.metric_type} | {r.metric_value:.4g} |" for r in results]
        lines.append("")
    if samples:
        lines += ["## Samples", "", "Default sampling settings, seed 0, 48 new tokens:", ""]
        for prompt, text in samples:
            lines += ["```text", (prompt + text).replace("```", "'''"), "```", ""]
    lines += [
        "## Use it",
        "",
        "With aksis installed:",
        "",
        "```bash",
        f'aksis generate-text --checkpoint-path {repo_id} --prompt "Once upon a time" --stream',
        f"aksis chat-with-model --checkpoint-path {repo_id}",
        "```",
        "",
        "```python",
        "from aksis.checkpoint import load_model",
        "from aksis.generation import generate",
        "",
        f'model, tokenizer, settings = load_model("{repo_id}")',
        'print(generate(model, tokenizer, "Once upon a time", settings).text)',
        "```",
        "",
    ]
    return "\n".join(lines)


def _flavour(arch: str) -> str:
    if arch == "llama":
        return "LLaMA style: rotary positions, RMSNorm, SwiGLU"
    return "GPT-2 style: learned positions, pre-norm LayerNorm, GELU"


def _parameter_count(config: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no time
        return GPT(config).num_params()


# ----- pushing -----


def stage_checkpoint(folder: Path, with_training_state: bool = False) -> Path:
    """A snapshot of a checkpoint folder beside it, made of hard links (or copies): a push reads it while
    training goes on and may delete the original (keep_last). The caller removes it."""
    staging = folder.parent / f".{folder.name}.push-{os.getpid()}-{time.monotonic_ns()}"
    staging.mkdir()
    _stage(folder, staging, with_training_state)
    return staging


def _stage(folder: Path, staging: Path, with_training_state: bool) -> None:
    for source in sorted(folder.rglob("*")):
        relative = source.relative_to(folder)
        if relative.parts[0] == TRAINING_STATE_DIR and not with_training_state:
            continue
        target = staging / relative
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def _run_settings(folder: Path) -> dict[str, Any] | None:
    """How a checkpoint was trained, for its card: a step-N checkpoint keeps it in its training state; a run's
    best/ borrows it from the newest step-N beside it."""
    steps = [p for p in folder.parent.iterdir() if STEP_DIR.match(p.name)] if folder.name == BEST_DIR else []
    for candidate in [folder, *sorted(steps, reverse=True)]:
        try:
            settings: dict[str, Any] | None = read_trainer_state(candidate).get("train_config")
        except (OSError, ValueError):  # no training state (or none readable): the card goes without
            continue
        return settings
    return None


def push_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    branch: str | None = None,
    tag: str | None = None,
    private: bool = False,
    license: str | None = None,
    train_config: dict[str, Any] | None = None,
    commit_message: str | None = None,
    with_training_state: bool = False,
    samples: bool = True,
    token: str | None = None,
) -> str:
    """Push a checkpoint folder as one commit to `repo_id` (created if needed) on `branch` (default: main),
    with a generated model card and loss curve; optionally tag the commit. Returns the commit id."""
    folder = Path(folder).expanduser()
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise HubError(f"{folder} is not a complete checkpoint folder (missing {', '.join(missing)}); nothing pushed")
    if train_config is None:
        train_config = _run_settings(folder)
    staging = stage_checkpoint(folder, with_training_state)
    try:
        has_curve = plot_loss_curve(read_metrics(staging), staging / LOSS_CURVE_FILE)
        generated: list[tuple[str, str]] = []
        if samples:
            try:
                generated = _samples(staging, SAMPLE_PROMPTS)
            except Exception as err:  # a card without samples is still a card
                log.warning("no sample generations for the model card: %s", err)
        card = model_card(
            staging, repo_id, train_config=train_config, license=license, samples=generated, loss_curve=has_curve
        )
        (staging / CARD_FILE).unlink(missing_ok=True)  # a hard link: replace it, never write through it
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch and branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=branch,
                commit_message=commit_message or f"aksis: upload {folder.name}",
                delete_patterns=[f"{TRAINING_STATE_DIR}/**"] if with_training_state else None,
            )
            if tag:
                api.create_tag(repo_id, tag=tag, revision=info.oid, exist_ok=True)
        except HUB_FAILURES as err:
            raise _explain(err, repo_id, "push to") from None
        log.info("pushed %s to %s (%s)", folder, repo_id, info.oid[:8] if info.oid else "?")
        return str(info.oid)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class BackgroundPusher:
    """Pushes checkpoints one at a time on a worker thread, so training never waits for the network. A push is
    tried `attempts` times with exponential backoff; a push that still fails is logged and recorded in
    `errors`, and training goes on. `wait()` blocks until every queued push is done."""

    def __init__(self, push: Callable[..., str], *, attempts: int = 3, backoff_s: float = 2.0) -> None:
        self._push, self.attempts, self.backoff_s = push, attempts, backoff_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aksis-push")
        self._futures: list[Future[str | None]] = []
        self.errors: list[str] = []
        self.pushed: list[str] = []

    def submit(self, folder: Path, **kwargs: Any) -> None:
        """Queue a push of `folder` as it is now (a snapshot is taken before returning)."""
        snapshot = stage_checkpoint(folder, kwargs.get("with_training_state", False))
        kwargs.setdefault("commit_message", f"aksis: upload {folder.name}")
        self._futures.append(self._pool.submit(self._run, snapshot, folder.name, kwargs))

    def _run(self, snapshot: Path, name: str, kwargs: dict[str, Any]) -> str | None:
        try:
            for attempt in range(1, self.attempts + 1):
                try:
                    commit = self._push(snapshot, **kwargs)
                    self.pushed.append(commit)
                    return commit
                except Exception as err:  # whatever fails (network, disk, a bug), training must go on
                    if attempt == self.attempts:
                        message = f"push of {name} failed after {attempt} attempts: {err}"
                        log.warning("%s (the local checkpoint is intact)", message)
                        self.errors.append(message)
                        return None
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    log.warning("push of %s failed (%s); retrying in %.0f s", name, err, delay)
                    time.sleep(delay)
            return None
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def wait(self) -> None:
        for future in self._futures:
            future.result()
        self._futures.clear()

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


class PushSchedule:
    """The pushes of a training run to `repo_id`, on a `BackgroundPusher`: the step checkpoints the trainer saves
    (tagged step-N; every `every` steps, default each one, and always the last), with `training_state` also their
    resumable state (branch training-state), and at the end the best checkpoint to main. `open` creates the repo
    first, so a run that cannot push fails before it trains."""

    def __init__(
        self,
        repo_id: str,
        *,
        every: int | None = None,
        training_state: bool = False,
        license: str | None = None,
        train_config: dict[str, Any] | None = None,
        pusher: BackgroundPusher | None = None,
    ) -> None:
        self.repo_id, self.every, self.training_state = repo_id, every or 1, training_state
        self.common: dict[str, Any] = dict(repo_id=repo_id, license=license, train_config=train_config)
        self.pusher = pusher or BackgroundPusher(push_checkpoint)
        self.last_pushed: int | None = None  # the step of the last step checkpoint pushed

    @classmethod
    def open(cls, repo_id: str, *, private: bool = False, **options: Any) -> PushSchedule:
        """A schedule for a repo created now if needed (HubError when it cannot be written)."""
        log.info("pushing checkpoints to %s", ensure_repo(repo_id, private=private))
        disable_progress_bars()  # upload bars from the push thread would tear through the training bar
        return cls(repo_id, **options)

    def saved(self, checkpoint: Path, step: int, last: bool = False) -> None:
        """A step checkpoint was saved: queue its push when one is due (and for the `last` one)."""
        if not last and self.last_pushed is not None and step - self.last_pushed < self.every:
            return
        self.last_pushed = step
        self.pusher.submit(checkpoint, tag=f"step-{step}", commit_message=f"aksis: step {step}", **self.common)
        if self.training_state:
            self.pusher.submit(
                checkpoint,
                branch=TRAINING_STATE_BRANCH,
                with_training_state=True,
                samples=False,
                commit_message=f"aksis: training state at step {step}",
                **self.common,
            )

    def finish(self, latest: Path, step: int, best: Path, best_step: int | None, best_loss: float | None) -> list[str]:
        """At the end of the run: push the last step checkpoint if --push-every skipped it, the best checkpoint to
        main, wait for every queued push; the pushes that failed."""
        if self.last_pushed != step and (latest / CONFIG_FILE).exists():
            self.saved(latest, step, last=True)
        if (best / CONFIG_FILE).exists():
            loss = f", validation loss {best_loss:.4f}" if best_loss is not None else ""
            self.pusher.submit(best, commit_message=f"aksis: best checkpoint (step {best_step}{loss})", **self.common)
        log.info("waiting for the pushes to %s to finish", self.repo_id)
        self.pusher.close()
        if self.pusher.errors:
            log.warning("%d push(es) failed; push later with `aksis push`", len(self.pusher.errors))
        else:
            log.info("pushed to %s", self.repo_id)
        return list(self.pusher.errors)


def ensure_repo(repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create the model repo if it does not exist (checking write access on the way); its URL."""
    try:
        return str(HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True))
    except HUB_FAILURES as err:
        raise _explain(err, repo_id, "create or push to") from None


# ----- finding and pulling -----


def list_models(author: str, *, token: str | None = None) -> list[str]:
    """Repo ids of the aksis models (library_name: aksis) of a user or organisation, newest first."""
    try:
        models = HfApi(token=token).list_models(author=author, filter="aksis", sort="last_modified")
        return [m.id for m in models if m.library_name in (None, "aksis") or "aksis" in (m.tags or [])]
    except HUB_FAILURES as err:
        raise _explain(err, author, "list the models of") from None


def download_checkpoint(source: str, *, token: str | None = None) -> Path:
    """A local folder with every file of a Hub checkpoint `user/name[@revision]` (training state included),
    through the Hub cache."""
    repo_id, revision = split_revision(source)
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token))
    except HUB_FAILURES as err:
        if isinstance(err, hf_errors.LocalEntryNotFoundError):
            raise HubError(
                f"{source} is not in the local Hub cache and the Hub cannot be reached (offline, or HF_HUB_OFFLINE is "
                "set): connect once to download it"
            ) from None
        raise _explain(err, source, "download") from None


def is_hub_id(source: str) -> bool:
    """True for `user/name` or `user/name@revision` that is not an existing local path."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return False
    repo_id, _ = split_revision(source)
    return repo_id.count("/") == 1
