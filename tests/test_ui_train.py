"""The Train tab (aksis/ui/train_tab.py): input checks, the recipe, runs in a worker thread followed through their
metrics.jsonl, one run at a time, stop, and the same through the served app (train, refusal, stop, bad uploads,
push to the local Hub). Runs use the byte tokenizer, a few steps and small blocks, so each takes seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch
from conftest import Hub, ServedApp, serve_app, write_run

from aksis.config import TrainConfig
from aksis.runs import read_metrics
from aksis.ui import AppSettings
from aksis.ui.models import ModelStore
from aksis.ui.space_runs import (
    MAX_RUNS_PER_VISITOR,
    MAX_SPACE_RUNS,
    MIN_KEEP_S,
    VISITOR_FILE,
    make_room,
    mark_run,
    trained_by,
)
from aksis.ui.train_tab import (
    MAX_STEPS,
    MAX_UPLOAD_BYTES,
    MIN_UPLOAD_CHARS,
    RECIPE,
    RunRequest,
    TrainingBusy,
    TrainingSlot,
    TrainJob,
    check_upload,
    finished_source,
    follow,
    loss_frame,
    progress_text,
    push_run,
    quick_config,
    run_folder,
    start_run,
)

ROOT = Path(__file__).resolve().parents[1]
# Small enough that a step takes milliseconds: context 32, batches of 4, an evaluation of 2 batches.
TINY = dict(block_size=32, batch_size=4, eval_batches=2)


def corpus_text(chars: int = 12_000) -> str:
    """Some verse-like text (a few hundred lines, all different)."""
    lines, n, length = [], 0, 0
    while length < chars:
        lines.append(f"ROMEO {n}:\nBut soft, what light through yonder window {n * 7 % 13} breaks?\n")
        length += len(lines[-1]) + 1
        n += 1
    return "\n".join(lines)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "upload" / "verses.txt"
    path.parent.mkdir()
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def wait_for(condition: Any, timeout: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----- settings and inputs -----


def test_recipe_is_the_tiny_cpu_config() -> None:
    recipe = TrainConfig.from_file(ROOT / "training" / "configs" / "tiny-cpu.yaml").to_dict()
    assert {k: recipe[k] for k in RECIPE} == RECIPE
    # At the recipe's length the app's schedule is the recipe's own.
    config = quick_config("shakespeare", Path("out"), steps=RECIPE["max_steps"], tokenizer="bpe").to_dict()
    assert {k: config[k] for k in RECIPE if k != "device"} == {k: v for k, v in RECIPE.items() if k != "device"}


def test_quick_config_scales_the_schedule_to_short_runs() -> None:
    config = quick_config("x.txt", Path("runs/a"), steps=6, tokenizer="byte", overwrite=True, block_size=32)
    assert (config.max_steps, config.eval_every, config.log_every, config.warmup_steps) == (6, 2, 1, 0)
    assert (config.dataset, config.tokenizer, config.output_dir, config.overwrite) == ("x.txt", "byte", "runs/a", True)
    assert (config.block_size, config.preset, config.progress) == (32, "tiny", False)
    with pytest.raises(ValueError, match="tokenizer 'gpt2'"):
        quick_config("shakespeare", Path("out"), steps=10, tokenizer="gpt2")
    with pytest.raises(ValueError, match="steps must be between 1 and"):
        quick_config("shakespeare", Path("out"), steps=0, tokenizer="byte")


def test_check_upload_accepts_utf8_text(tmp_path: Path) -> None:
    path = tmp_path / "ok.txt"
    text = corpus_text(MIN_UPLOAD_CHARS + 10) + " café, naïve, 夜"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a byte-order mark, which is dropped
    assert check_upload(path) == text


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "empty.txt holds 0 characters of text; the quick run needs at least 5,000"),
        ("short.txt", b"To be, or not to be.\n" * 10, "holds 209 characters of text; the quick run needs at least"),
        ("blank.txt", b" \n" * 4000, "holds 0 characters"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 500, r"image.txt looks binary \(it holds NUL bytes\)"),
        ("latin1.txt", "Ophélie ".encode("latin-1") * 1000, r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
        ("utf16.txt", ("Hamlet " * 1000).encode("utf-16"), "binary"),
        ("play.pdf", b"%PDF-1.4" * 1000, "play.pdf is not a .txt file"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.endswith((".txt", ".pdf")) else "",
)
def test_check_upload_refuses_bad_files(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(gr.Error, match=message):
        check_upload(path)


def test_check_upload_refuses_huge_files(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: no 20 MiB written
    with pytest.raises(gr.Error, match=r"huge.txt is 20.0 MiB; the text file may be at most 20 MiB"):
        check_upload(path)
    with pytest.raises(gr.Error, match="No text file uploaded"):
        check_upload(None)


def test_run_folder_names(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    # No name: quick-<corpus>, then the next free one.
    assert run_folder(root, "", "shakespeare", None, False) == root / "quick-shakespeare"
    (root / "quick-shakespeare").mkdir(parents=True)
    (root / "quick-shakespeare-2").mkdir()
    assert run_folder(root, "  ", "shakespeare", None, False) == root / "quick-shakespeare-3"
    assert run_folder(root, "", "upload", "/tmp/gradio/ab12/My Sonnets!.txt", False) == root / "quick-My-Sonnets"
    # A name given: used as is, refused when taken unless overwriting.
    assert run_folder(root, "mine", "shakespeare", None, False) == root / "mine"
    with pytest.raises(ValueError, match="a run named 'quick-shakespeare' already exists"):
        run_folder(root, "quick-shakespeare", "shakespeare", None, False)
    assert run_folder(root, "quick-shakespeare", "shakespeare", None, True) == root / "quick-shakespeare"
    for bad in ("../escape", "a/b", ".hidden", "x" * 81):
        with pytest.raises(ValueError, match="use letters, digits"):
            run_folder(root, bad, "shakespeare", None, True)
    (root / "downloaded").mkdir()
    (root / "downloaded" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a checkpoint folder, not a training run"):
        run_folder(root, "downloaded", "shakespeare", None, True)


# ----- runs -----


def tiny_job(output_dir: Path, corpus: Path, steps: int, **overrides: Any) -> TrainJob:
    config = quick_config(str(corpus), output_dir, steps=steps, tokenizer="byte", device="cpu", **{**TINY, **overrides})
    return TrainJob(config)


def test_follow_draws_the_run_live_and_ends_with_a_model(tmp_path: Path, corpus_file: Path) -> None:
    job = tiny_job(tmp_path / "run", corpus_file, steps=9)
    job.start()
    updates = list(follow(job, poll=0.01))
    assert job.error is None and job.result is not None
    assert job.result.steps == 9 and job.result.stopped == "max_steps"
    records = read_metrics(job.output_dir)
    frame, text = updates[-1]
    # The last update is the whole log: every train and validation loss, against its step.
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in train] == list(range(1, 10)) and [s for s, _ in val] == [3, 6, 9]
    curves = {name: list(zip(g["step"], g["loss"], strict=True)) for name, g in frame.groupby("curve")}
    assert curves == {"train": train, "validation": val}
    assert text.startswith("**run**: done (max_steps) at step 9 after ") and f"validation loss {val[-1][1]:.3f}" in text
    assert any("preparing the data" in t or "step " in t for _, t in updates[:-1])
    assert finished_source(job) == str(job.output_dir)
    store = ModelStore(tmp_path, device=torch.device("cpu"))
    assert store.choices() == [str(job.output_dir)]
    assert store.get(str(job.output_dir)).model.config.block_size == 32


def test_progress_text_while_training(tmp_path: Path) -> None:
    job = TrainJob(quick_config("shakespeare", tmp_path / "r", steps=300, tokenizer="bpe"))
    assert progress_text(job, []).startswith("**r**: preparing the data and the model (a BPE tokenizer is trained")
    job.total_steps = 283  # what the trainer reports when an epoch ends first
    records = [
        {"step": 100, "tokens": 409600, "loss": 6.5, "tokens_per_s": 3000.0, "elapsed": 150.0},
        {"step": 100, "tokens": 409600, "val_loss": 6.58, "elapsed": 150.0},
    ]
    assert progress_text(job, records) == (
        "**r**: step 100 / 283 · 3,000 tokens/s · about 4 min 34 s left · loss 6.500 · validation loss 6.580"
    )
    job.request_stop()
    assert "stopping after this step" in progress_text(job, records)
    assert list(loss_frame(records).itertuples(index=False)) == [(100, 6.5, "train"), (100, 6.58, "validation")]


def test_every_loss_frame_is_typed_and_names_both_curves() -> None:
    """The plot fixes its axes and colours from the first frame (the empty one at page load): numeric columns, and a
    curve without points yet is there with no loss."""
    import gradio as gr

    empty = loss_frame([])
    assert (str(empty["step"].dtype), str(empty["loss"].dtype)) == ("int64", "float64")
    assert sorted(empty["curve"]) == ["train", "validation"] and empty["loss"].isna().all()
    early = loss_frame([{"step": 10, "loss": 7.0}])
    assert list(early["curve"]) == ["train", "validation"] and early["loss"].isna().tolist() == [False, True]
    plot = gr.LinePlot(empty, x="step", y="loss", color="curve")
    assert plot.postprocess(empty).datatypes == {"step": "quantitative", "loss": "quantitative", "curve": "nominal"}


def test_one_run_at_a_time_and_stop_saves_a_checkpoint(tmp_path: Path, corpus_file: Path) -> None:
    slot = TrainingSlot()
    assert slot.stop() == "No run is training."
    job = slot.start(tiny_job(tmp_path / "long", corpus_file, steps=5000).config)
    try:
        wait_for(lambda: read_metrics(job.output_dir) or job.done, what="the first step")
        with pytest.raises(TrainingBusy, match="the run 'long' is training now"):
            slot.start(tiny_job(tmp_path / "other", corpus_file, steps=2).config)
        assert not (tmp_path / "other").exists()
    finally:
        message = slot.stop()
    assert message.startswith("Stopping **long**")
    assert job.wait(60)
    assert job.error is None and job.result.stopped == "interrupted"
    steps = job.result.steps
    assert 1 <= steps < 5000
    assert job.result.last_checkpoint == job.output_dir / f"step-{steps:06d}"
    assert (job.result.last_checkpoint / "model.safetensors").is_file()
    assert finished_source(job) == str(job.output_dir)
    assert progress_text(job, read_metrics(job.output_dir)).startswith(f"**long**: stopped by request at step {steps}")
    # The slot is free again.
    second = slot.start(tiny_job(tmp_path / "second", corpus_file, steps=2).config)
    assert second.wait(60) and second.error is None and second.result.steps == 2


def test_stop_before_training_began_saves_nothing(tmp_path: Path, corpus_file: Path) -> None:
    job = tiny_job(tmp_path / "never", corpus_file, steps=5)
    job.request_stop()
    assert progress_text(job, []) == "**never**: stopping before training begins…"
    job.start()
    assert job.wait(60)
    assert job.error is None and job.result is None
    assert finished_source(job) is None
    assert progress_text(job, []) == "**never**: stopped before training began; nothing was saved."


def test_a_failing_run_reports_why(tmp_path: Path, corpus_file: Path) -> None:
    job = tiny_job(tmp_path / "toolong", corpus_file, steps=5, block_size=20_000)
    job.start()
    *_, (_, text) = follow(job, poll=0.01)
    assert job.error is not None and "fewer than one block of context 20000" in job.error
    assert text.startswith("**toolong**: failed after ") and job.error in text
    assert finished_source(job) is None


def test_start_run_checks_inputs_and_writes_the_upload(tmp_path: Path, corpus_file: Path) -> None:
    settings = AppSettings(checkpoints_dir=tmp_path / "ckpt", device="cpu")
    slot = TrainingSlot()
    with pytest.raises(gr.Error, match="No text file uploaded"):
        start_run(slot, settings, RunRequest("upload", None, "", False, 5, "byte"))
    with pytest.raises(ValueError, match="corpus 'wikitext2'"):
        start_run(slot, settings, RunRequest("wikitext2", None, "", False, 5, "byte"))
    job = start_run(
        slot, settings, RunRequest("upload", str(corpus_file), "", False, 3, "byte"), block_size=32, batch_size=4
    )
    assert job.wait(60) and job.error is None
    assert job.output_dir == settings.checkpoints_dir / "quick-verses"
    assert (job.output_dir / "corpus.txt").read_text(encoding="utf-8") == corpus_file.read_text(encoding="utf-8")
    assert job.config.dataset == str(job.output_dir / "corpus.txt") and job.config.device == "cpu"
    assert (job.config.block_size, job.config.batch_size, job.result.tokens) == (32, 4, 3 * 4 * 32)
    # The same name again: refused, unless overwriting; never while the app has that run loaded.
    with pytest.raises(ValueError, match="a run named 'quick-verses' already exists"):
        start_run(slot, settings, RunRequest("upload", str(corpus_file), "quick-verses", False, 3, "byte"))
    loaded = [str(job.output_dir)]
    with pytest.raises(ValueError, match="the run 'quick-verses' is loaded in the app"):
        start_run(
            slot,
            settings,
            RunRequest("upload", str(corpus_file), "quick-verses", True, 3, "byte"),
            loaded,
            block_size=32,
        )
    again = start_run(
        slot, settings, RunRequest("upload", str(corpus_file), "quick-verses", True, 2, "byte"), block_size=32
    )
    assert again.wait(60) and again.error is None and again.result.steps == 2
    assert max(r["step"] for r in read_metrics(again.output_dir)) == 2  # the first run's curve is gone


@pytest.mark.parametrize("steps", [None, float("inf"), float("nan"), 0, MAX_STEPS + 1, 2.5, "many", [3]], ids=repr)
def test_start_run_refuses_steps_it_cannot_run(tmp_path: Path, steps: Any) -> None:
    """The API may send any value; each is a clear message (not Python's TypeError), and nothing is written."""
    settings = AppSettings(checkpoints_dir=tmp_path / "ckpt", device="cpu")
    slot = TrainingSlot()
    with pytest.raises(gr.Error, match=f"steps must be a (finite )?whole number from 1 to {MAX_STEPS}, got"):
        start_run(slot, settings, RunRequest("shakespeare", None, "", False, steps, "byte"))
    assert slot.job is None and not settings.checkpoints_dir.exists()


# ----- on a public Space (local_paths off) -----


def test_a_space_never_overwrites_a_run_and_marks_whose_each_run_is(tmp_path: Path, corpus_file: Path) -> None:
    space = AppSettings(checkpoints_dir=tmp_path / "checkpoints", device="cpu", local_paths=False)
    root = space.checkpoints_dir
    slot = TrainingSlot(owner_only=True)
    (root / "theirs").mkdir(parents=True)
    (root / "theirs" / "corpus.txt").write_text("another visitor's run")
    with pytest.raises(ValueError, match="this Space does not overwrite runs"):
        start_run(slot, space, RunRequest("upload", str(corpus_file), "theirs", True, 2, "byte"))
    assert (root / "theirs" / "corpus.txt").read_text() == "another visitor's run" and slot.job is None
    job = start_run(slot, space, RunRequest("upload", str(corpus_file), "", False, 2, "byte"), owner="s1", **TINY)
    assert job.wait(60) and job.error is None
    assert trained_by(job.output_dir / "best", "s1") and not trained_by(job.output_dir, "s2")
    assert "s1" not in (job.output_dir / VISITOR_FILE).read_text()  # a hash of the session, not the session
    assert not trained_by(root / "theirs", "s1")  # no visitor.json: the Space's own


def visitor_run(root: Path, name: str, session: str, started: float) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    mark_run(folder, session, now=started)
    return folder


def test_a_visitor_keeps_a_few_runs_and_old_runs_expire(tmp_path: Path) -> None:
    """One anonymous client filled the Space's 20-run cap in 21 s, after which nobody could train, for good."""
    now, day = 1_000_000.0, 24 * 3600.0
    root = tmp_path / "checkpoints"
    (root / "own").mkdir(parents=True)  # the Space's own run (no visitor.json): never counted, never removed
    mine = [visitor_run(root, f"mine-{i}", "s1", now - 60 * (3 - i)) for i in range(MAX_RUNS_PER_VISITOR)]
    with pytest.raises(ValueError, match=f"you have {MAX_RUNS_PER_VISITOR} runs on this Space.*'mine-0', expires in"):
        make_room(root, "s1", day, now=now)
    assert make_room(root, "s2", day, now=now) == []  # another visitor still trains
    # A day later the first visitor's runs have expired: removed when a run starts (not one still training).
    assert make_room(root, "s2", day, busy=[mine[2]], now=now + day) == mine[:2]
    assert sorted(p.name for p in root.iterdir()) == ["mine-2", "own"]


def test_a_full_space_makes_room_with_its_oldest_run_kept_an_hour(tmp_path: Path) -> None:
    now = 1_000_000.0
    root = tmp_path / "checkpoints"
    runs = [visitor_run(root, f"run-{i:02}", f"s{i}", now - 600 + i) for i in range(MAX_SPACE_RUNS)]
    with pytest.raises(ValueError, match=f"holds {MAX_SPACE_RUNS} visitors' runs, its limit, all started within the"):
        make_room(root, "new", 24 * 3600, now=now)  # nobody has had their hour yet
    later = now - 600 + MIN_KEEP_S + 1
    assert make_room(root, "new", 24 * 3600, busy=[runs[0]], now=later) == [runs[1]]  # the oldest not in use
    assert len(list(root.iterdir())) == MAX_SPACE_RUNS - 1


def test_a_run_is_pushed_only_by_its_visitor_or_the_space_owner(tmp_path: Path, hub: Hub) -> None:
    root = tmp_path / "checkpoints"
    run = write_run(root / "run", "gpt2", seed=0)
    mark_run(run, "trainer")
    space = AppSettings(checkpoints_dir=root, local_paths=False, space_owner=hub.user)
    repo_id = hub.fresh_repo_id("visitor")
    for session, token in [("someone-else", hub.other_token), (None, hub.other_token), ("someone-else", "")]:
        with pytest.raises(ValueError, match="was trained by another visitor .*only they can push it|own into the"):
            push_run(str(run), repo_id, token, space, session)
    assert push_run(str(run / "best"), repo_id, hub.write_token, space, "trainer").startswith("Pushed")
    # The Space's owner (here the hub user, whose token this is) pushes any run; a stranger's token does not.
    assert push_run(str(run), repo_id, hub.write_token, space, "owner-session").startswith("Pushed")
    stranger = AppSettings(checkpoints_dir=root, local_paths=False, space_owner="someone-else")
    with pytest.raises(ValueError, match="was trained by another visitor"):
        push_run(str(run), repo_id, hub.write_token, stranger, "owner-session")


def test_on_a_space_only_the_starting_session_stops_its_run(tmp_path: Path) -> None:
    corpus = tmp_path / "long.txt"
    corpus.write_text(corpus_text(400_000), encoding="utf-8")  # thousands of tiny steps: still going when stopped
    slot = TrainingSlot(owner_only=True)
    job = slot.start(tiny_job(tmp_path / "long", corpus, steps=5000).config, owner="session-a")
    try:
        wait_for(lambda: read_metrics(job.output_dir) or job.done, what="the first step")
        for other in ("session-b", None):
            assert slot.stop(other).startswith("The run **long** was started by another visitor: only they can")
        assert not job.stop_requested and not job.done
    finally:
        message = slot.stop("session-a")
    assert message.startswith("Stopping **long**")
    assert job.wait(60) and job.error is None and job.result.stopped == "interrupted"


def test_a_space_pushes_only_with_the_visitor_s_own_token(tmp_path: Path, hub: Hub, monkeypatch: Any) -> None:
    from huggingface_hub import HfApi

    run = write_run(tmp_path / "checkpoints" / "run", "gpt2", seed=0)
    mark_run(run, "visitor")
    space = AppSettings(checkpoints_dir=tmp_path / "checkpoints", local_paths=False)
    monkeypatch.setenv("HF_TOKEN", hub.write_token)  # the Space's secret: its owner's token
    repo_id = hub.fresh_repo_id("space")
    before = len(hub.requests)
    for empty in ("", "  ", None):
        with pytest.raises(ValueError, match="paste a write token of your own into the token box"):
            push_run(str(run), repo_id, empty, space, "visitor")
    assert hub.requests[before:] == []  # the owner's token never went out
    # The visitor's own token (here alice's) pushes.
    assert push_run(str(run), repo_id, hub.write_token, space, "visitor").startswith(f"Pushed `{run}/best` to **")
    # In one's own app the login (HF_TOKEN) is one's own: an empty box uses it.
    own = hub.fresh_repo_id("own")
    assert push_run(str(run), own, "", AppSettings(checkpoints_dir=tmp_path / "checkpoints")).startswith("Pushed")
    assert "model.safetensors" in HfApi(endpoint=hub.endpoint, token=hub.write_token).list_repo_files(own)


def test_push_run_refuses_what_it_cannot_push(tmp_path: Path) -> None:
    settings = AppSettings(checkpoints_dir=tmp_path)
    with pytest.raises(ValueError, match="pick a local model"):
        push_run("alice/some-model", "alice/copy", "token", settings)
    with pytest.raises(ValueError, match="repo id 'not a repo'"):
        push_run(str(tmp_path), "not a repo", "token", settings)
    with pytest.raises(ValueError, match="no Hub token"):  # the tests run with no HF_TOKEN and no login
        push_run(str(tmp_path), "alice/copy", "", settings)
    space = AppSettings(checkpoints_dir=tmp_path / "checkpoints", local_paths=False)
    with pytest.raises(ValueError, match="pushes only the runs in"):  # a Space: not a folder of the server's own
        push_run(str(tmp_path), "alice/copy", "token", space)


# ----- through the served app -----


@pytest.fixture(scope="module")
def fresh_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    """The app on an empty checkpoints folder: the first start, with the welcome banner."""
    settings = AppSettings(
        checkpoints_dir=tmp_path_factory.mktemp("fresh") / "checkpoints",
        feedback_file=tmp_path_factory.mktemp("feedback") / "feedback.jsonl",
        device="cpu",
    )
    app = serve_app(settings)
    yield app
    app.demo.close()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("uploads")
    (folder / "sonnets.txt").write_text(corpus_text(30_000), encoding="utf-8")
    (folder / "long.txt").write_text(corpus_text(600_000), encoding="utf-8")  # an epoch of ~140 steps: time to stop it
    (folder / "empty.txt").write_bytes(b"")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 40)
    return folder


