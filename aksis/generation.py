"""Text generation: prefill the prompt, then decode token by token on a static KV cache.

- Samplers are small steps over the logits of the next token, applied in this order: repetition penalty,
  temperature, top-k, top-p (nucleus); temperature 0 is greedy. `GenerationConfig` holds the settings (and is
  saved with every checkpoint); `SAMPLER_PRESETS` name a few good combinations and `sampler_config` turns a sampler
  name (greedy, temperature, top-k, top-p, beam) into a config.
- Beam search keeps the `num_beams` most likely continuations, scores finished ones by their summed
  log-probability divided by length ** length_penalty, and returns the n best with their scores.
- Generation stops at a stop token (`<|endoftext|>` and the chat role tokens: no special token is ever
  printed), at a stop string (cut from the text), after `max_new_tokens`, or once it has taken `max_time`
  seconds (the step under way finishes); `Completion.finish_reason` says which ("eos", "stop", "length", "time").
- `stream` yields text pieces as they are decoded. Pieces never split a multi-byte UTF-8 character, text that
  might be the start of a stop string is held back until it is known not to be, and the pieces always join up
  to exactly `Completion.text`.
- `token_probabilities` tells, for each generated token, how likely the model found it and what else it
  considered (the app's token view).
- Several prompts of different lengths decode together, left-padded (`KVCache.set_padding`); within the
  context each row computes what it would alone (past it, all rows slide their window together, so a short
  row may lose context it would have kept alone). A `seed` makes sampling reproducible.

The context: a prompt longer than the model's context keeps its last `block_size` tokens (with a warning).
Generation may run past the context: when the cache is full, the older half of the window is dropped and
the newer half is read again in one prefill, so every new token sees between half and all of the context
(the positions restart from the window's start, exactly as the model was trained). `max_new_tokens` is
capped at `NEW_TOKENS_LIMIT` only as a guard against typos.
"""

from __future__ import annotations

import codecs
import logging
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from aksis import native
from aksis.config import GenerationConfig
from aksis.kv_cache import KVCache
from aksis.model import GPT
from aksis.quantize import pack_all
from aksis.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NEW_TOKENS_LIMIT = 100_000  # the most new tokens one generation may ask for: a guard against typos, not a budget
SAMPLERS = ("greedy", "temperature", "top-k", "top-p", "beam")
DEFAULT_BEAM_WIDTH = 4
SAMPLER_PRESETS: dict[str, dict[str, Any]] = {
    # Focused and repeatable: a low temperature over the few most likely tokens.
    "precise": dict(temperature=0.3, top_k=20, top_p=0.9, repetition_penalty=1.1),
    # The checkpoint defaults (GenerationConfig()): temperature 0.7, top-k 50, top-p 0.95.
    "balanced": dict(temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.0),
    # Varied: the model's own distribution, trimmed only of its unlikely tail.
    "creative": dict(temperature=1.0, top_k=0, top_p=0.98, repetition_penalty=1.0),
}


class GenerationError(Exception):
    """Generation could not start; the message says what to do."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # the generated tokens, the stop token included
    finish_reason: str  # "eos" (a stop token), "stop" (a stop string), "length" (max_new_tokens), "time" (max_time)
    prompt_tokens: int  # tokens of the prompt the model read (after any truncation)
    logprob: float | None = None  # beam search: summed log-probability of token_ids
    score: float | None = None  # beam search: logprob / len(token_ids) ** length_penalty


# ----- samplers: steps over the next-token logits (B, V) -----


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the text (`seen`, a (B, V) bool mask) less likely: positive logits are divided
    by `penalty`, negative ones multiplied (CTRL, Keskar et al. 2019)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included); the rest become -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the nucleus of each row: the most likely tokens whose probabilities first add up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
    drop_sorted = before >= p  # the nucleus is complete before this token (the top token always stays)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def sampling_steps(config: GenerationConfig) -> list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The logits steps `config` asks for, in order; each maps (logits, seen) to new logits."""
    steps: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
    if config.repetition_penalty != 1.0:
        steps.append(lambda logits, seen: apply_repetition_penalty(logits, seen, config.repetition_penalty))
    if config.temperature > 0:
        steps.append(lambda logits, seen: logits / config.temperature)
        steps.append(lambda logits, seen: apply_top_k(logits, config.top_k))
        steps.append(lambda logits, seen: apply_top_p(logits, config.top_p))
    return steps


