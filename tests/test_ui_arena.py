"""The Arena tab (aksis/ui/arena_tab.py) and the feedback log (aksis/ui/feedback.py): blind battles answered as the
library answers, one vote per battle, the leaderboard, the same through the running app's API, and feedback
committed to a Hub dataset repo by huggingface_hub's CommitScheduler (against the local Hub server)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import torch
from conftest import Hub, ServedApp
from huggingface_hub import HfApi, hf_hub_download

from aksis.chat import Conversation, reply
from aksis.checkpoint import load_model
from aksis.config import GenerationConfig
from aksis.generation import SAMPLER_PRESETS, generate, sampler_config
from aksis.ui.arena_tab import (
    VOTES,
    Battle,
    arena_config,
    leaderboard_table,
    new_battle,
    random_pair,
    reveal,
    run_battle,
    vote,
    winner_code,
)
from aksis.ui.context import MAX_PROMPT_CHARS
from aksis.ui.feedback import HUB_FOLDER, LEADERBOARD_COLUMNS, RATE, FeedbackLog, leaderboard
from aksis.ui.models import ModelStore
from aksis.ui.sampling import Sampling


@pytest.fixture(scope="module")
def store(app_checkpoints: Path) -> ModelStore:
    return ModelStore(app_checkpoints, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(app_checkpoints: Path) -> tuple[str, str]:
    return str(app_checkpoints / "tiny-llama"), str(app_checkpoints / "tiny-gpt2")


def library_answer(source: str, prompt: str, mode: str, config: GenerationConfig) -> str:
    """What the library writes for `prompt`, with the model loaded afresh (not through the app's store)."""
    model, tokenizer, _ = load_model(source, device="cpu")
    if mode == "continue":
        return generate(model, tokenizer, prompt, config).text
    conversation = Conversation()
    conversation.add("user", prompt)
    for _ in reply(model, tokenizer, conversation, config):
        pass
    return conversation.messages[-1].content


def finished_battle(runs: tuple[str, str]) -> Battle:
    battle = Battle("ROMEO:", "continue", runs, GenerationConfig().to_dict(), answers=["one", "two"])
    battle.complete = True
    return battle


# ----- battles -----


def test_random_pair_draws_two_different_models_in_either_order() -> None:
    rng = random.Random(0)
    pairs = {random_pair(["m1", "m2", "m3", "m2"], rng) for _ in range(200)}
    assert pairs == {(a, b) for a in ("m1", "m2", "m3") for b in ("m1", "m2", "m3") if a != b}
    assert random_pair(["only"]) == ("only", "only")
    assert random_pair([]) == (None, None)


def test_a_battle_hides_which_model_is_a_and_checks_its_input(runs: tuple[str, str]) -> None:
    config = arena_config(Sampling(preset="balanced", max_new_tokens=8, seed=1), limit=64)
    llama, gpt2 = runs
    assert new_battle("Hi", llama, gpt2, "chat", config, swap=False).models == (llama, gpt2)
    assert new_battle("Hi", llama, gpt2, "chat", config, swap=True).models == (gpt2, llama)
    orders = {new_battle("Hi", llama, gpt2, None, config).models for _ in range(64)}
    assert orders == {(llama, gpt2), (gpt2, llama)}  # A is either model, at random (fails with p = 2**-63)
    battle = new_battle("Hi", llama, gpt2, None, config)
    assert (battle.mode, battle.settings, battle.complete, battle.winner) == ("continue", config.to_dict(), False, None)
    for args, message in [
        (("  ", llama, gpt2, "chat"), "The prompt is empty"),
        (("a" * (MAX_PROMPT_CHARS + 1), llama, gpt2, "chat"), f"this app takes at most {MAX_PROMPT_CHARS:,}"),
        (("Hi", llama, "", "chat"), "Pick two models"),
        (("Hi", llama, f" {llama} ", "chat"), "Pick two different models"),
        (("Hi", llama, gpt2, "poem"), "unknown mode 'poem'"),
    ]:
        with pytest.raises(gr.Error, match=message):
            new_battle(*args, config)


def test_arena_settings_are_a_preset_over_the_library_defaults() -> None:
    for preset in SAMPLER_PRESETS:
        expected = sampler_config(preset, GenerationConfig(), max_new_tokens=20, seed=4)
        assert arena_config(Sampling(preset=preset, max_new_tokens=20, seed=4.0), limit=64) == expected
    assert arena_config(Sampling(preset=None, max_new_tokens=20, seed=None), limit=64).seed is None
    with pytest.raises(gr.Error, match="unknown preset 'wild'"):
        arena_config(Sampling(preset="wild", max_new_tokens=20, seed=None), limit=64)
    with pytest.raises(gr.Error, match="max new tokens must be between 1 and 64"):
        arena_config(Sampling(preset="balanced", max_new_tokens=65, seed=None), limit=64)


@pytest.mark.parametrize("mode", ["continue", "chat"])
def test_both_answers_are_what_the_library_writes(store: ModelStore, runs: tuple[str, str], mode: str) -> None:
    config = arena_config(Sampling(preset="creative", max_new_tokens=16, seed=9), limit=64)
    battle = new_battle("ROMEO:", runs[0], runs[1], mode, config, swap=True)
    states = [(list(b.answers), b.complete) for b in run_battle(store, battle)]
    assert [complete for _, complete in states] == [False] * (len(states) - 1) + [True]
    assert states[-1][0] == battle.answers
    a, b = battle.answers
    assert a and b  # the comparison below means something
    assert a == library_answer(runs[1], "ROMEO:", mode, config)  # swapped: A is model 2
    assert b == library_answer(runs[0], "ROMEO:", mode, config)


def test_a_battle_that_cannot_load_a_model_says_which_side(store: ModelStore, runs: tuple[str, str]) -> None:
    battle = new_battle(
        "Hi",
        runs[0],
        "alice/no-such-model",
        "continue",
        arena_config(Sampling(preset=None, max_new_tokens=4, seed=1), limit=64),
        swap=False,
    )
    with pytest.raises(gr.Error, match="Could not load model B"):
        list(run_battle(store, battle))
    assert not battle.complete  # so it cannot be voted on


# ----- votes -----


def test_a_vote_is_recorded_once_and_reveals_the_models(tmp_path: Path, runs: tuple[str, str]) -> None:
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    battle = finished_battle(runs)
    record = vote(log, battle, VOTES["b"])  # a button's label, or the code
    assert {k: record[k] for k in ("kind", "model_a", "model_b", "winner", "prompt", "answer_a", "answer_b")} == {
        "kind": "vote",
        "model_a": runs[0],
        "model_b": runs[1],
        "winner": "b",
        "prompt": "ROMEO:",
        "answer_a": "one",
        "answer_b": "two",
    }
    assert record["battle"] == battle.id and record["settings"] == GenerationConfig().to_dict()
    assert f"**A** was `{runs[0]}`; **B** was `{runs[1]}`" in reveal(record)
    with pytest.raises(gr.Error, match="You already voted on this battle"):
        vote(log, battle, "a")
    assert log.records() == [record]

    unfinished = finished_battle(runs)
    unfinished.complete = False
    for battle_, winner, message in [
        (None, "a", "nothing to vote on yet"),
        (unfinished, "a", "Both answers are not written yet"),
        (finished_battle(runs), "c", "unknown vote 'c'"),
    ]:
        with pytest.raises(gr.Error, match=message):
            vote(log, battle_, winner)
    assert len(log.records()) == 1
    assert [winner_code(w) for w in ("A", " tie ", VOTES["both-bad"])] == ["a", "tie", "both-bad"]


def test_leaderboard_counts_wins_ties_and_losses() -> None:
    def battle(a: str, b: str, winner: str) -> dict[str, Any]:
        return {"kind": "vote", "model_a": a, "model_b": b, "winner": winner}

    records = [
        battle("x", "y", "a"),
        battle("y", "x", "a"),
        battle("x", "z", "a"),
        battle("y", "z", "tie"),
        battle("z", "x", "both-bad"),
        battle("x", "x", "a"),  # a model against itself: not counted
        battle("x", "y", "maybe"),  # not a winner: not counted
        {"kind": "like", "model": "x"},
    ]
    rows = leaderboard(records)
    assert [tuple(row[c] for c in LEADERBOARD_COLUMNS) for row in rows] == [
        ("x", 4, 2, 0, 1, 0.5),
        ("y", 3, 1, 1, 1, 0.333),
        ("z", 3, 0, 1, 1, 0.0),
    ]


def test_the_log_skips_a_torn_line(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "deep" / "feedback.jsonl")
    first = log.record("like", model="m")
    with log.path.open("a", encoding="utf-8") as f:
        f.write('{"kind": "vote", "model_a"')  # a crash mid-write
    with log.path.open("a", encoding="utf-8") as f:
        f.write("\n")
    second = log.record("dislike", model="m")
    assert log.records() == [first, second]
    assert leaderboard_table(log) == {"headers": list(LEADERBOARD_COLUMNS), "data": []}


def test_the_leaderboard_is_kept_as_votes_come_not_read_from_the_file_again(tmp_path: Path) -> None:
    """The whole log used to be re-read at every vote, leaderboard view and page load (1.0 s at 170 MB)."""
    path = tmp_path / "feedback.jsonl"
    before = FeedbackLog(path)
    before.record("vote", model_a="x", model_b="y", winner="a")
    before.record("like", model="x")
    log = FeedbackLog(path)  # a restart reads the file once
    assert log.standings() == leaderboard(log.records())
    log.record("vote", model_a="y", model_b="x", winner="a")
    log.record("vote", model_a="z", model_b="x", winner="tie")
    assert log.standings() == leaderboard(log.records())
    path.write_text("")  # the running tally never looks at the file again
    assert {row["model"]: row["battles"] for row in log.standings()} == {"x": 3, "y": 2, "z": 1}
    assert FeedbackLog(path).standings() == []


def test_a_session_votes_at_a_bounded_rate_and_a_refused_vote_can_be_cast_again(
    tmp_path: Path, runs: tuple[str, str]
) -> None:
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    for _ in range(RATE[0]):
        vote(log, finished_battle(runs), "a", session="s1")
    battle = finished_battle(runs)
    with pytest.raises(gr.Error, match="at most 30 ratings a minute"):
        vote(log, battle, "a", session="s1")
    assert battle.winner is None  # not counted as voted
    vote(log, battle, "b", session="s2")
    assert battle.winner == "b" and len(log.records()) == RATE[0] + 1


# ----- through the running app -----


def test_arena_through_the_api(served_app: ServedApp, runs: tuple[str, str]) -> None:
    client = served_app.client()
    with pytest.raises(Exception, match="nothing to vote on yet"):
        client.predict("a", api_name="/arena_vote")
    answer_a, answer_b, status = client.predict(
        "JULIET:", runs[0] + "/", runs[1], "continue", "balanced", 12, api_name="/arena_answer"
    )
    assert "revealed after your vote" in status
    assert not any(name in text for name in runs for text in (answer_a, answer_b, status))  # blind

    revealed, board = client.predict("tie", api_name="/arena_vote")
    record = FeedbackLog(served_app.settings.feedback_file).records()[-1]
    assert (record["kind"], record["winner"], record["answer_a"], record["answer_b"]) == (
        "vote",
        "tie",
        answer_a,
        answer_b,
    )
    assert {record["model_a"], record["model_b"]} == set(runs)  # runs[0] + "/" is runs[0]: one model, one name
    assert f"**A** was `{record['model_a']}`" in revealed
    # The server drew the seed (a visitor's own would tell the models apart); the answers are the library's with it.
    config = GenerationConfig.from_dict(record["settings"])
    assert config == sampler_config("balanced", GenerationConfig(), max_new_tokens=12, seed=config.seed)
    assert answer_a == library_answer(record["model_a"], "JULIET:", "continue", config)
    assert answer_b == library_answer(record["model_b"], "JULIET:", "continue", config)

    with pytest.raises(Exception, match="You already voted on this battle"):
        client.predict("a", api_name="/arena_vote")
    expected = leaderboard(FeedbackLog(served_app.settings.feedback_file).records())
    assert board["headers"] == list(LEADERBOARD_COLUMNS)
    assert board["data"] == [[row[c] for c in LEADERBOARD_COLUMNS] for row in expected]
    assert client.predict(api_name="/leaderboard")["data"] == board["data"]
    with pytest.raises(Exception, match="Pick two different models"):
        client.predict("Hi", runs[0], f"{runs[0]}/./", "continue", "balanced", 12, api_name="/arena_answer")
    with pytest.raises(Exception, match=f"this app takes at most {MAX_PROMPT_CHARS:,}"):
        client.predict("a" * (MAX_PROMPT_CHARS + 1), *runs, "continue", "balanced", 12, api_name="/arena_answer")
    client.predict("JULIET:", *runs, "continue", "balanced", 12, api_name="/arena_answer")
    client.predict("a", api_name="/arena_vote")
    again = FeedbackLog(served_app.settings.feedback_file).records()[-1]
    assert again["settings"]["seed"] != record["settings"]["seed"]  # a new seed for every battle


# ----- feedback on the Hub -----


def test_feedback_is_committed_to_a_hub_dataset_and_read_back_after_a_restart(hub: Hub, tmp_path: Path) -> None:
    repo_id = hub.fresh_repo_id("feedback")
    first = FeedbackLog(tmp_path / "run1" / "feedback.jsonl", repo_id=repo_id, token=hub.write_token)
    assert first.hub_error is None
    records = [first.record("vote", model_a="x", model_b="y", winner="a"), first.record("like", model="x")]
    first.push_now()

    api = HfApi(token=hub.write_token)
    assert api.repo_info(repo_id, repo_type="dataset").private  # visitors' prompts are not published
    assert first.shard is not None
    name = f"{HUB_FOLDER}/{first.shard.name}"
    assert name in api.list_repo_files(repo_id, repo_type="dataset")
    path = hf_hub_download(
        repo_id, name, repo_type="dataset", token=hub.write_token, cache_dir=hub.fresh_cache(tmp_path)
    )
    assert [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()] == records

    later = first.record("vote", model_a="y", model_b="x", winner="a")
    first.close()  # pushes what the Hub does not have yet
    # A restarted Space: an empty disk, the same repo. The leaderboard still counts the earlier votes, and new
    # records go to a file of their own instead of replacing the first run's.
    second = FeedbackLog(tmp_path / "run2" / "feedback.jsonl", repo_id=repo_id, token=hub.write_token)
    assert second.records() == [*records, later]
    third = second.record("vote", model_a="x", model_b="y", winner="b")
    second.push_now()
    second.close()
    files = [f for f in api.list_repo_files(repo_id, repo_type="dataset") if f.startswith(f"{HUB_FOLDER}/")]
    assert len(files) == 2
    again = FeedbackLog(tmp_path / "run3" / "feedback.jsonl", repo_id=repo_id, token=hub.write_token)
    assert [r["id"] for r in again.records()] == [r["id"] for r in [*records, later, third]]
    again.close()


def test_feedback_stays_local_when_the_hub_refuses(hub: Hub, tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "feedback.jsonl", repo_id=f"{hub.user}/feedback", token=hub.other_token)
    assert log.hub_error is not None and "no write access (403)" in log.hub_error
    record = log.record("like", model="m")
    assert log.records() == [record]
    log.push_now()  # nothing to push to: no error
    assert hub.token_leaks(hub.other_token) == []


def test_the_leaderboard_counts_one_folder_written_two_ways_as_one_model() -> None:
    votes = [
        {"kind": "vote", "model_a": "checkpoints/tiny-a", "model_b": "alice/tiny", "winner": "a"},
        {"kind": "vote", "model_a": "checkpoints/tiny-a/", "model_b": "alice/tiny", "winner": "a"},  # an older record
        {"kind": "vote", "model_a": "./checkpoints/tiny-a", "model_b": "alice/tiny", "winner": "b"},
    ]
    rows = {row["model"]: row for row in leaderboard(votes)}
    assert set(rows) == {"checkpoints/tiny-a", "alice/tiny"}
    assert (rows["checkpoints/tiny-a"]["battles"], rows["checkpoints/tiny-a"]["wins"]) == (3, 2)