@pytest.fixture(scope="module")
def trained(fresh_app: ServedApp, uploads: Path) -> dict[str, Any]:
    """The first run of `fresh_app`, trained through the API from an upload (the tests below use it)."""
    from gradio_client import handle_file

    checkpoints = fresh_app.settings.checkpoints_dir
    before = ModelStore(checkpoints, device=torch.device("cpu")).choices()
    outputs = fresh_app.client().predict(
        "upload", handle_file(uploads / "sonnets.txt"), "", False, 3, "byte", api_name="/train"
    )
    return dict(before=before, outputs=outputs, run=checkpoints / "quick-sonnets")


def test_app_first_start_trains_picks_and_loads(fresh_app: ServedApp, trained: dict[str, Any]) -> None:
    assert trained["before"] == []  # nothing anywhere: the welcome banner's case
    plot, progress, picker, status = trained["outputs"]  # (and the banner, which the API does not return)
    run = trained["run"]
    assert picker["value"] == str(run) and [choice[1] for choice in picker["choices"]] == [str(run)]
    assert progress.startswith("**quick-sonnets**: done (max_steps) at step 3") and "picked" in progress
    assert status.startswith(f"**{run}**: gpt2, 2 layers × 128")
    assert {row[2] for row in plot["data"]} == {"train", "validation"}
    assert ModelStore(fresh_app.settings.checkpoints_dir, device=torch.device("cpu")).choices() == [str(run)]
    assert fresh_app.client().predict(str(run), api_name="/load_model") == status


