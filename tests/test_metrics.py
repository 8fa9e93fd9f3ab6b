import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from aksis.config import GenerationConfig, TrainConfig
from aksis.metrics import (
    OutOfTime,
    continuation_pairs,
    evaluate_checkpoint,
    markdown_table,
    perplexity,
    read_prompts,
    save_results,
    score_generations,
)
from aksis.model import GPT
from aksis.tokenizer import Tokenizer

BYTES = Tokenizer.byte_level()
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def uniform_model(vocab: int) -> GPT:
    """A model whose logits are all zero: every token has probability 1 / vocab."""
    model = GPT(tiny_config("gpt2", vocab_size=vocab, tie_embeddings=False, block_size=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_all_zero_logits_give_a_perplexity_of_the_vocabulary_size() -> None:
    result = perplexity(uniform_model(BYTES.vocab_size), BYTES, [TEXT, "é日本"], stride=5)
    assert result.perplexity == pytest.approx(BYTES.vocab_size, rel=1e-5)
    assert result.nll == pytest.approx(math.log(BYTES.vocab_size), rel=1e-6)
    # Every byte is a token, each costing log2(260) bits: bits per byte is the same, multibyte characters too.
    assert result.tokens == result.bytes == len(TEXT.encode()) + len("é日本".encode())
    assert result.bits_per_byte == pytest.approx(math.log2(BYTES.vocab_size), rel=1e-6)


def test_bits_per_byte_does_not_depend_on_how_tokens_cut_the_bytes() -> None:
    bpe = Tokenizer.train([TEXT] * 20, vocab_size=300)
    result = perplexity(uniform_model(300), bpe, [TEXT])
    tokens, n_bytes = len(bpe.encode(TEXT)), len(TEXT.encode())
    assert result.tokens == tokens < n_bytes  # merges: fewer tokens than bytes
    assert result.bits_per_byte == pytest.approx(tokens * math.log2(300) / n_bytes, rel=1e-6)


@torch.no_grad()
def test_the_sliding_window_equals_a_direct_token_by_token_computation(arch: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(arch, vocab_size=BYTES.vocab_size, block_size=16)).eval()
    ids = [BYTES.eot_id, *BYTES.encode(TEXT[:40])]
    direct = []
    for t in range(1, len(ids)):  # each token from up to 16 tokens before it
        logits, _ = model(torch.tensor([ids[max(0, t - 16) : t]]))
        direct.append(-logits[0, -1].float().log_softmax(-1)[ids[t]].item())
    assert perplexity(model, BYTES, [TEXT[:40]], stride=1).nll == pytest.approx(sum(direct) / len(direct), abs=1e-5)
    # Half-context strides see less context on some tokens, but every token is scored exactly once.
    half = perplexity(model, BYTES, [TEXT[:40]], batch_size=2)
    assert half.tokens == len(direct) and abs(half.nll - sum(direct) / len(direct)) < 0.5
    # A text within the context is one window, whatever the stride.
    short = [perplexity(model, BYTES, [TEXT[:12]], stride=s).nll for s in (1, 8, 16)]
    assert short[0] == pytest.approx(short[1], abs=1e-6) == pytest.approx(short[2], abs=1e-6)


def test_bad_perplexity_input_is_a_clear_error() -> None:
    model = uniform_model(BYTES.vocab_size)
    with pytest.raises(ValueError, match="no text to score"):
        perplexity(model, BYTES, ["", ""])
    with pytest.raises(ValueError, match="stride must be between 1 and the context \\(16\\)"):
        perplexity(model, BYTES, [TEXT], stride=17)


def test_continuation_pairs_are_spread_over_the_texts() -> None:
    texts = ["a" * 100, "b" * 30, "c" * 100]
    pairs = continuation_pairs(BYTES, texts, prompt_tokens=10, new_tokens=5, num_samples=6)
    assert len(pairs) == 6 and {BYTES.decode(p)[0] for p, _ in pairs} == {"a", "b", "c"}
    assert all(len(p) == 10 and len(r) == 5 for p, r in pairs)
    with pytest.raises(ValueError, match="no text holds 150 tokens"):
        continuation_pairs(BYTES, texts, prompt_tokens=100, new_tokens=50)


def test_prompts_files_are_read_with_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "To be", "reference": " or not"}\n\n{"prompt": "a", "reference": "b"}\n')
    assert read_prompts(good) == [("To be", " or not"), ("a", "b")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match='bad.jsonl, line 1: expected {"prompt"'):
        read_prompts(bad)
    with pytest.raises(ValueError, match="cannot read the prompts file"):
        read_prompts(tmp_path / "missing.jsonl")
    nested = tmp_path / "nested.jsonl"  # a line nested deeper than Python's JSON parser recurses
    nested.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "reference": "b"}\n')
    with pytest.raises(ValueError, match="nested.jsonl, line 1: expected .* \\(RecursionError\\)"):
        read_prompts(nested)
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"prompt": {"a": 1}, "reference": "b"}\n')
    with pytest.raises(ValueError, match="typed.jsonl, line 1: expected .*, with text for both"):
        read_prompts(typed)


