"""aksis.runs: a run folder's metrics log, its step checkpoints, and the checks before a run starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from aksis import runs
from aksis.checkpoint import save_checkpoint
from aksis.model import GPT
from aksis.runs import (
    METRICS_FILE,
    TRAINER_STATE_FILE,
    TRAINING_STATE_DIR,
    RunError,
    RunFolder,
    read_metrics,
    read_trainer_state,
    step_checkpoints,
    step_name,
)
from aksis.tokenizer import Tokenizer


def staged_step(run: RunFolder, step: int) -> Path:
    """What a save leaves in the staging folder before `commit`: a checkpoint and the processes' training state."""
    staged = run.staging(step)
    save_checkpoint(GPT(tiny_config(vocab_size=260)), staged, tokenizer=Tokenizer.byte_level())
    (staged / TRAINING_STATE_DIR).mkdir()
    return staged


def test_read_metrics_skips_a_line_being_written(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 5.0}\n[1, 2]\n{"loss": 4.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 5.0}]  # a folder or the file itself
    assert read_metrics(tmp_path / METRICS_FILE) == [{"step": 1, "loss": 5.0}]
    assert read_metrics(tmp_path / "missing") == []
    (tmp_path / "run").mkdir()  # a run folder the trainer has made but not written to yet
    assert read_metrics(tmp_path / "run") == []


def test_commit_renames_the_staged_step_into_place_and_keeps_the_newest(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    for step in (2, 4, 6):
        final = run.commit(staged_step(run, step), step, {"state": {"step": step}}, keep_last=2)
        assert final == run.step_dir(step) == tmp_path / "run" / step_name(step)
    assert [p.name for p in step_checkpoints(run.path)] == ["step-000004", "step-000006"]
    assert read_trainer_state(run.step_dir(6)) == {"state": {"step": 6}}
    assert (run.step_dir(6) / TRAINING_STATE_DIR / TRAINER_STATE_FILE).is_file()
    assert sorted(p.name for p in run.path.iterdir()) == ["step-000004", "step-000006"]  # no staging left
    leftover = staged_step(run, 8)  # an interrupted save ...
    (leftover / "junk").write_text("half")
    assert not (run.staging(8) / "junk").exists()  # ... is cleared when that step is saved again


def test_resume_points_are_step_checkpoints_with_a_training_state(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    with pytest.raises(RunError, match="nothing to resume in .*: it has no step-N checkpoint"):
        run.resume_point("latest")
    for step in (3, 10):
        run.commit(staged_step(run, step), step, {"state": {}}, keep_last=5)
    assert run.resume_point("latest") == run.resume_point("auto") == run.step_dir(10)  # 10 sorts after 3 by number
    assert run.resume_point(str(run.step_dir(3))) == run.step_dir(3)
    save_checkpoint(GPT(tiny_config(vocab_size=260)), tmp_path / "model", tokenizer=Tokenizer.byte_level())
    with pytest.raises(RunError, match="it is not a step-N checkpoint .* use --init-from"):
        run.resume_point(str(tmp_path / "model"))


def test_a_new_run_never_overwrites_another_run_unless_asked(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    run.check_new_run(overwrite=False)  # nothing there yet
    run.commit(staged_step(run, 2), 2, {"state": {}}, keep_last=2)
    run.log({"step": 2, "loss": 3.0})
    with pytest.raises(RunError, match=r"already holds the checkpoints of a run \(step-000002; model gpt2, 2 layers"):
        run.check_new_run(overwrite=False)
    run.check_new_run(overwrite=True)
    assert step_checkpoints(run.path) == [] and not run.metrics.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="is a file; give a folder"):
        RunFolder(tmp_path / "file").check_new_run(overwrite=False)


def test_a_resumed_log_drops_what_came_after_its_checkpoint_and_one_from_elsewhere_comes_along(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    for step in range(1, 7):
        run.log({"step": step, "loss": 1.0 / step})
    run.continue_log(None, step=4)
    assert [r["step"] for r in read_metrics(run.path)] == [1, 2, 3, 4]
    elsewhere = RunFolder(tmp_path / "elsewhere")
    elsewhere.continue_log(run.path, step=3)  # resumed from a checkpoint that carries its log
    assert [r["step"] for r in read_metrics(elsewhere.path)] == [1, 2, 3]
    assert json.loads(elsewhere.metrics.read_text().splitlines()[0]) == {"step": 1, "loss": 1.0}


# ----- what a killed run leaves behind -----


def ended_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_keep_last_renames_an_old_step_out_of_the_way_before_deleting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunFolder(tmp_path)
    for step in (1, 2):
        (run.step_dir(step) / TRAINING_STATE_DIR).mkdir(parents=True)
        (run.step_dir(step) / "model.safetensors").write_bytes(b"0" * 10)

    def killed(path: Path) -> None:  # the process dies while it deletes
        raise SystemExit("killed")

    monkeypatch.setattr(runs.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        runs._delete(run.step_dir(1))
    monkeypatch.undo()
    # No half-deleted step-000001 that looks like a checkpoint: the folder is out of the way under a leftover's name.
    assert step_checkpoints(tmp_path) == [run.step_dir(2)]
    [trash] = tmp_path.glob(f".step-000001.deleting-{os.getpid()}-*")
    assert trash.is_dir()
    assert run.remove_leftovers() == []  # this process lives: it may still be at it
    dead = tmp_path / f".step-000001.deleting-{ended_pid()}-0a1b2c3d"
    trash.rename(dead)
    assert run.remove_leftovers() == [dead.name] and not dead.exists()


def test_a_leftover_that_cannot_be_removed_is_logged_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunFolder(tmp_path)
    stuck, gone = (tmp_path / f".step-00000{i}.deleting-{ended_pid()}-0a1b2c3d" for i in (1, 2))
    stuck.mkdir(), gone.mkdir()
    rmtree = runs.shutil.rmtree

    def refuse(path: Path) -> None:  # as a folder on a read-only mount, or one another user owns
        if Path(path) == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        rmtree(path)

    monkeypatch.setattr(runs.shutil, "rmtree", refuse)
    with caplog.at_level("WARNING", logger=runs.log.name):
        assert run.remove_leftovers() == [gone.name]
    assert stuck.is_dir() and not gone.exists()
    assert f"could not remove {stuck}" in caplog.text and "Permission denied" in caplog.text


def test_leftovers_are_only_the_kinds_a_run_leaves(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    dead = ended_pid()
    leftovers = [
        f".best.tmp-{dead}-0a1b2c3d",  # save_checkpoint of best/
        f".best.old-{dead}-0a1b2c3d",
        ".step-000004.tmp",  # a step being assembled
        f"..step-000004.tmp.tmp-{dead}-0a1b2c3d",  # save_checkpoint inside it
        f".step-000004.push-{dead}-123456789",  # a push's snapshot
        f".best.push-{dead}-123456789",
        f".step-000002.deleting-{dead}-0a1b2c3d",  # keep_last's deletion
    ]
    kept = [
        "best",
        "step-000004",
        ".cache",
        ".step-000004.tmp.bak",
        ".best.tmp-notapid-0a1b2c3d",
        f".best.tmp-{os.getpid()}-0a1b2c3d",  # this process's own save, maybe in progress
        "my.best.tmp-1-2",
    ]
    for name in leftovers + kept:
        (tmp_path / name).mkdir()
    (tmp_path / ".step-000009.tmp-file").write_text("a file, not a folder a run makes")
    assert sorted(run.remove_leftovers()) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".step-000009.tmp-file"])
    assert RunFolder(tmp_path / "missing").remove_leftovers() == []