def test_app_welcome_button_runs_the_same_training(fresh_app: ServedApp, uploads: Path) -> None:
    """The banner's button feeds the Train tab's outputs (plot, progress, picker, status, banner) from the same
    generator, whose last update hides the banner. (The button's own run is the full recipe, minutes long: not
    run here.)"""
    import gradio as gr

    demo = fresh_app.demo
    ids = {c["props"].get("elem_id"): c["id"] for c in demo.config["components"] if c["props"].get("elem_id")}
    deps = demo.config["dependencies"]
    train = next(d for d in deps if d.get("api_name") == "train")
    welcome = [d for d in deps if [ids["welcome-train"], "click"] in [list(t) for t in d["targets"]]]
    assert sorted(d["outputs"] for d in welcome) == sorted([[], train["outputs"]])
    assert [ids["model-picker"], ids["model-status"], ids["welcome"]] == train["outputs"][2:]
    # The last update of a run (called in process: the API leaves layout updates out) hides the banner.
    fn = next(f for f in demo.fns.values() if f.api_name == "train").fn
    *_, last = fn("upload", str(uploads / "sonnets.txt"), "banner", False, 2, "byte")
    banner = last[-1]
    assert isinstance(banner, gr.Column) and banner.visible is False
    assert last[2].value == str(fresh_app.settings.checkpoints_dir / "banner")


