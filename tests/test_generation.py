import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from aksis.checkpoint import find_checkpoint, load_model, save_checkpoint
from aksis.config import GenerationConfig
from aksis.generation import (
    NEW_TOKENS_LIMIT,
    GenerationError,
    _Text,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    beam_search,
    choose_next,
    compile_for_decoding,
    generate,
    generate_batch,
    sampler_config,
    stream,
    token_probabilities,
)
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=30)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


def model_for(arch: str, **overrides: object) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(arch, **{"vocab_size": 260, **overrides})).eval()  # the byte tokenizer's 260 ids


@torch.no_grad()
def uncached_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Step-by-step argmax of the full model, with generation's window rule past the context."""
    tokens, start, block = list(prompt), 0, model.config.block_size
    capacity = min(block, len(prompt) + n)
    for _ in range(n):
        logits, _ = model(torch.tensor([tokens[start:]]))
        tokens.append(int(logits[0, -1].argmax()))
        if len(tokens) - start > capacity:
            start = len(tokens) - capacity // 2
    return tokens[len(prompt) :]


def test_greedy_on_the_cache_equals_step_by_step_argmax_of_the_uncached_model(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch)
    prompt = tok.encode("To be, or not")
    out = generate(model, tok, prompt, GREEDY, stop_ids=set())
    assert out.token_ids == uncached_greedy(model, prompt, 30)
    assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


def test_generation_past_the_context_slides_the_window(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch, block_size=16)
    prompt = tok.encode("Once upon")
    config = GenerationConfig(temperature=0.0, max_new_tokens=40)
    out = generate(model, tok, prompt, config, stop_ids=set())
    assert len(out.token_ids) == 40  # 49 tokens in a context of 16
    assert out.token_ids == uncached_greedy(model, prompt, 40)


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(
    tok: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    model = model_for("gpt2", block_size=16)
    long = tok.encode("a" * 10 + "0123456789abcdef")
    with caplog.at_level(logging.WARNING, logger="aksis"):
        out = generate(model, tok, long, GenerationConfig(temperature=0.0, max_new_tokens=3), stop_ids=set())
    assert "more than the context (16): keeping its last 16" in caplog.text
    assert out.prompt_tokens == 16
    assert out.token_ids == uncached_greedy(model, long[-16:], 3)


def test_top_k_never_picks_outside_the_k_most_likely_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 300, generator=g)
    config = GenerationConfig(temperature=1.0, top_k=5, top_p=1.0)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    seen = torch.zeros(1, 300, dtype=torch.bool)
    draws = {int(choose_next(logits, seen, config, g)) for _ in range(2000)}
    assert draws <= allowed and len(draws) >= 3


def test_top_p_never_picks_outside_the_nucleus() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.03, 0.02])
    logits = probs.log()[None]
    g = torch.Generator().manual_seed(2)
    config = GenerationConfig(temperature=1.0, top_k=0, top_p=0.8)
    seen = torch.zeros(1, 6, dtype=torch.bool)
    draws = [int(choose_next(logits, seen, config, g)) for _ in range(3000)]
    assert set(draws) == {0, 1, 2}  # 0.4 + 0.3 < 0.8 <= 0.4 + 0.3 + 0.2: the nucleus is the first three
    assert abs(draws.count(0) / 3000 - 0.4 / 0.9) < 0.04  # renormalised within the nucleus
    # Whatever p, the most likely token survives, and the filter is applied per row.
    two = torch.stack([probs.log(), probs.flip(0).log()])
    kept = torch.isfinite(apply_top_p(two, 0.01))
    assert kept.sum(1).tolist() == [1, 1] and kept[0, 0] and kept[1, 5]


def test_top_k_keeps_ties_and_disabled_filters_change_nothing() -> None:
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert torch.isfinite(apply_top_k(logits, 1)).tolist() == [[True, False, True, False]]
    assert torch.equal(apply_top_k(logits, 0), logits) and torch.equal(apply_top_p(logits, 1.0), logits)


