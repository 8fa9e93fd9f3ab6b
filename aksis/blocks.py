"""Tokens for training: a corpus of aksis.corpora turned into blocks of context + 1 tokens.

`build_data` is the whole path. The tokenizer is trained once per corpus (or named) and cached; documents are
tokenized with `datasets.map` (batched, multi-process), each followed by `<|endoftext|>`, and the result is
cached on disk under a key made of the split's fingerprint and the tokenizer's hash, so a second run (or the
other processes of a distributed run) reads it back instantly. Training reads `PackedBlocks`: the token
stream of a split cut into blocks of context + 1 tokens (inputs and shifted targets), `stride` tokens apart, in
the order of `EpochSampler`. Streams too large to materialise go through `StreamingBlocks`, which tokenizes and
packs on the fly, shards documents across processes and can skip what a resumed run has already seen.

Conversations are rendered with the chat template (`aksis.chat_template.render`) by a cached `datasets.map`
(`tokenize_chat`) into "ids" and "labels": the id where the assistant speaks (its reply and the `<|endoftext|>`
closing it), `IGNORE_INDEX` elsewhere. Both streams are packed alike, so a chat block is a (2, context + 1) tensor
[ids; labels], and the target of position t is labels[t + 1]. Conversations are packed back to back like
documents: a block may start mid-conversation, attention crosses conversation boundaries, and the first token
of the next conversation (a role token) is never a target.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.distributed import split_dataset_by_node

from aksis.chat_template import ChatError, Message, messages_from_records
from aksis.config import DATA_FORMATS, IGNORE_INDEX, default_cache_dir
from aksis.corpora import (
    DEFAULT_CORPUS,
    EXPECTED_MESSAGES,
    MESSAGES_COLUMN,
    TEXT_COLUMN,
    DataError,
    load_conversations,
    load_corpus,
)
from aksis.hf_tokenizer import tokenizer_from_name
from aksis.jinja_template import render_chat
from aksis.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, TokenizerError

log = logging.getLogger(__name__)

STREAM_VAL_DOCS = 1000  # validation documents read from a stream (evaluation uses only the first blocks)
TOKENIZER_TRAIN_CHARS = 200_000_000  # a BPE is trained on at most this much of the training text


# ----- the tokenizer -----


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
            return tokenizer_from_name(spec)
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
        # A model whose tokenizer starts texts with a BOS (Llama 3's) reads each document after one, as it was trained.
        bos = [self.tokenizer.bos_id] if self.tokenizer.add_bos and self.tokenizer.bos_id is not None else []
        return {"ids": [[*bos, *ids, eot] for ids in self.tokenizer.encode_batch(batch[TEXT_COLUMN])]}


class _EncodeChat:
    """The `datasets.map` function for conversations: "ids" in the chat template and "labels", the id where
    the assistant speaks and IGNORE_INDEX elsewhere. A class (not a closure) so worker processes can pickle it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"ids": [], "labels": []}
        for row, records in zip(indices, batch[MESSAGES_COLUMN], strict=True):
            try:
                ids, trained = render_chat(self.tokenizer, messages_from_records(records or []))
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
    key = _short_hash(ds._fingerprint, tokenizer_hash(tokenizer), "chat", json.dumps(render_chat(tokenizer, probe)))
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


class EpochSampler(torch.utils.data.Sampler[int]):
    """The order training reads `PackedBlocks` in: a fresh permutation every epoch, drawn from (seed, epoch) alone,
    so a resumed run replays the same order. (No `set_epoch` method on purpose: accelerate would call it with its
    own counter.)"""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        return self.n


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
