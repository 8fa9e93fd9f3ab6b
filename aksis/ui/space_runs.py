"""The runs visitors train on a public Space: whose each one is, how many each visitor keeps, and when they expire.

A run trained from the Train tab of a Space holds `visitor.json` beside its checkpoints: a hash of the browser
session that started it (gr.Request.session_hash; the hash, so the file says nothing a visitor could reuse) and
when it started. Runs without the file are the Space's own (shipped with it, or put there by its owner): never
counted, never removed.

- A visitor keeps at most MAX_RUNS_PER_VISITOR runs at once.
- A visitor's run expires `ttl_s` after it started (AKSIS_RUN_HOURS) and is removed when a later run starts.
- The Space keeps at most MAX_SPACE_RUNS visitors' runs. When they are all there, the oldest one that has been kept
  at least MIN_KEEP_S (an hour to try it and push it) makes room: so a visitor who starts many runs, from many
  sessions, can fill the Space for an hour at most, never lock it.
- Only the visitor who trained a run pushes it (or the Space's owner, with a token of theirs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

VISITOR_FILE = "visitor.json"
MAX_RUNS_PER_VISITOR = 3
MAX_SPACE_RUNS = 20
MIN_KEEP_S = 3600.0


def visitor_id(session: str | None) -> str | None:
    """What `visitor.json` keeps of a browser session: a hash of its id (None: no session, e.g. a Python caller)."""
    return None if session is None else hashlib.sha256(f"aksis-visitor:{session}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class VisitorRun:
    folder: Path
    visitor: str | None
    started: float


def mark_run(folder: Path, session: str | None, now: float | None = None) -> None:
    """Note in `folder` that the visitor of `session` trains it, from now."""
    record = {"visitor": visitor_id(session), "started": time.time() if now is None else now}
    (folder / VISITOR_FILE).write_text(json.dumps(record), encoding="utf-8")


def read(folder: Path) -> VisitorRun | None:
    """The visitor's run in `folder`; None for a folder of the Space's own (no readable visitor.json)."""
    try:
        record = json.loads((folder / VISITOR_FILE).read_text(encoding="utf-8"))
        started = float(record["started"])
        visitor = record["visitor"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return VisitorRun(folder, visitor if isinstance(visitor, str) else None, started)


def visitor_runs(checkpoints_dir: Path) -> list[VisitorRun]:
    """The visitors' runs in `checkpoints_dir`, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    runs = [run for path in checkpoints_dir.iterdir() if path.is_dir() and (run := read(path)) is not None]
    return sorted(runs, key=lambda run: run.started)


def trained_by(folder: Path, session: str | None) -> bool:
    """Whether the visitor of `session` trained the run in `folder`, or holds the checkpoint inside it."""
    for candidate in (folder, *folder.parents):
        run = read(candidate)
        if run is not None:
            return session is not None and run.visitor == visitor_id(session)
    return False


def _minutes(seconds: float) -> str:
    return f"{max(1, round(seconds / 60))} min"


def make_room(
    checkpoints_dir: Path, session: str | None, ttl_s: float, busy: Iterable[Path] = (), now: float | None = None
) -> list[Path]:
    """Before a visitor's new run: remove the expired runs and, when the Space is full, the oldest one kept at least
    MIN_KEEP_S; the folders removed. ValueError, saying when to come back, when the visitor has their
    MAX_RUNS_PER_VISITOR already or no run can make room yet. `busy` runs (training, or loaded) are never removed."""
    now = time.time() if now is None else now
    keep = {Path(p).resolve() for p in busy}
    runs = visitor_runs(checkpoints_dir)
    removed = []
    for run in runs:
        if now - run.started >= ttl_s and run.folder.resolve() not in keep:
            shutil.rmtree(run.folder, ignore_errors=True)
            removed.append(run.folder)
    runs = [run for run in runs if run.folder not in removed]
    mine = [run for run in runs if session is not None and run.visitor == visitor_id(session)]
    if len(mine) >= MAX_RUNS_PER_VISITOR:
        raise ValueError(
            f"you have {len(mine)} runs on this Space, as many as a visitor keeps: the oldest, "
            f"{mine[0].folder.name!r}, expires in {_minutes(mine[0].started + ttl_s - now)} (push the ones to keep "
            "to the Hub), or train on your own machine"
        )
    if len(runs) >= MAX_SPACE_RUNS:
        old = [run for run in runs if now - run.started >= MIN_KEEP_S and run.folder.resolve() not in keep]
        if not old:
            wait = min(run.started for run in runs) + MIN_KEEP_S - now
            raise ValueError(
                f"this Space holds {len(runs)} visitors' runs, its limit, all started within the hour: try again in "
                f"{_minutes(wait)}, or train on your own machine (the Train tab of `python app.py`, or "
                "training/train.py)"
            )
        shutil.rmtree(old[0].folder, ignore_errors=True)
        removed.append(old[0].folder)
    return removed