def test_repetition_penalty_lowers_the_tokens_already_seen() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_the_same_seed_gives_the_same_text(tok: Tokenizer) -> None:
    model = model_for("llama")
    config = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20, seed=7)
    a, b = (generate(model, tok, "Hello", config, stop_ids=set()) for _ in range(2))
    other = generate(model, tok, "Hello", GenerationConfig(**{**config.to_dict(), "seed": 8}), stop_ids=set())
    assert a.token_ids == b.token_ids and a.text == b.text
    assert other.token_ids != a.token_ids


def test_batched_generation_equals_one_by_one(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch)
    prompts = ["A", "Now is the winter", "Friends, Romans"]  # different lengths: left padding
    batched = generate_batch(model, tok, prompts, GREEDY, stop_ids=set())
    alone = [generate(model, tok, p, GREEDY, stop_ids=set()) for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.text for c in batched] == [c.text for c in alone]


def test_streaming_pieces_join_to_the_final_text(tok: Tokenizer) -> None:
    model = model_for("gpt2")
    config = GenerationConfig(temperature=1.0, max_new_tokens=40, seed=3)
    whole = generate(model, tok, "Hi", config)
    text_stream = stream(model, tok, "Hi", config)
    pieces = list(text_stream)
    assert text_stream.completion is not None
    assert "".join(pieces) == whole.text == text_stream.completion.text
    assert text_stream.completion.token_ids == whole.token_ids


def test_streamed_text_never_splits_a_multibyte_character(tok: Tokenizer) -> None:
    text = "héllo wörld, 日本語 🎭!"
    decoder = _Text(tok, stop=[])
    pieces = [decoder.add(i) for i in tok.encode(text)] + [decoder.finish()]  # one byte per token
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the two bytes of é come out together


def test_a_stop_string_ends_the_text_and_is_never_streamed(tok: Tokenizer) -> None:
    model = model_for("gpt2")
    free = generate(model, tok, "Hi", GREEDY, stop_ids=set())
    assert len(free.text) > 12
    stop = free.text[8:11]
    config = GenerationConfig(temperature=0.0, max_new_tokens=30, stop=[stop])
    cut = generate(model, tok, "Hi", config, stop_ids=set())
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    text_stream = stream(model, tok, "Hi", config, stop_ids=set())
    assert "".join(text_stream) == cut.text


def test_a_stop_token_ends_generation_and_is_not_printed(tok: Tokenizer) -> None:
    model = model_for("gpt2")
    free = generate(model, tok, "Hi", GREEDY, stop_ids=set())
    stop_token = free.token_ids[4]
    out = generate(model, tok, "Hi", GREEDY, stop_ids={stop_token})
    first = free.token_ids.index(stop_token)
    assert out.finish_reason == "eos" and out.token_ids == free.token_ids[: first + 1]
    assert out.text == tok.decode(free.token_ids[:first])


def test_max_time_ends_sampling_and_beam_search_with_the_time_reason(tok: Tokenizer) -> None:
    """A public Space bounds every request by time: a generation ends after the step under way, says so, and keeps
    what it wrote (a prefix of the unbounded generation)."""
    model = model_for("llama")
    free = generate(model, tok, "Hi", GREEDY, stop_ids=set())
    timed = generate(model, tok, "Hi", GenerationConfig(temperature=0.0, max_new_tokens=30, max_time=1e-9))
    assert timed.finish_reason == "time" and timed.token_ids == free.token_ids[:1]
    pieces = list(stream(model, tok, "Hi", GenerationConfig(temperature=0.0, max_new_tokens=30, max_time=1e-9)))
    assert "".join(pieces) == timed.text
    [first, second] = generate_batch(model, tok, ["Hi", "To be"], GenerationConfig(max_new_tokens=30, max_time=1e-9))
    assert first.finish_reason == second.finish_reason == "time" and len(first.token_ids) == 1
    beams = beam_search(model, tok, "Hi", GenerationConfig(num_beams=3, max_new_tokens=30, max_time=1e-9), num_return=3)
    assert [b.finish_reason for b in beams] == ["time"] * 3 and all(len(b.token_ids) == 1 for b in beams)
    assert generate(model, tok, "Hi", GenerationConfig(**{**GREEDY.to_dict(), "max_time": 60})).token_ids == (
        free.token_ids
    )  # within the time: as without it
    for bad in (0, -1, float("nan"), "60"):
        with pytest.raises(ValueError, match="max_time must be a positive number of seconds"):
            GenerationConfig(max_time=bad)  # type: ignore[arg-type]


