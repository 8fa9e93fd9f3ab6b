import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aksis.tokenizer import MAX_FILE_BYTES, SPECIAL_TOKENS, Tokenizer, TokenizerError

# Arbitrary Unicode, minus lone surrogates (not encodable as UTF-8, so not text a file can hold).
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
SAMPLE = "To be, or not to be: that is the question.\n  Ça va? 日本語 🤖 <|user|> 12345 \t\r\n"


@pytest.fixture(scope="module")
def bpe(shakespeare_texts: list[str]) -> Tokenizer:
    return Tokenizer.train(shakespeare_texts[:4], vocab_size=2_000)


@pytest.fixture(scope="module")
def cl100k() -> Tokenizer:
    return Tokenizer.from_name("cl100k_base")  # the bundled offline copy when there is no network


@pytest.fixture(params=["byte", "bpe", "cl100k"])
def tokenizer(request: pytest.FixtureRequest, bpe: Tokenizer, cl100k: Tokenizer) -> Tokenizer:
    return {"byte": Tokenizer.byte_level(), "bpe": bpe, "cl100k": cl100k}[request.param]


@settings(max_examples=150, deadline=None)
@given(text=unicode_text)
def test_decode_encode_round_trips_any_text_byte(text: str) -> None:
    tok = Tokenizer.byte_level()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=unicode_text)
def test_decode_encode_round_trips_any_text_bpe(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=unicode_text)
def test_decode_encode_round_trips_any_text_cl100k(cl100k: Tokenizer, text: str) -> None:
    assert cl100k.decode(cl100k.encode(text)) == text


def test_every_kind_has_the_four_special_tokens(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.special_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == 4 and max(ids) < tokenizer.vocab_size
    assert tokenizer.eot_id == tokenizer.special_id("<|endoftext|>")
    assert tokenizer.decode(ids) == "".join(SPECIAL_TOKENS)
    with pytest.raises(TokenizerError, match="not a special token"):
        tokenizer.special_id("<|bos|>")


def test_text_that_spells_a_special_token_stays_text(tokenizer: Tokenizer) -> None:
    specials = {tokenizer.special_id(t) for t in SPECIAL_TOKENS}
    for token in SPECIAL_TOKENS:
        text = f"hi {token} there"
        ids = tokenizer.encode(text)
        assert not specials & set(ids)
        assert tokenizer.decode(ids) == text
    assert not specials & {i for ids in tokenizer.encode_batch(list(SPECIAL_TOKENS)) for i in ids}


def test_vocab_sizes_of_each_kind(bpe: Tokenizer, cl100k: Tokenizer) -> None:
    assert Tokenizer.byte_level().vocab_size == 260
    assert bpe.vocab_size == 2_000
    assert cl100k.encode("hello world") == [15339, 1917]  # cl100k_base's own ids
    assert cl100k.eot_id == 100257  # kept where cl100k_base has it; the three chat tokens come after
    assert cl100k.vocab_size == 100_280


def test_default_trained_bpe_reaches_10004_tokens(shakespeare_texts: list[str]) -> None:
    tok = Tokenizer.train(shakespeare_texts)
    assert tok.vocab_size == 10_004
    assert tok.kind == "bpe" and tok.eot_id == 10_000
    assert len(tok.encode(shakespeare_texts[0])) < len(shakespeare_texts[0].encode()) / 3  # it compresses


def test_training_that_cannot_reach_the_vocab_size_says_so() -> None:
    with pytest.raises(TokenizerError, match="supports only .* BPE tokens.*train on more text"):
        Tokenizer.train(["a tiny corpus, a tiny corpus"], vocab_size=5_000)
    with pytest.raises(TokenizerError, match="vocab_size must be at least 260"):
        Tokenizer.train(["text"], vocab_size=100)


def test_save_load_round_trip_is_identical(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert (loaded.kind, loaded.name, loaded.vocab_size) == (tokenizer.kind, tokenizer.name, tokenizer.vocab_size)
    assert loaded.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert loaded.decode(loaded.encode(SAMPLE)) == SAMPLE
    assert all(loaded.special_id(t) == tokenizer.special_id(t) for t in SPECIAL_TOKENS)
    assert Tokenizer.from_name(str(tmp_path)).encode(SAMPLE) == tokenizer.encode(SAMPLE)  # a folder works too


def test_corrupt_or_foreign_tokenizer_files_are_clear_errors(bpe: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    path.write_text(path.read_text()[:1000])
    with pytest.raises(TokenizerError, match="tokenizer.json is not valid JSON.*truncated or corrupt"):
        Tokenizer.load(path)
    path.write_text(json.dumps({"format_version": 1, "kind": "bpe"}))
    with pytest.raises(TokenizerError, match="incomplete or malformed"):
        Tokenizer.load(path)
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(TokenizerError, match="format_version 99 is not supported"):
        Tokenizer.load(path)
    with pytest.raises(TokenizerError, match="no tokenizer file at"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="unknown tokenizer 'nope'"):
        Tokenizer.from_name("nope")


def test_named_encoding_without_network_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty tiktoken cache and a proxy on a closed local port: the download fails at once, as offline.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(TokenizerError, match="'r50k_base' needs its vocabulary file from the internet.*cl100k_base"):
        Tokenizer.from_name("r50k_base")
    assert Tokenizer.from_name("cl100k_base").encode("hello world") == [15339, 1917]


def test_a_tokenizer_file_that_would_hang_or_crash_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A split pattern that can match the empty string makes tiktoken loop forever on any text; one that
    backtracks badly takes forever on long runs. Both are refused when the file is read, in bounded time."""
    data = Tokenizer.byte_level().to_dict()
    cases = {
        "empty.json": ({**data, "pattern": r"\s*|\p{L}+"}, "can match the empty string"),
        "slow.json": ({**data, "pattern": r"(a+)+$"}, "takes more than 1 s on a 4,097-character text"),
        "broken.json": ({**data, "pattern": "["}, "is not a regular expression"),
        "list.json": ([1, 2, 3], "must be a JSON object, got list"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        start = time.perf_counter()
        with pytest.raises(TokenizerError, match=f"{tmp_path / name}: .*{re.escape(message)}"):
            Tokenizer.load(tmp_path / name)
        assert time.perf_counter() - start < 10
    (tmp_path / "huge.json").write_bytes(b" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(TokenizerError, match="more than a tokenizer takes"):
        Tokenizer.load(tmp_path / "huge.json")
