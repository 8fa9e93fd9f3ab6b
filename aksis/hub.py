"""Sharing checkpoints on the Hugging Face Hub: push a checkpoint folder as a commit (with a model card and a
loss curve), tag it, push a training run's checkpoints as it goes, find a user's aksis models, and pull a run's
training state to resume elsewhere.

Pulling a checkpoint needs nothing from here: everything that loads one (`load_model`, `--checkpoint-path`,
`--init-from`) takes a local folder or a Hub id, optionally `user/name@revision`, through the Hub cache
(aksis.checkpoint).

Tokens come from huggingface_hub itself (HF_TOKEN, or the login saved by `hf auth login`); aksis never reads,
prints or stores one. A push says it pushed only what happened:

- The model card (aksis.card) is checked with the Hub before anything is created or uploaded (a license id the Hub
  does not know, say), and before a run trains.
- Visibility: `private=True` or `False` makes an existing repo private or public (and checks that it is);
  None leaves it as it is (a new repo is public).
- A tag names the commit pushed, or the push fails: a tag already on another commit is moved only when asked
  (`move_tag`; a run moves its step-N tags when it was resumed or started with --overwrite, and refuses to start
  in a repo that holds another run's step tags).
- Hub failures become `HubError`s that say what happened in the Hub's own words and what to do; `transient` ones
  (rate limits, server errors, the network) are worth retrying. A failed push never touches the local checkpoint.
- Nothing pushed names a place of this machine (aksis.card.public_files): datasets and checkpoints by their
  public names, no run folder or cache paths, in the card and in the pushed training state alike.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import disable_progress_bars, validate_repo_id

from aksis.card import (
    LOSS_CURVE_FILE,
    card_metadata,
    model_card,
    plot_loss_curve,
    public_files,
    sample_generations,
)
from aksis.checkpoint import (
    BEST_DIR,
    CARD_FILE,
    CONFIG_FILE,
    REQUIRED_FILES,
    CheckpointError,
    find_checkpoint,
    split_revision,
)
from aksis.runs import STEP_DIR, TRAINING_STATE_DIR, read_metrics, read_trainer_state

log = logging.getLogger(__name__)

TRAINING_STATE_BRANCH = "training-state"
STEP_TAG = "step-"  # a run tags each step checkpoint it pushes step-N


class HubError(Exception):
    """A Hub operation failed; the message says what to do (and never holds a token). `transient`: a rate limit, a
    server error or the network, which a later try may get past."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


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
# Everything a Hub call may raise for a bad id, bad credentials, a missing repo, a refusal or no network.
HUB_FAILURES: tuple[type[Exception], ...] = (
    hf_errors.HfHubHTTPError,
    hf_errors.OfflineModeIsEnabled,
    hf_errors.HFValidationError,
    hf_errors.LocalEntryNotFoundError,
    OSError,
    *TRANSPORT_ERRORS,
)


def _said(err: Exception) -> str:
    """What the Hub said about a failed request: its own message where it sent one, else the error's first line."""
    said = getattr(err, "server_message", None) or next(iter(str(err).strip().splitlines()), "")
    return " ".join(str(said or type(err).__name__).split())