def test_beam_width_one_equals_greedy(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch)
    [beam] = beam_search(model, tok, "To be", GenerationConfig(num_beams=1, max_new_tokens=30), stop_ids=set())
    assert beam.token_ids == generate(model, tok, "To be", GREEDY, stop_ids=set()).token_ids


@torch.no_grad()
def test_each_beam_score_is_its_recomputed_log_probability(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch)
    prompt = tok.encode("To be")
    stop_token = generate(model, tok, prompt, GREEDY, stop_ids=set()).token_ids[2]  # so some beams end early
    config = GenerationConfig(num_beams=4, max_new_tokens=12, length_penalty=0.7)
    beams = beam_search(model, tok, prompt, config, num_return=4, stop_ids={stop_token})
    assert len(beams) == 4 and {b.finish_reason for b in beams} <= {"eos", "length"}
    scores = [b.score for b in beams]
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    for beam in beams:
        full = torch.tensor([prompt + beam.token_ids])
        logprobs = model(full)[0][0, :-1].float().log_softmax(-1)
        positions = torch.arange(len(prompt) - 1, full.size(1) - 1)
        recomputed = logprobs[positions, full[0, len(prompt) :]].sum().item()
        assert beam.logprob == pytest.approx(recomputed, abs=1e-4)
        assert beam.score == pytest.approx(recomputed / len(beam.token_ids) ** 0.7, abs=1e-4)
    assert generate(model, tok, prompt, config, stop_ids={stop_token}).token_ids == beams[0].token_ids


def test_beam_search_beats_greedy_on_log_probability(tok: Tokenizer) -> None:
    model = model_for("gpt2")
    greedy = beam_search(model, tok, "Hi", GenerationConfig(num_beams=1, max_new_tokens=10), stop_ids=set())[0]
    beam = beam_search(model, tok, "Hi", GenerationConfig(num_beams=4, max_new_tokens=10), stop_ids=set())[0]
    assert beam.logprob is not None and greedy.logprob is not None
    assert beam.logprob >= greedy.logprob - 1e-5


def test_sampler_names_and_presets_map_onto_the_config() -> None:
    base = GenerationConfig(temperature=0.7, top_k=50, top_p=0.95)
    assert sampler_config("greedy", base).temperature == 0
    assert (sampler_config("temperature", base, temperature=1.2).top_k, sampler_config("temperature", base).top_p) == (
        0,
        1.0,
    )
    top_k = sampler_config("top-k", base, top_k=10)
    assert (top_k.top_k, top_k.top_p, top_k.temperature) == (10, 1.0, 0.7)
    top_p = sampler_config("top-p", base, top_p=0.8, top_k=None)
    assert (top_p.top_k, top_p.top_p) == (0, 0.8)
    assert sampler_config("beam", base).num_beams == 4 and sampler_config("beam", base, num_beams=2).num_beams == 2
    assert sampler_config("precise").temperature == 0.3 and sampler_config(None, base) == base
    with pytest.raises(GenerationError, match="unknown sampler 'nucleus': choose one of greedy, temperature"):
        sampler_config("nucleus")
    with pytest.raises(GenerationError, match="top_p must be in"):
        sampler_config("top-p", top_p=1.5)
    with pytest.raises(GenerationError, match="needs a temperature above 0"):
        sampler_config("top-k", temperature=0.0)


