"""aksis.blocks: tokenizers trained once, cached tokenization, packed and streamed blocks, chat labels."""

import itertools
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import CHATS, write_jsonl

from aksis.blocks import (
    PackedBlocks,
    StreamingBlocks,
    build_data,
    corpus_tokenizer,
    token_stream,
    tokenize,
    tokenize_chat,
)
from aksis.config import IGNORE_INDEX
from aksis.corpora import (
    DataError,
    load_conversations,
    load_corpus,
)
from aksis.tokenizer import Tokenizer


def _docs(n: int = 30) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text": [f"document {i}: " + "lorem ipsum dolor " * (i % 5 + 1) for i in range(n)]}
    )


def test_tokenize_appends_endoftext_and_caches_by_tokenizer(tmp_path: Path) -> None:
    docs, byte = _docs(), Tokenizer.byte_level()
    first = tokenize(docs, byte, cache_dir=tmp_path)
    assert first["ids"][3] == [*byte.encode(docs["text"][3]), byte.eot_id]
    again = tokenize(docs, byte, cache_dir=tmp_path, num_proc=2)
    assert again.cache_files and all(Path(f["filename"]).parent == tmp_path / "tokens" for f in again.cache_files)
    assert again["ids"] == first["ids"]
    # a different tokenizer is a different cache entry, not a stale hit
    bpe = Tokenizer.train(list(docs["text"]) * 20, 270)
    other = tokenize(docs, bpe, cache_dir=tmp_path)
    assert other["ids"][3] == [*bpe.encode(docs["text"][3]), bpe.eot_id]
    assert other.cache_files[0]["filename"] != first.cache_files[0]["filename"]
    stream = token_stream(first)
    assert stream.dtype == np.int32 and list(stream) == [i for ids in first["ids"] for i in ids]


def test_packed_blocks_are_windows_of_context_plus_one() -> None:
    tokens = np.arange(100, dtype=np.int32)
    blocks = PackedBlocks(tokens, block_size=16)
    assert len(blocks) == 6  # (100 - 17) // 16 + 1
    assert blocks[0].tolist() == list(range(17)) and blocks[1].tolist() == list(range(16, 33))
    assert blocks[0].dtype == torch.long
    overlapping = PackedBlocks(tokens, block_size=16, stride=4)
    assert len(overlapping) == (100 - 17) // 4 + 1 and overlapping[2].tolist() == list(range(8, 25))
    with pytest.raises(IndexError):
        blocks[6]
    with pytest.raises(DataError, match="stride"):
        PackedBlocks(tokens, block_size=16, stride=17)
    assert len(PackedBlocks(np.arange(16, dtype=np.int32), block_size=16)) == 0


def test_streaming_blocks_equal_packed_blocks_shard_and_skip() -> None:
    docs, byte = _docs(), Tokenizer.byte_level()
    tokens = np.concatenate([[*byte.encode(t), byte.eot_id] for t in docs["text"]])
    packed = [b.tolist() for b in PackedBlocks(tokens, block_size=32)]
    stream = StreamingBlocks(docs.to_iterable_dataset(), byte, block_size=32)
    assert [b.tolist() for b in itertools.islice(stream, len(packed))] == packed
    stream.skip = 5
    assert [b.tolist() for b in itertools.islice(stream, 3)] == packed[5:8]
    # two processes read disjoint halves of the documents
    sharded = docs.to_iterable_dataset(num_shards=2)
    halves = [StreamingBlocks(sharded, byte, block_size=32, rank=r, world_size=2) for r in (0, 1)]
    first = [set(map(tuple, (b.tolist() for b in itertools.islice(h, 4)))) for h in halves]
    assert not first[0] & first[1]
    assert byte.decode(next(iter(halves[1])).tolist()).startswith("document 15:")  # the second shard


def test_bpe_is_trained_once_per_corpus(tmp_path: Path) -> None:
    train = load_corpus()["train"]
    tokenizer = corpus_tokenizer("bpe", train, vocab_size=600, cache_dir=tmp_path)
    cached = list((tmp_path / "tokenizers").glob("bpe-600-*.json"))
    assert tokenizer.vocab_size == 600 and len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = corpus_tokenizer("bpe", load_corpus()["train"], vocab_size=600, cache_dir=tmp_path)
    assert again.to_dict() == tokenizer.to_dict() and cached[0].stat().st_mtime_ns == stamp
    assert corpus_tokenizer("byte", train).kind == "byte"
    with pytest.raises(DataError, match="unknown tokenizer"):
        corpus_tokenizer("no-such-tokenizer", train)