def test_app_one_training_at_a_time_and_stop(fresh_app: ServedApp, uploads: Path) -> None:
    from gradio_client import handle_file

    client = fresh_app.client()
    upload = handle_file(uploads / "long.txt")
    long = client.submit("upload", upload, "long", False, 5000, "byte", api_name="/train")
    try:
        wait_for(lambda: any(" / " in o[1] for o in long.outputs()) or long.done(), what="the run's first step")
        with pytest.raises(Exception, match="Not started: the run 'long' is training now"):
            client.predict("upload", upload, "second", False, 3, "byte", api_name="/train")
    finally:
        stopping = client.predict(api_name="/stop_training")
    assert stopping.startswith("Stopping **long**")
    _, progress, picker, *_ = long.result(timeout=120)
    assert "stopped by request at step" in progress
    run = fresh_app.settings.checkpoints_dir / "long"
    assert picker["value"] == str(run) and next(run.glob("step-*/model.safetensors"), None) is not None
    assert not (fresh_app.settings.checkpoints_dir / "second").exists()
    assert client.predict(api_name="/stop_training") == "No run is training."


@pytest.mark.parametrize(
    "corpus, upload, name, overwrite, message",
    [
        ("upload", "empty.txt", "", False, "empty.txt holds 0 characters"),
        ("upload", "binary.txt", "", False, "binary.txt looks binary"),
        ("upload", None, "", False, "No text file uploaded"),
        ("shakespeare", None, "../outside", False, "use letters, digits"),
        ("upload", "sonnets.txt", "quick-sonnets", False, "a run named 'quick-sonnets' already exists"),
        ("upload", "sonnets.txt", "quick-sonnets", True, "the run 'quick-sonnets' is loaded in the app"),
    ],
)
def test_app_bad_inputs_are_clear_messages(
    fresh_app: ServedApp,
    uploads: Path,
    trained: dict[str, Any],  # quick-sonnets exists and is loaded
    corpus: str,
    upload: str | None,
    name: str,
    overwrite: bool,
    message: str,
) -> None:
    from gradio_client import handle_file

    client = fresh_app.client()
    before = sorted(p.name for p in fresh_app.settings.checkpoints_dir.iterdir())
    with pytest.raises(Exception, match=message):
        client.predict(
            corpus, handle_file(uploads / upload) if upload else None, name, overwrite, 3, "byte", api_name="/train"
        )
    assert sorted(p.name for p in fresh_app.settings.checkpoints_dir.iterdir()) == before
    assert client.predict(api_name="/stop_training") == "No run is training."  # still serving