def explain(err: Exception, repo_id: str, action: str) -> HubError:
    """A HubError for a huggingface_hub failure while `action` (e.g. "push to") on `repo_id`: what happened, in the
    Hub's words where it gave some, and what to do."""
    cannot = f"cannot {action} {repo_id}"
    if hf_constants.HF_HUB_OFFLINE:
        return HubError(f"{cannot}: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    if isinstance(err, hf_errors.HFValidationError):
        return HubError(f"cannot {action} {repo_id!r}: not a valid Hub repo id (write it user/name)")
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    said = _said(err)
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return HubError(f"{cannot}: that revision (branch, tag or commit) does not exist ({said})")
    if isinstance(err, hf_errors.RepositoryNotFoundError) or (status == 404 and "repo" in said.lower()):
        return HubError(
            f"{cannot}: the repo does not exist, or your token cannot see it. Check the id, and log in "
            "(`hf auth login` or HF_TOKEN) with a token that has access"
        )
    if status == 404:
        return HubError(f"{cannot}: the Hub found nothing there (404): {said}")
    if status in (401, 403):
        access = "write access" if action.startswith(("push", "create", "tag")) else "access"
        return HubError(
            f"{cannot}: no {access} ({status}). Log in with `hf auth login` or set HF_TOKEN to a token with "
            f"{access} to that user or organisation (the Hub said: {said})"
        )
    if status == 400:
        return HubError(f"{cannot}: the Hub refused the request (400): {said}")
    if status == 409:
        return HubError(f"{cannot}: it conflicts with what the repo holds (409): {said}")
    if status == 413:
        return HubError(f"{cannot}: the Hub refused it as too large (413): {said}")
    if status == 429:
        wait = response.headers.get("Retry-After") if response is not None else None
        after = f"; try again in {wait} s" if wait else "; try again later"
        return HubError(f"{cannot}: rate limited by the Hub (429): {said}{after}", transient=True)
    if status is not None and status >= 500:
        return HubError(f"{cannot}: the Hub failed ({status}): {said}; try again later", transient=True)
    if isinstance(err, hf_errors.LocalEntryNotFoundError) or (status is None and isinstance(err, TRANSPORT_ERRORS)):
        reason = type(err).__name__
        return HubError(f"{cannot}: the Hub cannot be reached ({reason}); check the network", transient=True)
    if status is not None:
        return HubError(f"{cannot}: the Hub answered {status}: {said}")
    return HubError(f"{cannot}: {type(err).__name__}: {err}")


def check_repo_id(repo_id: str, action: str = "push to") -> None:
    """A HubError, before any request, for an id the Hub would refuse (write it user/name)."""
    try:
        validate_repo_id(repo_id)
    except hf_errors.HFValidationError as err:
        raise explain(err, repo_id, action) from None
    if repo_id.count("/") != 1:
        raise HubError(f"cannot {action} {repo_id!r}: write a repo id as user/name or org/name")


def check_card(card: str, repo_id: str) -> None:
    """Ask the Hub whether it takes the card's metadata (it refuses a license id it does not know, for one), so that
    a bad card fails before anything is created, uploaded or trained. HubError with the Hub's reasons."""
    try:
        ModelCard(card).validate()
    except ValueError as err:  # the Hub's 400: its reasons, one per line
        reasons = "; ".join(_short(line.strip(" -")) for line in str(err).splitlines() if line.strip(" -"))
        raise HubError(
            f"the Hub refuses the model card's metadata for {repo_id}: {reasons}. Fix it (--license takes an id the "
            "Hub knows, such as mit or apache-2.0) and try again; nothing was pushed"
        ) from None
    except HUB_FAILURES as err:
        raise explain(err, repo_id, "check the model card for") from None


def _short(reason: str, shown: int = 8) -> str:
    """A reason of the Hub's with a long list of what it accepts ("must be one of [a, b, ...]") cut to a few."""
    head, bracket, rest = reason.partition("[")
    items = rest.rstrip("]").split(", ")
    if not bracket or len(items) <= shown:
        return reason
    return f"{head}[{', '.join(items[:shown])}, …]"


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


def ensure_repo(repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Create the model repo if it does not exist (checking write access on the way), and give it the visibility
    asked for (`private`; None: a new repo is public, an existing one stays as it is). Its URL."""
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=bool(private), exist_ok=True)
        if private is not None and api.repo_info(repo_id).private != private:
            api.update_repo_settings(repo_id, private=private)
            if api.repo_info(repo_id).private != private:
                now = "public" if private else "private"
                raise HubError(f"{repo_id} is still {now} after asking the Hub to change its visibility")
    except HUB_FAILURES as err:
        raise explain(err, repo_id, "create or push to") from None
    return str(url)


def tags_of(repo_id: str, token: str | None = None) -> dict[str, str]:
    """The tags of a repo: name -> commit."""
    try:
        return {t.name: t.target_commit for t in HfApi(token=token).list_repo_refs(repo_id).tags}
    except HUB_FAILURES as err:
        raise explain(err, repo_id, "read the tags of") from None


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
    move_tag: bool = False,
    private: bool | None = None,
    license: str | None = None,
    train_config: dict[str, Any] | None = None,
    commit_message: str | None = None,
    with_training_state: bool = False,
    samples: bool = True,
    token: str | None = None,
    name: str | None = None,
) -> str:
    """Push a checkpoint folder (or a training run's best/ or newest step-N/) as one commit to `repo_id` (created
    if needed; `private` as in `ensure_repo`) on `branch` (default: main), with a generated model card and loss
    curve, and tag the commit `tag` (moving a tag that names another commit only with `move_tag`). Files that did
    not change are not uploaded again, and a push that changes nothing makes no commit. `name`: what the logs call
    the folder (a background push reads a snapshot of it). Returns the commit id."""
    check_repo_id(repo_id)
    try:
        folder = Path(find_checkpoint(Path(folder).expanduser()))
    except CheckpointError as err:
        raise HubError(f"{err}; nothing pushed") from None
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise HubError(f"{folder} is not a complete checkpoint folder (missing {', '.join(missing)}); nothing pushed")
    name = name or str(folder)
    if train_config is None:
        train_config = _run_settings(folder)
    staging = stage_checkpoint(folder, with_training_state)
    try:
        public_files(staging)
        has_curve = plot_loss_curve(read_metrics(staging), staging / LOSS_CURVE_FILE)
        generated: list[tuple[str, str]] = []
        if samples:
            try:
                generated = sample_generations(staging)
            except Exception as err:  # a card without samples is still a card
                log.warning("no sample generations for the model card: %s", err)
        card = model_card(
            staging, repo_id, train_config=train_config, license=license, samples=generated, loss_curve=has_curve
        )
        (staging / CARD_FILE).unlink(missing_ok=True)  # a hard link: replace it, never write through it
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        check_card(card, repo_id)
        ensure_repo(repo_id, private=private, token=token)
        api = HfApi(token=token)
        revision = branch or "main"
        try:
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            tagged = tags_of(repo_id, token).get(tag) if tag else None
            head = api.repo_info(repo_id, revision=revision).sha
            if tagged is not None and tagged != head and not move_tag:
                raise HubError(
                    f"tag {tag} of {repo_id} already names commit {tagged[:8]} (another push): nothing pushed. Give "
                    "another tag, or move it to this push (`aksis push --move-tag`; a training run moves its step "
                    "tags when resumed or started with --overwrite)"
                )
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                commit_message=commit_message or f"aksis: upload {folder.name}",
                delete_patterns=[f"{TRAINING_STATE_DIR}/**"] if with_training_state else None,
            )
            commit = str(info.oid)
            if tag and tagged != commit:
                if tagged is not None and not move_tag:  # it named the old head, which this push moved past
                    raise HubError(
                        f"pushed {name} to {repo_id}@{revision} as commit {commit[:8]}, but tag {tag} still names "
                        f"{tagged[:8]}: push again with --move-tag to move it"
                    )
                if tagged is not None:
                    api.delete_tag(repo_id, tag=tag)
                api.create_tag(repo_id, tag=tag, revision=commit)
        except HUB_FAILURES as err:
            raise explain(err, repo_id, "push to") from None
        log.info("pushed %s to %s@%s (%s%s)", name, repo_id, revision, commit[:8], f", tagged {tag}" if tag else "")
        return commit
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class BackgroundPusher:
    """Pushes checkpoints one at a time on a worker thread, so training never waits for the network. A push that
    fails for a reason a later try may get past (a rate limit, a server error, the network, the disk) is tried
    `attempts` times with exponential backoff; one the Hub refused is not tried again. A push that still fails is
    logged and recorded in `errors`, and training goes on. `wait()` blocks until every queued push is done."""

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
        self._futures.append(self._pool.submit(self._run, snapshot, folder, kwargs))

    def _run(self, snapshot: Path, folder: Path, kwargs: dict[str, Any]) -> str | None:
        try:
            for attempt in range(1, self.attempts + 1):
                try:
                    commit = self._push(snapshot, name=str(folder), **kwargs)
                    self.pushed.append(commit)
                    return commit
                except Exception as err:  # whatever fails (the Hub, the network, the disk, a bug), training goes on
                    refused = isinstance(err, HubError) and not err.transient
                    if refused or attempt == self.attempts:
                        tries = f"after {attempt} attempts" if attempt > 1 or not refused else "(not retried)"
                        message = f"push of {folder.name} failed {tries}: {err}"
                        log.warning("%s (the local checkpoint is intact)", message)
                        self.errors.append(message)
                        return None
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    log.warning("push of %s failed (%s); retrying in %.0f s", folder.name, err, delay)
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
    (tagged step-N) whenever the step passes a multiple of `every` (default: each one), and always the last; with
    `training_state` also their resumable state (branch training-state); at the end the best checkpoint to main.
    `move_tags`: step tags already in the repo are this run's to move (a resumed run, or --overwrite). `open`
    checks the repo, the card and the tags first, so a run that cannot push as asked fails before it trains."""

    def __init__(
        self,
        repo_id: str,
        *,
        every: int | None = None,
        training_state: bool = False,
        license: str | None = None,
        train_config: dict[str, Any] | None = None,
        move_tags: bool = False,
        pusher: BackgroundPusher | None = None,
    ) -> None:
        self.repo_id, self.every, self.training_state = repo_id, every or 1, training_state
        self.common: dict[str, Any] = dict(repo_id=repo_id, license=license, train_config=train_config)
        self.move_tags = move_tags
        self.pusher = pusher or BackgroundPusher(push_checkpoint)
        self.last_pushed: int | None = None  # the step of the last step checkpoint pushed

    @classmethod
    def open(
        cls,
        repo_id: str,
        *,
        private: bool | None = None,
        arch: str | None = None,
        token: str | None = None,
        **options: Any,
    ) -> PushSchedule:
        """A schedule for a repo created now if needed, with the visibility asked for, whose card metadata the Hub
        takes, and whose step tags (if any) this run may move. HubError otherwise."""
        check_repo_id(repo_id)
        metadata = card_metadata(
            repo_id, arch=arch, train_config=options.get("train_config"), license=options.get("license")
        )
        check_card(f"---\n{metadata.to_yaml()}\n---\n", repo_id)
        url = ensure_repo(repo_id, private=private, token=token)
        others = sorted((t for t in tags_of(repo_id, token) if t.startswith(STEP_TAG)), key=_step_of)
        if others and not options.get("move_tags"):
            shown = ", ".join(others[:4]) + (" …" if len(others) > 4 else "")
            raise HubError(
                f"{repo_id} already holds the step tags of another run ({shown}): push this run to another repo, "
                "or give --overwrite to move them to this run's checkpoints"
            )
        log.info("pushing checkpoints to %s", url)
        disable_progress_bars()  # upload bars from the push thread would tear through the training bar
        return cls(repo_id, **options)

    def saved(self, checkpoint: Path, step: int, last: bool = False) -> None:
        """A step checkpoint was saved: queue its push when the step passed a multiple of `every` since the last
        one pushed (and for the `last` one)."""
        if not last and step // self.every <= (self.last_pushed or 0) // self.every:
            return
        self.last_pushed = step
        tag = f"{STEP_TAG}{step}"
        self.pusher.submit(
            checkpoint, tag=tag, move_tag=self.move_tags, commit_message=f"aksis: step {step}", **self.common
        )
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
            log.warning("%d push(es) to %s failed", len(self.pusher.errors), self.repo_id)
        else:
            log.info("pushed to %s", self.repo_id)
        return list(self.pusher.errors)


def _step_of(tag: str) -> int:
    number = tag.removeprefix(STEP_TAG)
    return int(number) if number.isdigit() else -1


# ----- finding and pulling -----


def list_models(author: str, *, token: str | None = None) -> list[str]:
    """Repo ids of the aksis models (library_name: aksis) of a user or organisation, newest first."""
    try:
        models = HfApi(token=token).list_models(author=author, filter="aksis", sort="last_modified")
        return [m.id for m in models if m.library_name in (None, "aksis") or "aksis" in (m.tags or [])]
    except HUB_FAILURES as err:
        raise explain(err, author, "list the models of") from None


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
        raise explain(err, source, "download") from None


def is_hub_id(source: str) -> bool:
    """True for `user/name` or `user/name@revision` that is not an existing local path."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return False
    repo_id, _ = split_revision(source)
    return repo_id.count("/") == 1
