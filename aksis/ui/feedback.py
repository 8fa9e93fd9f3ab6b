"""Human feedback: likes and dislikes of chat replies and blind A/B votes, one JSON object per line.

Records are appended to a local JSONL file. When a Hub dataset repo is configured (AKSIS_FEEDBACK_REPO), a
`huggingface_hub.CommitScheduler` commits the feedback folder to it every few minutes from a background
thread; writes hold the scheduler's lock so a commit never uploads half a line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class FeedbackLog:
    def __init__(self, path: Path, *, repo_id: str | None = None, every_minutes: float = 5.0) -> None:
        self.path = Path(path)
        self.repo_id = repo_id
        self._lock = threading.Lock()
        self.scheduler: Any = None
        if repo_id:
            from huggingface_hub import CommitScheduler

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.scheduler = CommitScheduler(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=self.path.parent,
                path_in_repo="feedback",
                every=every_minutes,
                allow_patterns=[self.path.name],
            )

    def _hold(self) -> AbstractContextManager[Any]:
        return self.scheduler.lock if self.scheduler is not None else nullcontext()

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record (kind: "like", "dislike", "vote") with a time stamp and an id; returns it."""
        entry = {"id": uuid.uuid4().hex, "time": time.time(), "kind": kind, **fields}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock, self._hold():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
        return entry

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far; a line that cannot be read (a crash mid-write) is skipped."""
        if not self.path.is_file():
            return []
        out = []
        with self._lock:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def push_now(self) -> None:
        """Commit to the Hub now (as the scheduler would on its next tick); nothing without a repo."""
        if self.scheduler is not None:
            self.scheduler.trigger().result()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


def leaderboard(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: A/B battles, wins, ties and win rate, most wins first ("vote" records name `model_a`,
    `model_b` and `winner`: "a", "b", "tie" or "both-bad")."""
    battles: Counter[str] = Counter()
    wins: Counter[str] = Counter()
    ties: Counter[str] = Counter()
    for r in records:
        if r.get("kind") != "vote" or "model_a" not in r or "model_b" not in r:
            continue
        a, b, winner = str(r["model_a"]), str(r["model_b"]), r.get("winner")
        battles.update([a, b])
        if winner == "a":
            wins[a] += 1
        elif winner == "b":
            wins[b] += 1
        elif winner == "tie":
            ties.update([a, b])
    rows = [
        {"model": m, "battles": n, "wins": wins[m], "ties": ties[m], "win rate": round(wins[m] / n, 3)}
        for m, n in battles.items()
    ]
    return sorted(rows, key=lambda row: (-row["wins"], -row["win rate"], row["model"]))