def test_bad_requests_are_clear_errors(tok: Tokenizer) -> None:
    model = model_for("gpt2")
    with pytest.raises(GenerationError, match="the prompt is empty"):
        generate(model, tok, "")
    with pytest.raises(GenerationError, match="the prompt is empty"):
        stream(model, tok, "")
    with pytest.raises(GenerationError, match=f"at most {NEW_TOKENS_LIMIT:,}"):
        generate(model, tok, "x", GenerationConfig(max_new_tokens=NEW_TOKENS_LIMIT + 1))
    with pytest.raises(GenerationError, match="num_return must be between 1 and the beam width \\(2\\)"):
        beam_search(model, tok, "x", GenerationConfig(num_beams=2), num_return=3)


def test_load_model_finds_the_best_checkpoint_of_a_run(tmp_path: Path, tok: Tokenizer) -> None:
    model = model_for("llama")
    save_checkpoint(model, tmp_path / "run" / "step-000002", tokenizer=tok)
    assert find_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "step-000002")
    save_checkpoint(model, tmp_path / "run" / "best", tokenizer=tok)
    loaded, tokenizer, config = load_model(tmp_path / "run", device="cpu")
    assert tokenizer.vocab_size == tok.vocab_size and config == GenerationConfig()
    assert generate(loaded, tokenizer, "Hi", GREEDY).token_ids == generate(model, tok, "Hi", GREEDY).token_ids
    assert math.isfinite(loaded.transformer.wte.weight.sum().item())
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="neither a checkpoint .* nor a training run"):
        load_model(tmp_path / "empty")


def test_ids_past_the_tokenizer_are_never_generated(tok: Tokenizer) -> None:
    model = model_for("gpt2", vocab_size=320)  # a padded embedding table: ids 260..319 have no text
    with torch.no_grad():
        model.lm_head.weight[260:] += 5.0  # make them the most likely
    config = GenerationConfig(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=50, seed=0, repetition_penalty=1.2)
    assert max(generate(model, tok, "Hi", config, stop_ids=set()).token_ids) < 260
    assert max(beam_search(model, tok, "Hi", GenerationConfig(num_beams=2, max_new_tokens=5))[0].token_ids) < 260


def test_a_compiled_model_generates_what_the_eager_one_does(tok: Tokenizer) -> None:
    model = model_for("llama")
    compiled = compile_for_decoding(model)
    config = GenerationConfig(temperature=0.0, max_new_tokens=6)
    out = generate(compiled, tok, "Hello", config, stop_ids=set())
    assert out.token_ids == generate(model, tok, "Hello", config, stop_ids=set()).token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_compiled_decoding_on_a_gpu_replays_cuda_graphs_and_generates_what_eager_does(tok: Tokenizer) -> None:
    from torch._dynamo.utils import counters

    model = model_for("gpt2").cuda()
    config = GenerationConfig(temperature=0.0, max_new_tokens=24)
    eager = generate(model, tok, "Hello", config, stop_ids=set())
    counters.clear()
    compiled = compile_for_decoding(model)  # mode="reduce-overhead" on a GPU
    for _ in range(2):  # the second generation has a new cache: graphs are re-recorded, not recompiled
        assert generate(compiled, tok, "Hello", config, stop_ids=set()).token_ids == eager.token_ids
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["stats"]["unique_graphs"] <= 2  # prefill and decode step


