"""Human feedback: likes and dislikes of chat replies and blind A/B votes, one JSON object per line.

Records are appended to a local JSONL file (`path`), which the leaderboard reads. When a Hub dataset repo is
configured (AKSIS_FEEDBACK_REPO), each record also goes to a file of this process's own,
`<path stem>-hub/<time>-<random>.jsonl`, and a `huggingface_hub.CommitScheduler` commits that folder to the
repo's `feedback/` every few minutes from a background thread (and once more when the process exits). A file
per process, not one shared file, because the scheduler uploads whole files: a restarted Space starts with an
empty disk, and its first commit of a shared name would replace every record of the runs before it. Writes
hold the scheduler's lock, so a commit never uploads half a line.

With a repo, the records already on the Hub are read once at start, so the leaderboard of a restarted Space
still counts them (records carry an id; one seen both locally and on the Hub counts once). The Hub is optional:
when the repo cannot be reached or written, `hub_error` says why and feedback stays local.

Bounds, since visitors write this log: a record is at most MAX_RECORD_BYTES (the app records only what it wrote
itself: its replies, and the prompts it answered, which it bounds); a session records at most RATE records a minute;
and the log is read once, at start: the leaderboard is a running `Tally`, updated as votes are appended.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HUB_FOLDER = "feedback"  # where the records go in the dataset repo
WINNERS = ("a", "b", "tie", "both-bad")  # what a "vote" record's `winner` may be
MAX_RECORD_BYTES = 256 << 10  # a long conversation of a model with a long context, as JSON, fits many times over
RATE = (30, 60.0)  # at most this many records per session in this many seconds


class FeedbackRefused(ValueError):
    """A record was not kept (too large, or too many from one session); the message says why."""


class FeedbackLog:
    def __init__(
        self,
        path: Path,
        *,
        repo_id: str | None = None,
        token: str | None = None,
        every_minutes: float = 5.0,
        private: bool = True,
    ) -> None:
        """`repo_id`: a Hub dataset repo that receives the records (created when missing; `private` then, since
        the records hold what visitors typed); `token`: for it (default: HF_TOKEN or the saved login)."""
        self.path = Path(path)
        self.repo_id = repo_id
        self.hub_error: str | None = None  # why feedback is not going to the Hub although a repo was given
        self.shard: Path | None = None  # this process's records, as uploaded to the repo
        self.scheduler: Any = None
        self._lock = threading.Lock()
        self._hub_records: list[dict[str, Any]] = []
        self._recent: dict[str, deque[float]] = {}  # per session: the times of its records in the last RATE window
        self.tally = Tally()  # the votes so far, kept up to date as records are appended
        if repo_id:
            self._connect(repo_id, token, every_minutes, private)
        hub_ids = {r.get("id") for r in self._hub_records}
        for record in [*self._hub_records, *(r for r in _read_lines(self.path) if r.get("id") not in hub_ids)]:
            self.tally.add(record)

    def _connect(self, repo_id: str, token: str | None, every_minutes: float, private: bool) -> None:
        from huggingface_hub import CommitScheduler, snapshot_download

        from aksis.hub import HUB_FAILURES, explain

        folder = self.path.parent / f"{self.path.stem}-hub"
        self.shard = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.jsonl"
        try:
            self.scheduler = CommitScheduler(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=folder,
                path_in_repo=HUB_FOLDER,
                every=every_minutes,
                token=token,
                private=private,
                # Every shard of the folder, not only this process's: a run that could not reach the Hub before
                # it ended gets its records uploaded by the next one.
                allow_patterns=["*.jsonl"],
            )
            snapshot = snapshot_download(
                repo_id, repo_type="dataset", allow_patterns=[f"{HUB_FOLDER}/*.jsonl"], token=token
            )
        except HUB_FAILURES as err:  # the app serves without the Hub; feedback stays local
            self.hub_error = str(explain(err, repo_id, "push feedback to"))
            log.warning("feedback stays in %s: %s", self.path, self.hub_error)
            self.close()
            self.scheduler = None
            return
        for shard in sorted(Path(snapshot, HUB_FOLDER).glob("*.jsonl")):
            self._hub_records += list(_read_lines(shard))
        log.info("feedback goes to the Hub dataset %s (%d records there)", repo_id, len(self._hub_records))

    def _hold(self) -> AbstractContextManager[Any]:
        return self.scheduler.lock if self.scheduler is not None else nullcontext()

    def record(self, kind: str, *, session: str | None = None, **fields: Any) -> dict[str, Any]:
        """Append one record (kind: "like", "dislike", "retract", "vote") with a time stamp and an id; returns it.
        FeedbackRefused when it is over MAX_RECORD_BYTES, or when `session` (a visitor's) has recorded RATE[0]
        records in the last RATE[1] seconds."""
        now = time.time()
        entry = {"id": uuid.uuid4().hex, "time": now, "kind": kind, **fields}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        if len(line.encode("utf-8")) > MAX_RECORD_BYTES:
            raise FeedbackRefused(f"this feedback is too large to keep (more than {MAX_RECORD_BYTES >> 10} KiB)")
        targets = [self.path] + ([self.shard] if self.scheduler is not None and self.shard else [])
        with self._lock, self._hold():
            if session is not None:
                self._count(session, now)
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("a", encoding="utf-8") as f:
                    f.write(line)
            self.tally.add(entry)
        return entry

    def _count(self, session: str, now: float) -> None:
        """Count a record of `session`, or refuse it when the session is over the rate (holding self._lock)."""
        limit, window = RATE
        for key in [k for k, times in self._recent.items() if times[-1] < now - window]:
            del self._recent[key]  # sessions quiet for a window: forgotten, so the table stays small
        times = self._recent.setdefault(session, deque())
        while times and times[0] < now - window:
            times.popleft()
        if len(times) >= limit:
            raise FeedbackRefused(f"at most {limit} ratings a minute: wait a little before the next one")
        times.append(now)

    def standings(self) -> list[dict[str, Any]]:
        """The leaderboard of every vote so far (see `leaderboard`), from the running tally: no file is read."""
        with self._lock:
            return self.tally.rows()

    def records(self) -> list[dict[str, Any]]:
        """Every record, oldest first: those read from the Hub at start and the local file's, each id once. A
        line that cannot be read (a crash mid-write) is skipped. This reads the whole local file: for exports and
        checks, not for serving (the app's leaderboard is `standings`)."""
        with self._lock:
            local = list(_read_lines(self.path))
        seen: set[Any] = set()
        out = []
        for record in [*self._hub_records, *local]:
            key = record.get("id")
            if key is not None and key in seen:
                continue
            seen.add(key)
            out.append(record)
        return sorted(out, key=_time) if self._hub_records else out  # runs' files interleave in time

    def push_now(self) -> None:
        """Commit to the Hub now (as the scheduler would on its next tick) and wait; nothing without a repo.
        Raises what the commit raised."""
        if self.scheduler is not None:
            self.scheduler.trigger().result()

    def close(self) -> None:
        """Push what is not on the Hub yet, then stop the scheduler (a stopped one ignores the push at exit)."""
        if self.scheduler is None:
            return
        try:
            self.push_now()
        except Exception as err:  # closing must not fail for the network; the records are on disk
            log.warning("last feedback push to %s failed: %s", self.repo_id, err)
        self.scheduler.stop()


def _time(record: dict[str, Any]) -> float:
    stamp = record.get("time")
    return float(stamp) if isinstance(stamp, int | float) else 0.0


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file, line by line (a torn or foreign line is skipped)."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue
            if isinstance(record, dict):
                yield record


LEADERBOARD_COLUMNS = ("model", "battles", "wins", "ties", "losses", "win rate")


def _one_name(model: Any) -> str:
    """A model as the leaderboard counts it: votes recorded before names were canonicalised may write the same local
    folder several ways (`x/`, `./x`)."""
    name = str(model).strip().rstrip("/")
    return name if name.count("/") == 1 and not name.startswith((".", "/", "~")) else os.path.normpath(name)


class Tally:
    """The leaderboard's counts, vote by vote: per model, A/B battles, wins, ties and losses (the other model won).
    "vote" records name `model_a`, `model_b` and `winner`: "a", "b", "tie" or "both-bad" (a battle that counts, but
    as neither a win, a tie nor a loss). A battle of a model against itself says nothing about it and is not counted;
    other records are ignored."""

    def __init__(self) -> None:
        self.battles: Counter[str] = Counter()
        self.wins: Counter[str] = Counter()
        self.ties: Counter[str] = Counter()
        self.losses: Counter[str] = Counter()

    def add(self, r: dict[str, Any]) -> None:
        if r.get("kind") != "vote" or "model_a" not in r or "model_b" not in r or r.get("winner") not in WINNERS:
            return
        a, b, winner = _one_name(r["model_a"]), _one_name(r["model_b"]), r["winner"]
        if a == b:
            return
        self.battles.update([a, b])
        if winner == "a":
            self.wins[a] += 1
            self.losses[b] += 1
        elif winner == "b":
            self.wins[b] += 1
            self.losses[a] += 1
        elif winner == "tie":
            self.ties.update([a, b])

    def rows(self) -> list[dict[str, Any]]:
        """One row per model (LEADERBOARD_COLUMNS, win rate = wins / battles), most wins first."""
        rows = [
            {
                "model": m,
                "battles": n,
                "wins": self.wins[m],
                "ties": self.ties[m],
                "losses": self.losses[m],
                "win rate": round(self.wins[m] / n, 3),
            }
            for m, n in self.battles.items()
        ]
        return sorted(rows, key=lambda row: (-row["wins"], -row["win rate"], row["model"]))


def leaderboard(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a `Tally` of `records`."""
    tally = Tally()
    for record in records:
        tally.add(record)
    return tally.rows()