def choose_next(
    logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row (B,): argmax at temperature 0, else a draw from the filtered distribution."""
    logits = logits.float()
    for step in sampling_steps(config):
        logits = step(logits, seen)
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def sampler_config(sampler: str | None, base: GenerationConfig | None = None, **settings: Any) -> GenerationConfig:
    """A config for a sampler by name, or a preset's name (precise, balanced, creative), on top of `base` (a
    checkpoint's defaults); `settings` given as None are ignored. "greedy" is temperature 0; "temperature"
    samples from the whole distribution; "top-k" and "top-p" use only their own filter; "beam" is beam search
    (`num_beams`, 4 unless given)."""
    config = base or GenerationConfig()
    given = {k: v for k, v in settings.items() if v is not None}
    if sampler is None:
        pass
    elif sampler in SAMPLER_PRESETS:
        config = replace(config, **SAMPLER_PRESETS[sampler])
    elif sampler == "greedy":
        config = replace(config, temperature=0.0, num_beams=1)
    elif sampler == "temperature":
        config = replace(config, top_k=0, top_p=1.0, num_beams=1)
    elif sampler == "top-k":
        config = replace(config, top_p=1.0, num_beams=1)
    elif sampler == "top-p":
        config = replace(config, top_k=0, num_beams=1)
    elif sampler == "beam":
        given.setdefault("num_beams", DEFAULT_BEAM_WIDTH)
    else:
        raise GenerationError(f"unknown sampler {sampler!r}: choose one of {', '.join([*SAMPLERS, *SAMPLER_PRESETS])}")
    try:
        config = replace(config, **given)
    except ValueError as err:
        raise GenerationError(str(err)) from err
    if config.temperature == 0 and sampler in ("temperature", "top-k", "top-p"):
        raise GenerationError(f"--sampler {sampler} needs a temperature above 0 (temperature 0 is greedy)")
    return config


# ----- text: incremental decoding, stop strings -----


class _Text:
    """Turns one row's tokens into text as they arrive: bytes decode incrementally (never half a character),
    and text that could begin a stop string is held back until it is known not to."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.pieces: list[str] = []
        self.stopped = False  # a stop string appeared

    def add(self, token_id: int) -> str:
        """Take one (ordinary) token; return the text that is now certain."""
        self.pending += self.decoder.decode(self.tokenizer.token_bytes(token_id))
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(self.pending[: min(hits)])
        hold = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        return self._emit(self.pending[: len(self.pending) - hold], keep=hold)

    def finish(self) -> str:
        """The rest of the text (an incomplete character at the very end becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._emit(self.pending)

    def _emit(self, text: str, keep: int = 0) -> str:
        self.pending = self.pending[len(self.pending) - keep :] if keep else ""
        if text:
            self.pieces.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.pieces)


# ----- the decoding loop -----


class _Session:
    """Prefill and decode for a batch of token-id prompts on one static KV cache; rows are left-padded to one
    length, and the window slides when the cache is full (see the module docstring).

    Everything a step needs is allocated here once: the cache, the token buffer (every filled slot) and the
    slot indices, so a decode step writes one column in place and runs the model on one token per row."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab: int) -> None:
        cfg = model.config
        self.vocab = vocab  # logits past the tokenizer's ids (a padded embedding table) are never sampled
        param = next(model.parameters())
        self.model, self.device = model, param.device
        length = max(len(p) for p in prompts)
        self.capacity = min(cfg.block_size, length + max_new_tokens)
        self.cache = KVCache(cfg, len(prompts), self.capacity, dtype=param.dtype, device=param.device)
        rows = [[0] * (length - len(p)) + list(p) for p in prompts]  # pad id 0: never attended to
        self.tokens = torch.zeros(len(prompts), self.capacity + 1, dtype=torch.long, device=self.device)
        self.tokens[:, :length] = torch.tensor(rows, dtype=torch.long)  # (B, capacity + 1): slots 0..n-1 filled
        self.n = length
        self.slots = torch.arange(self.capacity, device=self.device)  # input_pos of every slot
        self.pad = torch.tensor([length - len(p) for p in prompts], device=self.device)  # (B,)

    def prefill(self) -> torch.Tensor:
        """Read every filled slot's token into a fresh cache; the next-token logits (B, V)."""
        self.cache.set_padding(self.pad)
        logits, _ = self.model(
            self.tokens[:, : self.n], kv_cache=self.cache, input_pos=self.slots[: self.n], last_only=True
        )
        return logits[:, -1, : self.vocab]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,); the next-token logits (B, V)."""
        self.tokens[:, self.n] = tokens
        self.n += 1
        if self.n > self.capacity:  # the cache is full: keep the newer half of the window and read it again
            keep = max(self.capacity // 2, 1)
            drop = self.n - keep
            self.tokens[:, :keep] = self.tokens[:, drop : self.n].clone()
            self.n, self.pad = keep, (self.pad - drop).clamp(min=0)
            return self.prefill()
        slot = self.slots[self.n - 1 : self.n]
        logits, _ = self.model(self.tokens[:, self.n - 1 : self.n], kv_cache=self.cache, input_pos=slot, last_only=True)
        return logits[:, -1, : self.vocab]

    def reorder(self, rows: torch.Tensor) -> None:
        self.tokens, self.pad = self.tokens[rows], self.pad[rows]
        self.cache.reorder(rows)


def _prompt_ids(model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if ids and isinstance(prompt, str) and tokenizer.add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]  # as the model's own tokenizer begins a text
    if not ids:
        raise GenerationError("the prompt is empty: give some text for the model to continue")
    limit = model.config.block_size
    if len(ids) > limit:
        log.warning("the prompt has %d tokens, more than the context (%d): keeping its last %d", len(ids), limit, limit)
        ids = ids[-limit:]
    return ids


def _check(config: GenerationConfig) -> None:
    if config.max_new_tokens > NEW_TOKENS_LIMIT:
        raise GenerationError(f"max_new_tokens must be at most {NEW_TOKENS_LIMIT:,}, got {config.max_new_tokens:,}")


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@torch.inference_mode()
def _sample(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig,
    stop_ids: set[int] | None,
) -> Generator[tuple[int, str], None, list[Completion]]:
    """Decode all prompts together; yield (row, new text) as text becomes certain. Returns the completions."""
    _check(config)
    ids = [_prompt_ids(model, tokenizer, p) for p in prompts]
    stop_ids = tokenizer.special_ids if stop_ids is None else stop_ids
    session = _Session(model, ids, config.max_new_tokens, tokenizer.vocab_size)
    generator = _generator(config.seed, session.device)
    B, V = len(ids), tokenizer.vocab_size
    seen = torch.zeros(B, V, dtype=torch.bool, device=session.device)
    if config.repetition_penalty != 1.0:
        for row, p in enumerate(ids):
            seen[row, p] = True
    texts = [_Text(tokenizer, config.stop) for _ in ids]
    generated: list[list[int]] = [[] for _ in ids]
    reasons: list[str | None] = [None] * B
    logits = session.prefill()
    out_of_time = _clock(config)
    for i in range(config.max_new_tokens):
        tokens = choose_next(logits, seen, config, generator)  # (B,)
        if config.repetition_penalty != 1.0:
            seen[torch.arange(B), tokens] = True
        for row, token in enumerate(tokens.tolist()):
            if reasons[row] is not None:
                continue  # a finished row keeps decoding with the others; its tokens are ignored
            generated[row].append(token)
            if token in stop_ids:
                reasons[row] = "eos"
            else:
                piece = texts[row].add(token)
                if texts[row].stopped:
                    reasons[row] = "stop"
                if piece:
                    yield row, piece
        if all(r is not None for r in reasons) or i == config.max_new_tokens - 1:
            break
        if out_of_time():
            reasons = [r or "time" for r in reasons]
            break
        logits = session.step(tokens)
    for row, text in enumerate(texts):
        piece = text.finish()
        if piece:
            yield row, piece
    return [
        Completion(text.text, generated[row], reasons[row] or "length", len(ids[row])) for row, text in enumerate(texts)
    ]


def _clock(config: GenerationConfig) -> Callable[[], bool]:
    """A function that says whether `config.max_time` has passed since now (never, without one)."""
    if config.max_time is None:
        return lambda: False
    deadline = time.monotonic() + config.max_time
    return lambda: time.monotonic() >= deadline


def _drain(gen: Iterator[Any]) -> Any:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    stop_ids: set[int] | None = None,
) -> Completion:
    """Continue one prompt (text, or token ids); beam search when `config.num_beams` > 1 (the best beam)."""
    config = config or GenerationConfig()
    if config.num_beams > 1:
        return beam_search(model, tokenizer, prompt, config, stop_ids=stop_ids)[0]
    completions: list[Completion] = _drain(_sample(model, tokenizer, [prompt], config, stop_ids))
    return completions[0]


def generate_batch(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    stop_ids: set[int] | None = None,
) -> list[Completion]:
    """Continue several prompts together (they may differ in length); one completion each, in order."""
    config = config or GenerationConfig()
    if not prompts:
        return []
    if config.num_beams > 1:  # beam search already fills the batch with one prompt's beams
        return [beam_search(model, tokenizer, p, config, stop_ids=stop_ids)[0] for p in prompts]
    completions: list[Completion] = _drain(_sample(model, tokenizer, prompts, config, stop_ids))
    return completions


class TextStream:
    """Iterate to get the text of one generation piece by piece; `completion` is set when the iteration ends."""

    def __init__(self, pieces: Iterator[tuple[int, str]] | Callable[[], Completion]) -> None:
        self._pieces = pieces
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        if callable(self._pieces):  # beam search: the text is known only at the end
            self.completion = self._pieces()
            if self.completion.text:
                yield self.completion.text
            return
        while True:
            try:
                _, piece = next(self._pieces)
            except StopIteration as done:
                self.completion = done.value[0]
                return
            yield piece


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    stop_ids: set[int] | None = None,
) -> TextStream:
    """Like `generate`, as a stream of text pieces (beam search yields its whole text at the end)."""
    config = config or GenerationConfig()
    if config.num_beams > 1:
        return TextStream(lambda: beam_search(model, tokenizer, prompt, config, stop_ids=stop_ids)[0])
    _check(config)
    ids = _prompt_ids(model, tokenizer, prompt)  # bad prompts fail here, not at the first iteration
    return TextStream(_sample(model, tokenizer, [ids], config, stop_ids))


# ----- beam search -----


@torch.inference_mode()
def beam_search(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    num_return: int = 1,
    stop_ids: set[int] | None = None,
) -> list[Completion]:
    """The `num_return` best continuations of `prompt` found by a beam search of width `config.num_beams`,
    best first. A hypothesis ends at a stop token (which counts in its score), a stop string, or
    `max_new_tokens`; it is scored by logprob / length ** length_penalty. The search ends when no live beam
    can beat the worst of `num_beams` finished hypotheses at its current length, as in Hugging Face's default."""
    config = config or GenerationConfig()
    _check(config)
    width, lp = config.num_beams, config.length_penalty
    if not 1 <= num_return <= width:
        raise GenerationError(f"num_return must be between 1 and the beam width ({width}), got {num_return}")
    ids = _prompt_ids(model, tokenizer, prompt)
    stop_ids = tokenizer.special_ids if stop_ids is None else stop_ids
    session = _Session(model, [ids] * width, config.max_new_tokens, tokenizer.vocab_size)
    scores = torch.full((width,), -math.inf, device=session.device)
    scores[0] = 0.0  # the beams start identical: only one of them may expand at first
    beams: list[list[int]] = [[] for _ in range(width)]
    finished: list[tuple[float, float, list[int], str]] = []  # (score, logprob, tokens, reason)

    def finish(logprob: float, tokens: list[int], reason: str) -> None:
        finished.append((logprob / len(tokens) ** lp, logprob, tokens, reason))
        finished.sort(key=lambda f: -f[0])
        del finished[width:]

    penalty = config.repetition_penalty
    seen = torch.zeros(width, tokenizer.vocab_size, dtype=torch.bool, device=session.device)
    seen[:, ids] = True
    logits = session.prefill()
    out_of_time = _clock(config)
    ended: str | None = None  # "length" or "time" when the search runs out of tokens or of time
    for step in range(config.max_new_tokens):
        logits = logits.float()
        if penalty != 1.0:  # the scores are then log-probabilities of the penalised distribution
            logits = apply_repetition_penalty(logits, seen, penalty)
        candidates = (scores[:, None] + logits.log_softmax(dim=-1)).view(-1)  # (width * V,)
        top = torch.topk(candidates, min(2 * width, candidates.numel()))
        parents, next_tokens_list, new_scores = [], [], []
        for rank, (logprob, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            if logprob == -math.inf:
                break
            parent, token = divmod(flat, logits.size(-1))
            tokens = beams[parent] + [token]
            if token in stop_ids:
                if rank < width:  # a stop ranked below the beam width would not have been kept as a beam
                    finish(logprob, tokens, "eos")
                continue
            if config.stop and _stops(tokenizer, tokens, config.stop):
                finish(logprob, tokens, "stop")
                continue
            parents.append(parent)
            next_tokens_list.append(token)
            new_scores.append(logprob)
            if len(parents) == width:
                break
        if not parents:
            break
        while len(parents) < width:  # fewer live candidates than beams: fill with dead copies
            parents.append(parents[0])
            next_tokens_list.append(next_tokens_list[0])
            new_scores.append(-math.inf)
        rows = torch.tensor(parents, device=session.device)
        beams = [beams[p] + [t] for p, t in zip(parents, next_tokens_list, strict=True)]
        scores = torch.tensor(new_scores, device=session.device)
        session.reorder(rows)
        seen = seen[rows]
        seen[torch.arange(width), torch.tensor(next_tokens_list, device=session.device)] = True
        best_live = scores.max().item() / (step + 1) ** lp
        if len(finished) == width and finished[-1][0] >= best_live:
            break
        if step < config.max_new_tokens - 1:
            if out_of_time():
                ended = "time"
                break
            logits = session.step(torch.tensor(next_tokens_list, device=session.device))
    else:
        ended = "length"
    if ended is not None:  # out of tokens or of time: the live beams compete with the finished ones
        for logprob, tokens in zip(scores.tolist(), beams, strict=True):
            if logprob > -math.inf:
                finish(logprob, tokens, ended)
    completions = []
    for score, logprob, tokens, reason in finished[:num_return]:
        text = _Text(tokenizer, config.stop)
        for t in tokens:
            if t not in stop_ids:
                text.add(t)
        text.finish()
        completions.append(Completion(text.text, tokens, reason, len(ids), logprob=logprob, score=score))
    return completions


def _stops(tokenizer: Tokenizer, tokens: list[int], stop: list[str]) -> bool:
    text = _Text(tokenizer, stop)
    for t in tokens:
        text.add(t)
    return text.stopped


# ----- token probabilities (the app's token view) -----


@dataclass
class TokenProb:
    """One generated token and what the model thought of it (see `token_probabilities`)."""

    token_id: int
    text: str  # the token on its own (a byte that is only part of a character shows as U+FFFD)
    prob: float
    alternatives: list[tuple[str, float]]  # the most likely tokens at its place (text, probability), best first


@torch.inference_mode()
def token_probabilities(
    model: GPT, tokenizer: Tokenizer, prompt: str | Sequence[int], token_ids: Sequence[int], top_n: int = 5
) -> list[TokenProb]:
    """For each of `token_ids` (a completion of `prompt`, e.g. `Completion.token_ids`), its probability and the
    `top_n` most likely tokens at its place.

    Probabilities are the softmax of the model's raw logits at temperature 1 (over the tokenizer's ids): what
    the model itself predicts, before repetition penalty, temperature, top-k or top-p reshape it. So a greedy
    token (without repetition penalty) is always the most likely one, and a sampled token may be unlikely here.

    Each token is scored in the context generation gave it: the prompt keeps its last `block_size` tokens, and
    past the context the window slides as in `generate` (when it is full, the newer half is kept and read
    again). Within the context this is one forward pass over prompt + completion; past it, one pass per window.
    """
    if top_n < 0:
        raise GenerationError(f"top_n must be 0 or more, got {top_n}")
    vocab = tokenizer.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"token ids {bad[:5]} are not ids of the tokenizer (0 to {vocab - 1})")
    ids = _prompt_ids(model, tokenizer, prompt)
    seq, P = ids + list(token_ids), len(ids)
    device = next(model.parameters()).device
    block = model.config.block_size
    # starts[i]: where the window begins when token P + i is chosen; it is predicted from seq[start : P + i].
    # When every token fits in the context no window ever slides, whatever max_new_tokens was, and when they do
    # not, generation's cache held exactly block_size tokens, so block_size is the capacity to mirror.
    starts, start = [], 0
    for j in range(P, len(seq)):
        if j - start > block:
            start = j - max(block // 2, 1)
        starts.append(start)
    scores: list[TokenProb] = []
    i = 0
    while i < len(starts):
        end = i
        while end < len(starts) and starts[end] == starts[i]:
            end += 1
        start = starts[i]
        # Tokens P+i .. P+end-1 share this window; the logits at position j - 1 predict token j.
        window = torch.tensor([seq[start : P + end - 1]], device=device)  # (1, T), T <= block_size
        logits, _ = model(window)
        probs = logits[0, P + i - 1 - start :, :vocab].float().softmax(dim=-1)  # (end - i, V)
        chosen = torch.tensor(seq[P + i : P + end], device=device)
        chosen_probs = probs[torch.arange(end - i, device=device), chosen].tolist()
        top = torch.topk(probs, min(top_n, vocab), dim=-1)
        for token, prob, top_probs, top_ids in zip(
            chosen.tolist(), chosen_probs, top.values.tolist(), top.indices.tolist(), strict=True
        ):
            alternatives = [(tokenizer.decode([t]), p) for t, p in zip(top_ids, top_probs, strict=True)]
            scores.append(TokenProb(token, tokenizer.decode([token]), prob, alternatives))
        i = end
    return scores


def compile_for_decoding(model: GPT) -> GPT:
    """The model compiled for generation.

    - On a GPU: `torch.compile` replaying CUDA graphs (mode "reduce-overhead"). A decode step is one token per row,
      so launching its kernels one by one would take longer than running them, and the static KV cache keeps every
      shape and address fixed, as graphs need.
    - On a CPU with aksis's kernels (aksis.native): its one-token decode steps compiled ahead of time by AOTInductor
      (`aksis.aot.CompiledDecoder`), each one C++ call with neither Dynamo nor Python around it; prefill runs eager.
    - On other CPUs: `torch.compile` run by generated C++ (inductor's `cpp_wrapper`) instead of Python, which cuts
      the cost of launching each of a step's many small kernels. (PyTorch's int4 kernel, which those CPUs use, makes
      inductor add constants of its own to a library, which `aksis.aot` cannot hand it.)
    """
    device = next(model.parameters()).device.type
    on_cpu_with_kernels = device == "cpu" and native.available()  # settled before tracing, which reads it
    pack_all(model)  # with PyTorch's kernels, quantized layers' packed weights made before compiling (aksis.quantize)
    if device == "cuda":
        return torch.compile(model, mode="reduce-overhead")  # type: ignore[return-value]
    if on_cpu_with_kernels:
        from aksis.aot import CompiledDecoder

        return CompiledDecoder(model)  # type: ignore[return-value]
    return torch.compile(model, options={"cpp_wrapper": True})  # type: ignore[return-value]


# ----- timing (aksis benchmark-inference) -----


@dataclass
class DecodeTiming:
    ttft_s: float  # time to first token: prefill plus choosing the first new token
    total_s: float  # the whole generation
    batch_size: int
    new_tokens: int  # per row

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens / self.total_s

    @property
    def ms_per_token(self) -> float:
        """Decode time per step after the first token (every row advances one token per step)."""
        return 1000 * (self.total_s - self.ttft_s) / max(self.new_tokens - 1, 1)


@torch.inference_mode()
def time_decoding(
    model: GPT, prompt: Sequence[int], *, batch_size: int = 1, max_new_tokens: int = 128, use_cache: bool = True
) -> DecodeTiming:
    """Time greedy decoding of exactly `max_new_tokens` per row (no stop rules), with the KV cache, or without
    it (every step runs the model over the whole window again, as before caches). Only the final token choice
    synchronises with the GPU, so the timing includes no per-token host round trip."""
    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    prompts = [list(prompt)[-model.config.block_size :]] * batch_size
    sync()
    start = time.perf_counter()
    if use_cache:
        session = _Session(model, prompts, max_new_tokens, model.config.vocab_size)
        tokens = session.prefill().argmax(dim=-1)
        sync()
        ttft = time.perf_counter() - start
        for _ in range(max_new_tokens - 1):
            tokens = session.step(tokens).argmax(dim=-1)
    else:
        seq = torch.tensor(prompts, device=device)
        for i in range(max_new_tokens):
            logits, _ = model(seq[:, -model.config.block_size :])
            seq = torch.cat([seq, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
            if i == 0:
                sync()
                ttft = time.perf_counter() - start
    sync()
    return DecodeTiming(ttft, time.perf_counter() - start, batch_size, max_new_tokens)