def test_a_report_with_every_task_and_a_comparison_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config("llama", vocab_size=BYTES.vocab_size)).eval()
    prompts = [("To be", " or not to be"), ("Friends,", " Romans")]
    results = evaluate_checkpoint(
        model,
        BYTES,
        [TEXT * 3],
        tasks=("perplexity", "continuation", "prompts"),
        prompts=prompts,
        config=GenerationConfig(temperature=0.0),
        prompt_tokens=16,
        new_tokens=8,
        num_samples=4,
    )
    metrics = results["metrics"]
    for name in (
        "perplexity",
        "bits_per_byte",
        "bytes_scored",
        "continuation_bleu",
        "continuation_rougeL",
        "prompts_rouge1",
    ):
        assert name in metrics and math.isfinite(metrics[name]), name
    assert "continuation_distinct_2" in metrics and len(results["samples"]["prompts"]) == 2
    table = markdown_table({"a": metrics, "b": {"perplexity": 12.5}})
    assert table.splitlines()[0] == "| metric | a | b |" and "| perplexity | " in table and "| 12.5 |" in table
    path = save_results(tmp_path, results, dataset="shakespeare", split="validation", settings={"stride": 8})
    saved = json.loads(path.read_text())
    assert saved["metrics"] == metrics and saved["dataset"] == "shakespeare"
    with pytest.raises(ValueError, match="needs \\(prompt, reference\\) pairs"):
        evaluate_checkpoint(model, BYTES, [TEXT], tasks=("prompts",))
    with pytest.raises(ValueError, match="unknown task\\(s\\) bleu"):
        evaluate_checkpoint(model, BYTES, [TEXT], tasks=("bleu",))


def test_scoring_past_its_deadline_stops_with_a_clear_error() -> None:
    """A public Space bounds each request by time: scoring checks the deadline between batches, and a generation
    batch stops at it (its texts are not scored: a cut batch would score unfairly)."""
    torch.manual_seed(0)
    model = GPT(tiny_config("llama", vocab_size=BYTES.vocab_size)).eval()
    past = time.monotonic()
    with pytest.raises(OutOfTime, match="scoring the perplexity ran out of the time it was given"):
        perplexity(model, BYTES, [TEXT], deadline=past)
    with pytest.raises(OutOfTime, match="generating for BLEU / ROUGE ran out of the time"):
        evaluate_checkpoint(model, BYTES, [TEXT * 3], tasks=("continuation",), num_samples=2, deadline=past)
    # Greedy: this model then writes 256 tokens. Sampled, one generation in seven stopped at a special token within its
    # first 12, which fast decoding could reach inside the millisecond a batch is given, and the test failed.
    greedy = GenerationConfig(temperature=0.0)
    with pytest.raises(OutOfTime, match="generating for BLEU / ROUGE ran out of the time"):
        score_generations(model, BYTES, [("To be", " or not")], greedy, deadline=time.monotonic() + 1e-4)
    later = time.monotonic() + 600
    assert perplexity(model, BYTES, [TEXT], deadline=later) == perplexity(model, BYTES, [TEXT])


def test_a_trained_model_is_less_perplexed_by_held_out_shakespeare(tmp_path: Path) -> None:
    from aksis.checkpoint import load_model
    from aksis.corpora import load_corpus
    from aksis.trainer import train

    config = TrainConfig(
        tokenizer="byte", preset="tiny", block_size=64, batch_size=8, max_steps=60, learning_rate=3e-3,
        eval_every=60, eval_batches=2, device="cpu", progress=False, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    train(config)
    trained, tokenizer, _ = load_model(tmp_path / "run", device="cpu")
    untrained = GPT(trained.config).eval()
    held_out = [text[:3000] for text in load_corpus("shakespeare")["validation"]["text"][:3]]
    after = perplexity(trained, tokenizer, held_out).perplexity
    before = perplexity(untrained, tokenizer, held_out).perplexity
    assert after < 0.5 * before
