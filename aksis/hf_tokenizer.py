"""Hugging Face tokenizers (`tokenizer.json`), served by the `tokenizers` library, and aksis's own tokenizers
written in that format.

`HFTokenizer` has the public surface of `aksis.tokenizer.Tokenizer` (kind "hf"), so the rest of aksis can use either,
plus what a Hub model's files say about it: `bos_id`, `eos_ids`, `add_bos` and `chat_template`. Build one with
`HFTokenizer.from_folder(folder)` or `HFTokenizer.from_files(...)`. As with aksis's own tokenizers, `encode` reads its
input as ordinary text: no BOS/EOS is added and "<|im_end|>" typed by a user stays those characters (the library's
`encode_special_tokens`, tokenizers >= 0.15.1). Only code inserts specials (`special_id`). Added tokens that the file
does not mark special (Qwen2's "<tool_call>", say) are matched in text, as the model's own tokenizer does.

Why serve through `tokenizers` instead of converting the file to a `tiktoken.Encoding` (tiktoken is faster): a
conversion is exact only for a few files. tiktoken merges any adjacent pair whose concatenation is a token, a HF BPE
only the pairs its merges list; normalizers (Qwen2's NFC), Digits and Metaspace pre-tokenizers, prefix spaces,
`ignore_merges` and SentencePiece's byte fallback have no tiktoken counterpart. The library reads every model type it
knows, with the model's own rules, at a cost in speed. Measured 2026-12-04 with cl100k_base as written by
`to_hf_json`, on 1.0 MB of Shakespeare (282,619 tokens, 37,436 lines), on a 2-vCPU machine that another job shared,
in millions of tokens/s, tiktoken (aksis `Tokenizer`) against `HFTokenizer`: the whole text in one call 5.0 vs 0.8;
line by line 3.2 vs 0.9; `encode_batch` of the lines 0.4 vs 0.7 (tiktoken's Python thread pool costs more per short
text than it gains on two cores); `decode` 40 vs 20. A corpus takes 3-6x longer; a chat message well under a
millisecond either way.

Everything read is untrusted (it may come from any Hub repo, in a public web app): files larger than
`aksis.tokenizer.MAX_FILE_BYTES`, invalid JSON, a JSON that is not an object, a file the library cannot read or that
fails on a probe text, a "Split" pre-tokenizer regex that `aksis.tokenizer.check_split_pattern` refuses (one that can
match the empty string or backtracks too much), ids out of range and a missing EOS are all `TokenizerError`s naming
the file. A file's `truncation` and `padding` settings are switched off: `encode` returns every token.

`to_hf_json(tokenizer)` writes aksis's own tiktoken-based tokenizers as a `tokenizer.json` the library (and
`transformers.PreTrainedTokenizerFast`) reads, with the ids tiktoken gives.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from aksis.tokenizer import (
    AKSIS_MARKER,
    BYTE_TO_CHAR,
    CHAR_TO_BYTE,
    MAX_FILE_BYTES,
    Tokenizer,
    TokenizerError,
    check_split_pattern,
    tokenizer_from_hf,
)

MAX_VOCAB_SIZE = 1 << 21  # a file whose ids reach past this is refused (the largest real vocabularies hold ~260k)
# Texts every loaded tokenizer must encode and decode without failing (a hostile file can make the library panic).
PROBES = ("a", " ", "Hello, world! It's 12345 o'clock.\tDone?\r\n  Ça va, 中文 🙂 ...", "a" * 2048 + "!", " " * 2048)
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Oniguruma, the library's regex engine (in its Ruby syntax), reads `?+`, `*+` and `++` as possessive, as tiktoken
# does, but `X{1,3}+` as `(?:X{1,3})+`, one or more runs of 1-3 X: cl100k_base's `\p{N}{1,3}+` would then take a whole
# run of digits. An atomic group, `(?>X{1,3})`, means the same to both. X: a \p{..} class, an escape, a [...] set or
# one character; a possessive interval on anything else is refused.
_POSSESSIVE_INTERVAL = re.compile(
    r"(\\[pP]\{\w+\}|\\[pP]\w|\\.|\[(?:\\.|[^\]\\])*\]|[^\\()\[\]{}|])(\{\d+(?:,\d*)?\})\+"
)
_POSSESSIVE_INTERVAL_LEFT = re.compile(r"(?<!\\)\{\d+(?:,\d*)?\}\+")


def is_hf_tokenizer_file(path: Path) -> bool:
    """True for a Hugging Face tokenizer.json (it names a `model`), False for aksis's own (it holds `ranks`) and for
    a file that is neither (aksis's reader then says what is wrong with it)."""
    try:
        data = _read_object(_read_text(path), path)
    except TokenizerError:
        return False
    return "model" in data and "ranks" not in data


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` served by the `tokenizers` library, with aksis's `Tokenizer` surface (a subclass
    that overrides every method: it holds no tiktoken encoding).

    `eot_id` is the EOS that ends a document (tokenizer_config.json's eos_token, unless generation_config.json names
    other ids); `eos_ids` every id that ends generation; `bos_id` the BOS or None, and `add_bos` whether the file's
    post-processor adds it when asked for special tokens (`encode` never does)."""

    kind = "hf"

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        spec: dict[str, Any],
        *,
        name: str,
        eos_ids: Sequence[int],
        eot_id: int | None = None,
        bos_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        """`spec` is the parsed tokenizer.json that `backend` was read from (its decoder says how tokens map to
        bytes). Prefer `from_folder` / `from_files`, which check the files and resolve the ids."""
        if not eos_ids:
            raise TokenizerError(f"tokenizer {name!r} needs at least one eos id")
        self._backend = backend
        self._backend.no_truncation()  # a file's settings, which would silently cut or pad what `encode` returns
        self._backend.no_padding()
        self._backend.encode_special_tokens = True  # special-token spellings in text stay text
        # A second copy that reads them as specials, for text code wrote (a rendered chat template): one setting per
        # copy, never switched, so concurrent requests cannot see each other's.
        self._template_backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._template_backend.no_truncation()
        self._template_backend.no_padding()
        self.name = name
        self.eos_ids = list(eos_ids)
        self._eot_id = self.eos_ids[0] if eot_id is None else eot_id
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.config_data: dict[str, Any] = {}  # the tokenizer_config.json it came with, written again by save_files
        # encode_batch_fast (newer library versions) skips the offsets: 1.1-1.6x faster than encode, even for one text.
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._bytes: dict[int, bytes] = {}  # token_bytes, as tokens are met
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._vocab_size = max([-1, *backend.get_vocab(with_added_tokens=True).values(), *self._added]) + 1
        if self._vocab_size > MAX_VOCAB_SIZE:
            raise TokenizerError(
                f"its token ids reach {self._vocab_size - 1:,}, more than a vocabulary holds ({MAX_VOCAB_SIZE:,})"
            )
        for what, token_id in [("eos", i) for i in self.eos_ids] + [("eot", self._eot_id), ("bos", bos_id)]:
            if token_id is not None and (not 0 <= token_id < self._vocab_size or backend.id_to_token(token_id) is None):
                raise TokenizerError(f"its {what} id {token_id} is not a token id (vocab_size {self._vocab_size})")
        # How a token's string maps back to bytes, from the decoder the file declares.
        decoders = list(_walk(spec.get("decoder")))
        model = spec.get("model")
        self._byte_level = any(d.get("type") == "ByteLevel" for d in decoders)
        self._plain_byte_level = isinstance(spec.get("decoder"), dict) and spec["decoder"].get("type") == "ByteLevel"
        self._byte_fallback = isinstance(model, dict) and model.get("byte_fallback") is True
        self._space_marker = next((m for m in map(_space_marker, decoders) if m), None)
        try:
            for probe in PROBES:
                self.decode(self.encode(probe))
            first = backend.encode("a", add_special_tokens=True).ids[:1]
        except BaseException as err:
            if not _library_failure(err):
                raise
            raise TokenizerError(f"the tokenizers library fails on a probe text ({type(err).__name__}: {err})") from err
        self.add_bos = bos_id is not None and first == [bos_id]

    # ----- construction -----

    @classmethod
    def from_folder(cls, folder: str | Path, name: str | None = None) -> HFTokenizer:
        """The tokenizer of a Hub model's folder: tokenizer.json, and tokenizer_config.json, generation_config.json
        and chat_template.jinja where present."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}; a Hugging Face tokenizer needs one")
        optional = [folder / f for f in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")]
        config, generation, template = (p if p.is_file() else None for p in optional)
        return cls.from_files(folder / "tokenizer.json", config, generation, template, name=name or folder.name)

    @classmethod
    def from_files(
        cls,
        tokenizer_json: str | Path,
        tokenizer_config: str | Path | None = None,
        generation_config: str | Path | None = None,
        chat_template_file: str | Path | None = None,
        name: str | None = None,
    ) -> HFTokenizer:
        """Read the files (all untrusted). Ids: generation_config.json's bos_token_id / eos_token_id win over
        tokenizer_config.json's bos_token / eos_token. Chat template: chat_template.jinja wins over the config's."""
        path = Path(tokenizer_json)
        text = _read_text(path)
        spec = _read_object(text, path)
        for pattern in _split_patterns(spec):
            try:
                check_split_pattern(pattern)
            except TokenizerError as err:
                raise TokenizerError(f"{path}: {err}") from None
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except BaseException as err:
            if not _library_failure(err):
                raise
            raise TokenizerError(
                f"{path}: the tokenizers library {tokenizers.__version__} cannot read it ({type(err).__name__}: {err})"
            ) from err

        config = _read_object(_read_text(Path(tokenizer_config)), Path(tokenizer_config)) if tokenizer_config else {}
        generation = (
            _read_object(_read_text(Path(generation_config)), Path(generation_config)) if generation_config else {}
        )
        config_name = Path(tokenizer_config).name if tokenizer_config else "tokenizer_config.json"
        generation_name = Path(generation_config).name if generation_config else "generation_config.json"

        def token_id(key: str) -> int | None:
            """tokenizer_config.json's `key` ("bos_token", "eos_token") as an id, or None when it names none."""
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise TokenizerError(f"{config_name}: {key} must be a string, got {type(value).__name__}")
            found = backend.token_to_id(value)
            if found is None:
                raise TokenizerError(f"{config_name}: its {key} {value!r} is not a token of {path.name}")
            return found

        def generation_ids(key: str) -> list[int]:
            value = generation.get(key)
            values = value if isinstance(value, list) else [] if value is None else [value]
            for v in values:
                valid = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_VOCAB_SIZE
                if not valid or backend.id_to_token(v) is None:
                    raise TokenizerError(
                        f"{generation_name}: its {key} {value!r} is not a token id (or a list of them) of {path.name}"
                    )
            return values

        eos, eos_ids = token_id("eos_token"), generation_ids("eos_token_id")
        if eos is None and not eos_ids:
            raise TokenizerError(
                f"{path}: its tokenizer_config.json / generation_config.json lack an eos token (eos_token / "
                "eos_token_id); without it aksis cannot tell where a text or a reply ends"
            )
        if not eos_ids and eos is not None:
            eos_ids = [eos]
        gen_bos = generation_ids("bos_token_id")
        bos = gen_bos[0] if gen_bos else token_id("bos_token")
        template = _chat_template(config, config_name)
        if chat_template_file:
            template = _read_text(Path(chat_template_file))
        try:
            tokenizer = cls(
                backend,
                spec,
                name=name or path.parent.name or "hf",
                eos_ids=eos_ids,
                # The config's eos ends a document unless generation_config.json disagrees.
                eot_id=eos if eos in eos_ids else eos_ids[0],
                bos_id=bos,
                chat_template=template,
            )
        except TokenizerError as err:
            raise TokenizerError(f"{path}: {err}") from None
        tokenizer.config_data = config
        return tokenizer

    # ----- encoding -----

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (max id + 1; the model's vocab_size must be at least this)."""
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special, and of every eos (generation stops at any of them)."""
        return {*self._special.values(), *self.eos_ids}

    @property
    def specials(self) -> dict[str, int]:
        """The added tokens marked special, by their text."""
        return dict(self._special)

    def special_id(self, token: str) -> int:
        """Id of an added token such as "<|im_start|>"; only code should insert these."""
        try:
            return self._special[token]
        except KeyError:
            pass
        found = next((i for i, t in self._added.items() if t == token), None)
        if found is None:
            known = sorted(self._special, key=self._special.__getitem__)
            listed = ", ".join(known[:8]) + (f" (and {len(known) - 8} more)" if len(known) > 8 else "")
            raise TokenizerError(f"{token!r} is not a special token of {self.name}; known: {listed or 'none'}")
        return found

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, read as ordinary text: no BOS/EOS, special-token spellings stay text."""
        return self._encode_batch([text], add_special_tokens=False)[0].ids

    def encode_with_specials(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` in which special-token spellings ARE the special tokens, and each token's (start, end)
        characters: for text that code wrote (a rendered chat template), never for a user's text."""
        return self.encode_with_offsets(text, specials=True)

    def encode_with_offsets(self, text: str, *, specials: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode` (or with `specials`, `encode_with_specials`) with each token's (start, end) characters."""
        backend = self._template_backend if specials else self._backend
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of each text. The library runs a batch on its own thread pool (sized by RAYON_NUM_THREADS, off
        with TOKENIZERS_PARALLELISM=false), so `num_threads` only chooses between that (> 1) and this thread (1)."""
        if num_threads <= 1:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, specials included; bytes that are not valid UTF-8 on their own become U+FFFD."""
        ids = list(ids)
        if self._plain_byte_level:
            # From the bytes, as tiktoken does: the library's byte-level decoder also maps added tokens through the
            # byte alphabet, which garbles one such as "é!" (its characters are in that alphabet).
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        for i in ids:
            self._check_id(i)
        return self._backend.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:
            return b"".join([self._bytes[i] for i in ids])
        except KeyError:  # a token not met yet
            return b"".join([self.token_bytes(i) for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (streaming concatenates these). For a SentencePiece-style model the "▁"
        marker is a space, kept at the start of a text too (`decode` drops it there, as the model's decoder does)."""
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = self._token_bytes(token_id)
        return found

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._check_id(token_id)
        if self._byte_level:
            try:
                return bytes(CHAR_TO_BYTE[c] for c in token)
            except KeyError:
                return token.encode("utf-8")  # as the library does with a token outside the alphabet
        if self._byte_fallback and (m := _BYTE_FALLBACK.fullmatch(token)):
            return bytes([int(m.group(1), 16)])
        if self._space_marker:
            return token.replace(self._space_marker, " ").encode("utf-8")
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def _check_id(self, token_id: int) -> str:
        token = self._backend.id_to_token(token_id) if 0 <= token_id < self._vocab_size else None
        if token is None:
            raise KeyError(f"{token_id} is not a token id of {self.name} (vocab_size {self._vocab_size})")
        return token

    def save_files(self, folder: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (the one it came with, its chat template in it) into
        `folder`: what this class and transformers' AutoTokenizer read back as this tokenizer."""
        self.save(folder / "tokenizer.json")
        config = {**self.config_data, "chat_template": self.chat_template}
        if not config["chat_template"]:
            del config["chat_template"]
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if "eos_token" not in config:
            config["eos_token"] = self.decode([self.eot_id])
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def __getstate__(self) -> dict[str, Any]:
        """For pickling (datasets.map workers): without the compiled chat template kept on it, built again on use."""
        return {k: v for k, v in self.__dict__.items() if k != "_model_chat"}

    def __repr__(self) -> str:
        return f"HFTokenizer(kind={self.kind!r}, name={self.name!r}, vocab_size={self.vocab_size})"

    # ----- persistence -----

    def to_dict(self) -> dict[str, Any]:
        """The tokenizer.json as a dict (the library's format, not aksis's own)."""
        data: dict[str, Any] = json.loads(self._backend.to_str())
        return data

    def save(self, path: str | Path) -> None:
        """Write the tokenizer.json (the library's JSON, atomically). The ids and chat template come from the other
        files: save those beside it to rebuild this tokenizer."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self._backend.to_str(pretty=True), encoding="utf-8")
        os.replace(tmp, path)


# ----- aksis tokenizers as tokenizer.json -----


def to_hf_json(tokenizer: Tokenizer) -> str:
    """`tokenizer` (kinds "bpe", "byte", "tiktoken") as a tokenizers-library tokenizer.json that gives the same ids.

    A byte-level BPE: the vocab maps each token's bytes, in GPT-2's byte alphabet, to its rank; the merges are derived
    from the ranks as transformers' TikTokenConverter does (every split of a token into two tokens, ordered by the
    token's rank, then the pieces' ranks), which makes the library's lowest-merge-first equal to tiktoken's
    lowest-rank-first. The split pattern runs first (its possessive intervals written as atomic groups, which
    Oniguruma reads as tiktoken does), then ByteLevel maps text to that alphabet. No normalizer and no
    post-processor: no BOS is added."""
    encoding = tokenizer.encoding
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    specials: dict[str, int] = encoding._special_tokens

    def text(token: bytes) -> str:
        return "".join(BYTE_TO_CHAR[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], f"{text(left)} {text(right)}"))
    merges.sort()
    # The library numbers added tokens from the model's vocab size on, whatever ids the file gives them; a special
    # that is also in the vocab keeps its id there. cl100k_base's specials leave gaps (100256, 100261-100275), so
    # every special goes into the vocab too. No merge makes one, so BPE never produces it from text.
    for special, special_id in specials.items():
        if special in vocab:
            raise TokenizerError(f"the special token {special!r} of {tokenizer.name} is also an ordinary token")
        vocab[special] = special_id
    pattern = _POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", encoding._pat_str)
    if _POSSESSIVE_INTERVAL_LEFT.search(pattern):
        raise TokenizerError(f"the split pattern of {tokenizer.name} has a possessive interval aksis cannot translate")
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for token, token_id in sorted(specials.items(), key=lambda item: item[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            # "left right": the format every library version reads; the byte alphabet has no space, so it is exact.
            "merges": [merge for *_, merge in merges],
        },
    }
    return json.dumps(spec, ensure_ascii=False)


# ----- reading untrusted files -----


def _library_failure(err: BaseException) -> bool:
    """Whether `err` is the library failing: any Exception, or the PanicException (a BaseException, so that
    `except Exception` lets it through) that a Rust panic becomes."""
    return isinstance(err, Exception) or type(err).__name__ == "PanicException"


def _read_text(path: Path) -> str:
    """The UTF-8 text of `path`, refused when it is not a file or larger than MAX_FILE_BYTES."""
    if not path.is_file():
        raise TokenizerError(f"no file at {path}")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # not stat(): the file may grow in between
    except OSError as err:
        raise TokenizerError(f"cannot read {path}: {err}") from err
    if len(raw) > MAX_FILE_BYTES:
        raise TokenizerError(f"{path} is larger than a tokenizer file may be ({MAX_FILE_BYTES >> 20} MiB); refused")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{path} is not UTF-8 text ({err}); the file is corrupt or not a tokenizer file") from err


def _read_object(text: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise TokenizerError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in `node`, depth-first (iteratively: a hostile file may nest deeply)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(reversed(item.values()))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def _split_patterns(spec: dict[str, Any]) -> Iterator[Any]:
    """The regex of every "Split" pre-tokenizer (the model's vocab and merges hold none: not walked)."""
    for item in _walk([v for k, v in spec.items() if k != "model"]):
        pattern = item.get("pattern")
        if item.get("type") == "Split" and isinstance(pattern, dict) and "Regex" in pattern:
            yield pattern["Regex"]


def _space_marker(decoder: dict[str, Any]) -> str | None:
    """The character a SentencePiece-style decoder turns into a space ("▁"), if `decoder` is such a step."""
    if decoder.get("type") == "Metaspace":
        marker = decoder.get("replacement", "▁")
        return marker if isinstance(marker, str) and marker else None
    pattern = decoder.get("pattern")
    if decoder.get("type") == "Replace" and decoder.get("content") == " " and isinstance(pattern, dict):
        marker = pattern.get("String")
        return marker if isinstance(marker, str) and marker else None
    return None


def _chat_template(config: dict[str, Any], config_name: str) -> str | None:
    """tokenizer_config.json's chat template: a string, or the one named "default" in a list of named ones."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_name}: chat_template must be a string or a list of named templates")
    return template


# ----- aksis's own tokenizers in a checkpoint that transformers reads -----


def aksis_tokenizer_config(tokenizer: Tokenizer, chat_template: str, model_max_length: int) -> dict[str, Any]:
    """The tokenizer_config.json beside `to_hf_json(tokenizer)`: what transformers' AutoTokenizer needs (the class,
    the EOS, the chat template) and what aksis needs to serve it through tiktoken again (`tokenizer_from_hf`)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.decode([tokenizer.eot_id]),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
        AKSIS_MARKER: {"kind": tokenizer.kind, "name": tokenizer.name, "pattern": tokenizer.encoding._pat_str},
    }


def tokenizer_from_name(name: str) -> Tokenizer:
    """`Tokenizer.from_name`, and also a checkpoint folder (or its tokenizer.json) in transformers' layout: aksis's own
    tokenizer written there (served by tiktoken again), or a pretrained model's (an HFTokenizer)."""
    path = Path(name).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not (file.is_file() and is_hf_tokenizer_file(file)):
        return Tokenizer.from_name(name)
    config_path = file.parent / "tokenizer_config.json"
    config = _read_object(_read_text(config_path), config_path) if config_path.is_file() else {}
    if AKSIS_MARKER in config:
        return tokenizer_from_hf(file, config[AKSIS_MARKER])
    return HFTokenizer.from_folder(file.parent)