def test_beam_search_applies_the_repetition_penalty_as_greedy_does(tok: Tokenizer) -> None:
    model = model_for("gpt2")
    penalised = dict(max_new_tokens=20, repetition_penalty=1.8)
    [beam] = beam_search(model, tok, "To be", GenerationConfig(num_beams=1, **penalised), stop_ids=set())  # type: ignore[arg-type]
    greedy = generate(model, tok, "To be", GenerationConfig(temperature=0.0, **penalised), stop_ids=set())  # type: ignore[arg-type]
    assert beam.token_ids == greedy.token_ids
    assert (
        greedy.token_ids
        != generate(model, tok, "To be", GenerationConfig(temperature=0.0, max_new_tokens=20)).token_ids
    )


# ----- token probabilities -----


def test_token_probabilities_are_the_softmax_of_a_direct_model_call(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch)
    prompt = tok.encode("To be, or not")
    config = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12, seed=3)
    out = generate(model, tok, prompt, config, stop_ids=set())
    scores = token_probabilities(model, tok, prompt, out.token_ids, top_n=4)
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + out.token_ids]))
    probs = logits[0, len(prompt) - 1 : -1].softmax(dim=-1)  # (12, V): row i predicts token i
    assert [s.token_id for s in scores] == out.token_ids
    assert [s.text for s in scores] == [tok.decode([t]) for t in out.token_ids]
    expected = probs[torch.arange(12), torch.tensor(out.token_ids)]
    torch.testing.assert_close(torch.tensor([s.prob for s in scores]), expected)
    for score, row in zip(scores, probs, strict=True):
        top = row.topk(4)
        assert [p for _, p in score.alternatives] == pytest.approx(top.values.tolist())
        assert [t for t, _ in score.alternatives] == [tok.decode([i]) for i in top.indices.tolist()]


@torch.no_grad()
def test_past_the_context_each_token_is_scored_in_the_window_generation_used(tok: Tokenizer) -> None:
    model = model_for("llama", block_size=16)
    prompt = tok.encode("a long prompt of twenty")  # 23 tokens: generation keeps the last 16
    config = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30, seed=5)
    out = generate(model, tok, prompt, config, stop_ids=set())
    scores = token_probabilities(model, tok, prompt, out.token_ids, top_n=2)
    # Step by step as generation slides its window: full, then keep the newer half (8 tokens) and go on.
    seq, start, expected = prompt[-16:] + out.token_ids, 0, []
    for j in range(16, len(seq)):
        if j - start > 16:
            start = j - 8
        logits, _ = model(torch.tensor([seq[start:j]]))
        expected.append(logits[0, -1].softmax(dim=-1)[seq[j]].item())
    assert [s.prob for s in scores] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_greedy_tokens_are_the_most_likely_with_sorted_alternatives(arch: str, tok: Tokenizer) -> None:
    model = model_for(arch, block_size=16)
    prompt = tok.encode("Once upon")
    out = generate(model, tok, prompt, GenerationConfig(temperature=0.0, max_new_tokens=40), stop_ids=set())
    scores = token_probabilities(model, tok, prompt, out.token_ids, top_n=3)
    assert len(scores) == 40  # well past the context of 16
    for score in scores:
        probs = [p for _, p in score.alternatives]
        assert probs == sorted(probs, reverse=True) and len(probs) == 3
        assert score.alternatives[0] == (score.text, score.prob)  # the top alternative is the greedy choice


def test_token_probabilities_cover_only_the_tokenizer_ids(tok: Tokenizer) -> None:
    model = model_for("gpt2", vocab_size=320)  # a padded embedding table: ids 260..319 have no text
    with torch.no_grad():
        model.lm_head.weight[260:] += 5.0  # they would take most of the probability
    out = generate(model, tok, "Hi", GenerationConfig(temperature=0.0, max_new_tokens=5), stop_ids=set())
    scores = token_probabilities(model, tok, "Hi", out.token_ids, top_n=260)
    for score in scores:
        assert sum(p for _, p in score.alternatives) == pytest.approx(1.0, abs=1e-4)
    assert token_probabilities(model, tok, "Hi", []) == []
    with pytest.raises(GenerationError, match="not ids of the tokenizer"):
        token_probabilities(model, tok, "Hi", [300])