def test_app_push_lands_in_the_hub_repo(fresh_app: ServedApp, trained: dict[str, Any], hub: Hub) -> None:
    from huggingface_hub import HfApi

    client = fresh_app.client()
    run = str(trained["run"])
    repo_id = hub.fresh_repo_id("quick")
    with pytest.raises(Exception, match="no Hub token"):
        client.predict(run, repo_id, "", api_name="/push")
    with pytest.raises(Exception, match=r"Could not push to the Hub: .*no write access \(403\)"):  # a read-only token
        client.predict(run, hub.fresh_repo_id("quick"), hub.other_token, api_name="/push")
    message = client.predict(run, repo_id, hub.write_token, api_name="/push")
    assert message.startswith(f"Pushed `{run}/best` to **{repo_id}**")
    files = HfApi(endpoint=hub.endpoint, token=hub.write_token).list_repo_files(repo_id)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert not hub.token_leaks(hub.write_token)


@pytest.fixture(scope="module")
def space_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    """The app as a public Space serves it (local_paths off), on an empty checkpoints folder."""
    settings = AppSettings(
        checkpoints_dir=tmp_path_factory.mktemp("space") / "checkpoints",
        feedback_file=tmp_path_factory.mktemp("feedback") / "feedback.jsonl",
        device="cpu",
        local_paths=False,
    )
    app = serve_app(settings)
    yield app
    app.demo.close()