def test_build_data_packs_train_and_validation(tmp_path: Path) -> None:
    data = build_data("shakespeare", block_size=64, tokenizer="byte", cache_dir=tmp_path)
    assert isinstance(data.train, PackedBlocks) and data.train_tokens and data.train_tokens > 4_000_000
    assert len(data.validation) > 100 and data.validation[0].shape == (65,)
    text = data.tokenizer.decode(data.train[0].tolist())
    assert isinstance(text, str) and len(text) == 65  # byte level: one token per ASCII character


def test_build_data_errors_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("a short text\n" * 5)
    with pytest.raises(DataError, match="smaller --block-size"):
        build_data(str(tmp_path / "small.txt"), block_size=512, tokenizer="byte", cache_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        build_data(str(tmp_path / "empty.txt"), block_size=8, tokenizer="byte", cache_dir=tmp_path)


def test_chat_labels_are_the_assistant_replies_and_their_endoftext(tmp_path: Path) -> None:
    byte = Tokenizer.byte_level()
    tokenized = tokenize_chat(datasets.Dataset.from_dict({"messages": CHATS[:2]}), byte, cache_dir=tmp_path)
    ids, labels = tokenized["ids"][0], tokenized["labels"][0]
    assert byte.decode(ids) == (
        "<|system|>Be terse.<|endoftext|><|user|>Hi<|endoftext|><|assistant|>Hello.<|endoftext|>"
        "<|user|>Bye<|endoftext|><|assistant|>Go well.<|endoftext|>"
    )
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    assert byte.decode(ids[i] for i in trained) == "Hello.<|endoftext|>Go well.<|endoftext|>"
    # everything else is masked: role tokens, the system and user text and their <|endoftext|>
    assert byte.decode(ids[i] for i in range(len(ids)) if labels[i] == IGNORE_INDEX) == (
        "<|system|>Be terse.<|endoftext|><|user|>Hi<|endoftext|><|assistant|><|user|>Bye<|endoftext|><|assistant|>"
    )
    again = tokenize_chat(datasets.Dataset.from_dict({"messages": CHATS[:2]}), byte, cache_dir=tmp_path)
    assert again.cache_files[0]["filename"] == tokenized.cache_files[0]["filename"]  # cached on disk
    text_cache = tokenize(datasets.Dataset.from_dict({"text": ["x"]}), byte, cache_dir=tmp_path)
    assert text_cache.cache_files[0]["filename"] != tokenized.cache_files[0]["filename"]


def test_a_local_jsonl_of_conversations_packs_ids_and_labels_together(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c, "source": "test"} for c in CHATS])
    corpus = load_conversations(str(path), val_fraction=0.1, seed=1)
    assert corpus["train"].column_names == ["messages"]
    assert len(corpus["train"]) + len(corpus["validation"]) == 40 and len(corpus["validation"]) == 4
    again = load_conversations(str(path), val_fraction=0.1, seed=1)
    assert list(again["validation"]["messages"]) == list(corpus["validation"]["messages"])
    data = build_data(
        str(path), block_size=32, tokenizer="byte", data_format="chat", val_fraction=0.1, seed=1, cache_dir=tmp_path
    )
    block = data.train[0]
    assert block.shape == (2, 33) and block.dtype == torch.long
    ids, labels = block
    trained = labels != IGNORE_INDEX
    assert trained.any() and (~trained).any() and torch.equal(labels[trained], ids[trained])
    # the streams are cut at the same places
    stream = token_stream(tokenize_chat(corpus["train"], data.tokenizer, cache_dir=tmp_path), "labels")
    assert labels.tolist() == stream[:33].tolist() and data.train_tokens == len(stream)
    assert data.validation[0].shape[0] == 2
    # a BPE tokenizer (no --init-from) is trained on the message contents
    bpe = build_data(str(path), block_size=8, tokenizer="bpe", vocab_size=300, data_format="chat", cache_dir=tmp_path)
    assert bpe.tokenizer.vocab_size == 300 and len(bpe.tokenizer.encode("answer")) < len("answer")


def test_packed_blocks_with_labels_are_ids_over_labels() -> None:
    tokens = np.arange(100, dtype=np.int32)
    blocks = PackedBlocks(tokens, block_size=16, labels=-tokens)
    assert len(blocks) == 6 and blocks[1].tolist() == [list(range(16, 33)), [-i for i in range(16, 33)]]
    with pytest.raises(DataError, match="same length"):
        PackedBlocks(tokens, block_size=16, labels=tokens[:50])
