"""aksis.hub and everything that reaches the Hub, end to end: the real huggingface_hub client against the local
Hub look-alike of tests/hub_server.py (started by conftest.py; HF_ENDPOINT points at it)."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import Hub, tiny_config

from aksis.checkpoint import CheckpointError, load_gpt, load_model, save_checkpoint, split_revision
from aksis.config import GenerationConfig, TrainConfig
from aksis.generation import generate
from aksis.hub import (
    BackgroundPusher,
    HubError,
    PushSchedule,
    download_checkpoint,
    is_hub_id,
    list_models,
    push_checkpoint,
    tags_of,
)
from aksis.model import GPT
from aksis.tokenizer import Tokenizer
from aksis.trainer import Trainer

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=12)


def save_tiny(folder: Path, arch: str = "gpt2") -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(arch, vocab_size=260)).eval()
    save_checkpoint(model, folder, tokenizer=Tokenizer.byte_level())
    records = [
        {"step": 1, "tokens": 512, "loss": 5.6, "lr": 1e-3},
        {"step": 2, "tokens": 1024, "loss": 5.2, "lr": 1e-3},
        {"step": 2, "tokens": 1024, "val_loss": 5.3, "val_ppl": 200.3},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return model


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    data: dict[str, Any] = yaml.safe_load(card.split("---\n")[1])
    return data


# ----- offline pieces: the card, the curve, revisions, the background pusher -----


def test_revisions_are_written_after_an_at_sign(tmp_path: Path) -> None:
    assert split_revision("alice/tiny@training-state") == ("alice/tiny", "training-state")
    assert split_revision("alice/tiny@refs/pr/1") == ("alice/tiny", "refs/pr/1")
    assert split_revision("alice/tiny") == ("alice/tiny", None)
    odd = tmp_path / "odd@name"
    odd.mkdir()
    assert split_revision(str(odd)) == (str(odd), None)  # an existing local path is never split
    with pytest.raises(CheckpointError, match="user/name@revision"):
        split_revision("alice/tiny@")
    assert is_hub_id("alice/tiny@v1") and not is_hub_id(str(odd)) and not is_hub_id("./alice/tiny")


def test_a_failed_background_push_is_retried_then_reported_and_the_checkpoint_is_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "step-000002"
    save_tiny(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls: list[Path] = []

    def flaky(snapshot: Path, **kwargs: Any) -> str:  # fails twice, then succeeds
        calls.append(snapshot)
        assert sorted(p.name for p in snapshot.iterdir()) == sorted(before)
        if len(calls) < 3:
            raise HubError("the Hub is having a moment", transient=True)  # a 5xx, a rate limit, the network
        return "c0ffee"

    pusher = BackgroundPusher(flaky, attempts=3, backoff_s=0.01)
    pusher.submit(folder)
    pusher.wait()
    assert len(calls) == 3 and pusher.pushed == ["c0ffee"] and pusher.errors == []

    refusals: list[Path] = []

    def refused(snapshot: Path, **kwargs: Any) -> str:  # the Hub said no: trying again cannot help
        refusals.append(snapshot)
        raise HubError("no write access")

    pusher = BackgroundPusher(refused, attempts=2, backoff_s=0.01)
    pusher.submit(folder)
    pusher.close()
    assert pusher.errors == ["push of step-000002 failed (not retried): no write access"] and len(refusals) == 1

    def disk_full(snapshot: Path, **kwargs: Any) -> str:
        raise OSError("disk full")

    pusher = BackgroundPusher(disk_full, attempts=2, backoff_s=0.01)
    pusher.submit(folder)
    pusher.close()
    assert pusher.errors == ["push of step-000002 failed after 2 attempts: disk full"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]  # the snapshots are gone


def test_a_run_pushes_every_nth_step_its_last_and_its_best(tmp_path: Path) -> None:
    """The schedule alone (the pushes themselves go to the Hub in the tests below): with --push-every 10 and a save
    every 5 steps, steps 10 and 20 are pushed (each multiple of 10 a save reaches), then at the end the last step,
    and the best to main."""
    for step in range(5, 30, 5):
        save_tiny(tmp_path / f"step-{step:06d}")
    save_tiny(tmp_path / "best")
    pushed: list[tuple[str, str | None, str | None, bool]] = []

    def record(snapshot: Path, **kwargs: Any) -> str:
        pushed.append(
            (kwargs["commit_message"], kwargs.get("tag"), kwargs.get("branch"), kwargs.get("move_tag", False))
        )
        assert kwargs["repo_id"] == "alice/run" and kwargs["license"] == "mit"
        assert kwargs["name"] == str(tmp_path / snapshot.name.split(".push-")[0].lstrip("."))  # logs name the folder
        return "c0ffee"

    pusher = BackgroundPusher(record, backoff_s=0.01)
    schedule = PushSchedule("alice/run", every=10, training_state=True, license="mit", pusher=pusher)
    for step in range(5, 30, 5):
        schedule.saved(tmp_path / f"step-{step:06d}", step)
    errors = schedule.finish(tmp_path / "step-000025", 25, tmp_path / "best", best_step=20, best_loss=5.25)
    assert errors == []
    assert pushed == [
        ("aksis: step 10", "step-10", None, False),
        ("aksis: training state at step 10", None, "training-state", False),
        ("aksis: step 20", "step-20", None, False),
        ("aksis: training state at step 20", None, "training-state", False),
        ("aksis: step 25", "step-25", None, False),  # the last step, which --push-every skipped
        ("aksis: training state at step 25", None, "training-state", False),
        ("aksis: best checkpoint (step 20, validation loss 5.2500)", None, None, False),
    ]
    pushed.clear()
    moving = PushSchedule("alice/run", move_tags=True, license="mit", pusher=BackgroundPusher(record))
    moving.saved(tmp_path / "step-000005", 5)  # every=1: each save
    moving.saved(tmp_path / "step-000010", 10)
    moving.pusher.close()
    assert [(p[1], p[3]) for p in pushed] == [("step-5", True), ("step-10", True)]


# ----- against the local Hub server -----


def tree_bytes(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file()]


def test_push_then_pull_into_a_fresh_cache_generates_identical_text(hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    model = save_tiny(tmp_path / "ckpt", "llama")
    repo = hub.fresh_repo_id("tiny")
    commit = push_checkpoint(tmp_path / "ckpt", repo, tag="v1", license="mit", token=hub.write_token)
    api = HfApi(token=hub.write_token)
    files = set(api.list_repo_files(repo))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert {"metrics.jsonl", "README.md", "loss_curve.png"} <= files and "training_state" not in str(files)
    assert [t.target_commit for t in api.list_repo_refs(repo).tags if t.name == "v1"] == [commit]
    card = (Path(api.hf_hub_download(repo, "README.md", cache_dir=hub.fresh_cache(tmp_path)))).read_text()
    assert front_matter(card)["library_name"] == "aksis" and "## Samples" in card

    pulled = load_gpt(repo, cache_dir=hub.fresh_cache(tmp_path))
    tokenizer = Tokenizer.byte_level()
    assert generate(pulled, tokenizer, "Hi", GREEDY).text == generate(model, tokenizer, "Hi", GREEDY).text
    assert load_gpt(f"{repo}@v1").config == model.config  # a revision after @
    assert repo in list_models(hub.user)
    with pytest.raises(CheckpointError, match="revision 'nope' does not exist"):
        load_gpt(f"{repo}@nope")


def test_hub_errors_say_what_to_do(hub: Hub, tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    with pytest.raises(HubError, match="no write access \\(401\\).*hf auth login"):
        push_checkpoint(tmp_path / "ckpt", hub.fresh_repo_id("x"), samples=False)  # no token at all
    with pytest.raises(HubError, match="no write access \\(403\\)"):
        push_checkpoint(tmp_path / "ckpt", hub.fresh_repo_id("x"), samples=False, token=hub.other_token)
    with pytest.raises(CheckpointError, match="no model repo alice/missing on the Hub"):
        load_gpt("alice/missing")
    with pytest.raises(HubError, match="is neither a checkpoint .* nor a training run .*; nothing pushed"):
        push_checkpoint(tmp_path, hub.fresh_repo_id("x"), token=hub.write_token)
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    with pytest.raises(HubError, match="not a complete checkpoint folder \\(missing tokenizer.json\\); nothing pushed"):
        push_checkpoint(tmp_path / "ckpt", hub.fresh_repo_id("x"), token=hub.write_token)


def test_aksis_push_from_the_terminal(hub: Hub, tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    repo = hub.fresh_repo_id("cli")
    env = hub.subprocess_env(tmp_path, token=hub.write_token)
    args = [sys.executable, "-m", "aksis.cli", "push", "--checkpoint-path", str(tmp_path / "ckpt"), "--repo-id", repo]
    result = subprocess.run([*args, "--private"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"pushed {tmp_path / 'ckpt'} to {repo}@main" in result.stdout
    denied = subprocess.run(args, env=hub.subprocess_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert denied.returncode == 2 and "no write access (401)" in denied.stderr
    anonymous = subprocess.run(  # a private repo is invisible without a token
        [sys.executable, "-m", "aksis.cli", "generate-text", "--checkpoint-path", repo, "--prompt", "Hi"],
        env=hub.subprocess_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert anonymous.returncode == 2 and f"no model repo {repo} on the Hub, or it is private" in anonymous.stderr


def run_config(tmp_path: Path, name: str, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        dataset=str(tmp_path / "texts"),
        tokenizer="byte",
        preset="tiny",
        block_size=32,
        batch_size=4,
        max_steps=4,
        eval_every=2,
        eval_batches=1,
        log_every=1,
        device="cpu",
        progress=False,
        output_dir=str(tmp_path / name),
    )
    return TrainConfig(**{**settings, **overrides})


def test_train_push_pull_resume_and_fine_tune_through_the_hub(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole loop: train with pushes, pull on a "different machine" (a fresh cache), generate the same
    text, fine-tune from the Hub id, resume from the pushed training state, and work offline from the cache."""
    from huggingface_hub import HfApi

    from aksis.corpora import shakespeare_plays

    caplog.set_level(logging.DEBUG)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "play.txt").write_text(shakespeare_plays()[0][:60_000])
    monkeypatch.setenv("HF_TOKEN", hub.write_token)  # as after `hf auth login`
    repo, first_request = hub.fresh_repo_id("run"), len(hub.requests)
    config = run_config(tmp_path, "run", push_to_hub=True, hub_model_id=repo, push_training_state=True)
    result = Trainer(config).train()
    assert result.push_errors == []

    api = HfApi()
    refs = api.list_repo_refs(repo)
    assert {t.name for t in refs.tags} == {"step-2", "step-4"}
    assert {b.name for b in refs.branches} == {"main", "training-state"}
    assert "training_state/trainer_state.json" in api.list_repo_files(repo, revision="training-state")
    assert not any(f.startswith("training_state") for f in api.list_repo_files(repo))
    on_main = Path(api.hf_hub_download(repo, "model.safetensors", cache_dir=hub.fresh_cache(tmp_path)))
    assert on_main.read_bytes() == (tmp_path / "run" / "best" / "model.safetensors").read_bytes()  # main = best

    # A different machine: an empty Hub cache, through the CLI, equals the local best checkpoint.
    local, tokenizer, _ = load_model(tmp_path / "run" / "best", device="cpu")
    expected = "ROMEO:" + generate(local, tokenizer, "ROMEO:", GREEDY).text
    env = hub.subprocess_env(tmp_path, token=hub.write_token)
    pull = [sys.executable, "-m", "aksis.cli", "generate-text", "--checkpoint-path", repo, "--prompt", "ROMEO:"]
    pull += ["--sampler", "greedy", "--max-new-tokens", "12", "--device", "cpu"]
    pulled = subprocess.run(pull, env=env, capture_output=True, text=True, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.rstrip("\n") == expected

    # Offline: the cache that pull filled works; an empty one says what is missing.
    offline = subprocess.run(pull, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0 and offline.stdout.rstrip("\n") == expected
    empty = hub.subprocess_env(tmp_path, offline=True)
    missing = subprocess.run(pull, env=empty, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and f"config.json of {repo} is not in the local Hub cache" in missing.stderr

    # Fine-tune from the Hub id, and resume the run elsewhere from its pushed training state.
    tuned = Trainer(run_config(tmp_path, "tuned", init_from=repo, max_steps=2)).train()
    assert tuned.steps == 2
    resumed_trainer = Trainer(run_config(tmp_path, "elsewhere", resume=f"{repo}@training-state", max_steps=6))
    assert resumed_trainer.state.step == 4
    resumed = resumed_trainer.train()
    assert resumed.steps == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "elsewhere" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps[-1] == 6  # the history came along

    # No pushed file, on any branch or tag, names a place of the machine that trained (the corpus, the run folder,
    # the caches are all under tmp_path).
    for revision in ["main", "training-state", *(t.name for t in refs.tags)]:
        snapshot = Path(api.snapshot_download(repo, revision=revision, cache_dir=hub.fresh_cache(tmp_path)))
        leaks = [p.name for p in snapshot.rglob("*") if p.is_file() and str(tmp_path).encode() in p.read_bytes()]
        assert leaks == [], (revision, leaks)
    trainer_state = json.loads(
        Path(api.hf_hub_download(repo, "training_state/trainer_state.json", revision="training-state")).read_text()
    )
    assert trainer_state["train_config"]["dataset"] == "texts" and "output_dir" not in trainer_state["train_config"]

    # The token is in no file written, no log, and no request except as the Authorization header.
    assert hub.token_leaks(hub.write_token, since=first_request) == []
    for root in (tmp_path, hub.storage):
        assert not any(hub.write_token.encode() in data for data in tree_bytes(root))
    assert hub.write_token not in pulled.stderr + pulled.stdout + missing.stderr + caplog.text
    assert "pushed to" in caplog.text  # the logs were captured


def test_push_settings_are_checked_before_training(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aksis.trainer import TrainingError

    with pytest.raises(ValueError, match="--push-to-hub needs --hub-model-id"):
        TrainConfig(push_to_hub=True)
    with pytest.raises(ValueError, match="apply with --push-to-hub"):
        TrainConfig(hub_model_id="alice/x")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("To be, or not to be, that is the question. " * 200)
    monkeypatch.setenv("HF_TOKEN", hub.other_token)  # bob may not write to alice's namespace
    config = run_config(tmp_path, "run", push_to_hub=True, hub_model_id=hub.fresh_repo_id("denied"))
    with pytest.raises(TrainingError, match="no write access \\(403\\).*or train without --push-to-hub"):
        Trainer(config)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step-*"))


def test_evaluation_results_reach_the_model_card_on_the_hub(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    from aksis.cli import main

    save_tiny(tmp_path / "ckpt")
    (tmp_path / "held_out.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    monkeypatch.setenv("HF_TOKEN", hub.write_token)
    repo = hub.fresh_repo_id("evaluated")
    args = ["evaluate", "--checkpoint-path", str(tmp_path / "ckpt"), "--dataset", str(tmp_path / "held_out.txt")]
    args += ["--tasks", "perplexity", "--device", "cpu", "--push-to-hub", "--hub-model-id", repo]
    assert main(args) == 0
    saved = json.loads((tmp_path / "ckpt" / "eval_results.json").read_text())
    card = Path(HfApi().hf_hub_download(repo, "README.md", cache_dir=hub.fresh_cache(tmp_path))).read_text()
    # A local file is no Hub dataset, which model-index names results by: the scores are in the card's text only,
    # the file by its name (not where it is on this machine).
    assert "model-index" not in front_matter(card) and str(tmp_path) not in card
    assert (
        f"| perplexity | {saved['metrics']['perplexity']:.4g} |" in card
        and "On `held_out.txt` (validation split" in card
    )
    pushed = json.loads(
        Path(HfApi().hf_hub_download(repo, "eval_results.json", cache_dir=hub.fresh_cache(tmp_path))).read_text()
    )
    assert pushed["dataset"] == "held_out.txt" and str(tmp_path) not in json.dumps(pushed)
    assert pushed["metrics"] == saved["metrics"]


def test_an_unreachable_hub_or_a_bad_id_is_a_clear_error_and_a_background_push_failure_is_kept(tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"}  # nothing listens on port 9
    args = [sys.executable, "-m", "aksis.cli", "push", "--checkpoint-path", str(tmp_path / "ckpt")]
    result = subprocess.run([*args, "--repo-id", "alice/x"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "the Hub cannot be reached" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([*args, "--repo-id", "bad id"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a valid Hub repo id" in result.stderr

    def crashing(snapshot: Path, **kwargs: Any) -> str:
        raise RuntimeError("disk full")

    pusher = BackgroundPusher(crashing, attempts=1, backoff_s=0.01)
    pusher.submit(tmp_path / "ckpt")
    pusher.close()  # does not raise: training would go on
    assert pusher.errors == ["push of ckpt failed after 1 attempts: disk full"]


def test_a_runs_best_checkpoint_is_pushed_with_its_training_settings(hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    save_tiny(tmp_path / "run" / "best")
    state = tmp_path / "run" / "step-000004" / "training_state"
    state.mkdir(parents=True)
    settings = TrainConfig(dataset="tinystories", learning_rate=5e-4).to_dict()
    (state / "trainer_state.json").write_text(json.dumps({"train_config": settings}))
    repo = hub.fresh_repo_id("best")
    push_checkpoint(tmp_path / "run" / "best", repo, samples=False, token=hub.write_token)
    card = Path(HfApi(token=hub.write_token).hf_hub_download(repo, "README.md", cache_dir=hub.fresh_cache(tmp_path)))
    text = card.read_text()
    assert front_matter(text)["datasets"] == ["roneneldan/TinyStories"] and "peak learning rate: `0.0005`" in text


# ----- pushes that tell the truth -----


def test_the_same_checkpoint_pushed_twice_makes_one_commit(hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    save_tiny(tmp_path / "ckpt")
    repo = hub.fresh_repo_id("again")
    first = push_checkpoint(tmp_path / "ckpt", repo, token=hub.write_token)
    save_tiny(tmp_path / "ckpt")  # saved again: the same tensors, config and card give the same bytes
    second = push_checkpoint(tmp_path / "ckpt", repo, token=hub.write_token)
    assert second == first and len(HfApi(token=hub.write_token).list_repo_commits(repo)) == 2  # and the initial


def test_a_tag_names_what_was_pushed_or_the_push_fails(hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=hub.write_token)
    repo = hub.fresh_repo_id("tags")
    save_tiny(tmp_path / "one")
    first = push_checkpoint(tmp_path / "one", repo, tag="v1", samples=False, token=hub.write_token)
    assert push_checkpoint(tmp_path / "one", repo, tag="v1", samples=False, token=hub.write_token) == first  # same
    torch.manual_seed(1)
    save_checkpoint(GPT(tiny_config(vocab_size=260)), tmp_path / "two", tokenizer=Tokenizer.byte_level())
    second = push_checkpoint(tmp_path / "two", repo, samples=False, token=hub.write_token)  # main moves on
    commits = len(api.list_repo_commits(repo))
    with pytest.raises(HubError, match=f"tag v1 of {repo} already names commit {first[:8]} .*nothing pushed"):
        push_checkpoint(tmp_path / "one", repo, tag="v1", samples=False, token=hub.write_token)
    assert len(api.list_repo_commits(repo)) == commits and tags_of(repo, hub.write_token) == {"v1": first}
    moved = push_checkpoint(tmp_path / "one", repo, tag="v1", move_tag=True, samples=False, token=hub.write_token)
    assert moved not in (first, second) and tags_of(repo, hub.write_token) == {"v1": moved}


def test_visibility_is_applied_to_an_existing_repo(hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=hub.write_token)
    save_tiny(tmp_path / "ckpt")
    repo = hub.fresh_repo_id("visible")
    push_checkpoint(tmp_path / "ckpt", repo, samples=False, token=hub.write_token)
    assert not api.repo_info(repo).private  # a new repo is public unless asked
    env = hub.subprocess_env(tmp_path, token=hub.write_token)
    push = [sys.executable, "-m", "aksis.cli", "push", "--checkpoint-path", str(tmp_path / "ckpt"), "--repo-id", repo]
    for flags, private in ((["--private"], True), ([], True), (["--no-private"], False)):
        result = subprocess.run([*push, *flags], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert api.repo_info(repo).private is private, flags


def test_each_hub_failure_is_named_in_the_hubs_own_words(hub: Hub, tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    repo = hub.fresh_repo_id("failures")
    push_checkpoint(tmp_path / "ckpt", repo, samples=False, token=hub.write_token)
    (tmp_path / "ckpt" / "metrics.jsonl").write_text('{"step": 3, "loss": 4.0}\n')  # something new to commit
    cases = [
        (400, "Bad request: the commit is malformed", {}, "the Hub refused the request \\(400\\): Bad request", False),
        (409, "A commit is in progress", {}, "conflicts with what the repo holds \\(409\\): A commit is in", False),
        (413, "Payload too large", {}, "refused it as too large \\(413\\): Payload too large", False),
        (429, "Too many requests", {"Retry-After": "30"}, "rate limited .*\\(429\\).*try again in 30 s", True),
        (503, "Service unavailable", {}, "the Hub failed \\(503\\): Service unavailable; try again later", True),
    ]
    for status, said, headers, expected, transient in cases:
        hub.server.fail_next("POST", f"/api/models/{repo}/commit/", status, said, headers=headers, times=10)
        with pytest.raises(HubError, match=expected) as err:
            push_checkpoint(tmp_path / "ckpt", repo, samples=False, token=hub.write_token)
        assert err.value.transient is transient and "cannot be reached" not in str(err.value)
        hub.server.failures.clear()
    with pytest.raises(HubError, match="that revision \\(branch, tag or commit\\) does not exist"):
        download_checkpoint(f"{repo}@no-such-branch")
    with pytest.raises(HubError, match="the repo does not exist, or your token cannot see it"):
        download_checkpoint(f"{hub.user}/never-made")


def test_card_metadata_the_hub_refuses_fails_before_anything_is_created(hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    from aksis.trainer import TrainingError

    save_tiny(tmp_path / "ckpt")
    repo = hub.fresh_repo_id("licensed")
    env = hub.subprocess_env(tmp_path, token=hub.write_token)
    push = [sys.executable, "-m", "aksis.cli", "push", "--checkpoint-path", str(tmp_path / "ckpt"), "--repo-id", repo]
    result = subprocess.run([*push, "--license", "MIT License"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert '"license" must be one of [apache-2.0, mit,' in result.stderr and "nothing was pushed" in result.stderr
    assert not HfApi(token=hub.write_token).repo_exists(repo)

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("To be, or not to be, that is the question. " * 200)
    config = run_config(tmp_path, "run", push_to_hub=True, hub_model_id=repo, hub_license="MIT License")
    with pytest.raises(TrainingError, match='"license" must be one of'):
        Trainer(config)
    assert not HfApi(token=hub.write_token).repo_exists(repo) and not (tmp_path / "run").exists()


def test_a_second_run_in_a_repo_stops_before_training_unless_it_overwrites(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    from aksis.trainer import TrainingError

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("To be, or not to be, that is the question. " * 400)
    monkeypatch.setenv("HF_TOKEN", hub.write_token)
    repo = hub.fresh_repo_id("shared")
    assert Trainer(run_config(tmp_path, "first", push_to_hub=True, hub_model_id=repo)).train().push_errors == []
    first = tags_of(repo)
    assert set(first) == {"step-2", "step-4"}
    second = run_config(tmp_path, "second", push_to_hub=True, hub_model_id=repo, seed=7)
    with pytest.raises(TrainingError, match=f"{repo} already holds the step tags of another run .*--overwrite"):
        Trainer(second)
    assert not (tmp_path / "second").exists() or not any((tmp_path / "second").glob("step-*"))  # nothing trained
    result = Trainer(dataclasses.replace(second, overwrite=True)).train()
    assert result.push_errors == []
    moved = tags_of(repo)
    assert set(moved) == {"step-2", "step-4"} and not set(moved.values()) & set(first.values())
    at_tag = HfApi().hf_hub_download(repo, "model.safetensors", revision="step-4", cache_dir=hub.fresh_cache(tmp_path))
    assert Path(at_tag).read_bytes() == (tmp_path / "second" / "step-000004" / "model.safetensors").read_bytes()


def test_a_run_whose_pushes_failed_says_so_last_and_exits_non_zero(hub: Hub, tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("To be, or not to be, that is the question. " * 400)
    repo = hub.fresh_repo_id("failing")
    args = ["--dataset", str(tmp_path / "texts"), "--tokenizer", "byte", "--preset", "tiny", "--block-size", "32"]
    args += ["--batch-size", "4", "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu"]
    args += ["--output-dir", str(tmp_path / "run"), "--data-cache", str(tmp_path / "cache"), "--no-progress"]
    args += ["--push-to-hub", "--hub-model-id", repo]
    hub.server.fail_next("POST", f"/api/models/{repo}/commit/", 400, "Invalid commit", times=100)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "aksis.cli", "train-model", *args],
            env=hub.subprocess_env(tmp_path, token=hub.write_token),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        hub.server.failures.clear()
    assert result.returncode == 2 and "4 steps" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("aksis train-model: error: 3 push(es) to") and "the checkpoints are intact" in last
    assert f"aksis push --checkpoint-path {tmp_path / 'run' / 'best'} --repo-id {repo}" in last
    assert "failed (not retried): cannot push to" in result.stderr  # the Hub refused: not tried three times
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_aksis_push_takes_a_run_folder(hub: Hub, tmp_path: Path) -> None:
    save_tiny(tmp_path / "run" / "best")
    repo = hub.fresh_repo_id("from-run")
    env = hub.subprocess_env(tmp_path, token=hub.write_token)
    push = ["push", "--checkpoint-path", str(tmp_path / "run"), "--repo-id", repo]
    result = subprocess.run([sys.executable, "-m", "aksis.cli", *push], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"pushed {tmp_path / 'run' / 'best'} to {repo}@main" in result.stdout