def test_space_app_lets_only_the_starting_visitor_stop_a_run(
    space_app: ServedApp, uploads: Path, tmp_path: Path
) -> None:
    from gradio_client import handle_file

    corpus = tmp_path / "plays.txt"
    corpus.write_text(corpus_text(300_000), encoding="utf-8")  # about 70 steps: still going when stopped
    starter, other = space_app.client(), space_app.client()  # two browser sessions
    long = starter.submit("upload", handle_file(corpus), "long", False, 5000, "byte", api_name="/train")
    try:
        wait_for(lambda: any(" / " in o[1] for o in long.outputs()) or long.done(), what="the run's first step")
        assert other.predict(api_name="/stop_training").startswith("The run **long** was started by another visitor")
    finally:
        stopping = starter.predict(api_name="/stop_training")
    assert stopping.startswith("Stopping **long**")
    _, progress, *_ = long.result(timeout=120)
    assert "stopped by request at step" in progress
    # No overwrite box to tick on a Space (start_run refuses an overwrite sent through the API).
    overwrite = next(c for c in space_app.demo.config["components"] if c["props"].get("elem_id") == "train-overwrite")
    assert overwrite["props"]["visible"] is False
    with pytest.raises(Exception, match="this Space does not overwrite runs"):
        other.predict("upload", handle_file(uploads / "sonnets.txt"), "long", True, 3, "byte", api_name="/train")
