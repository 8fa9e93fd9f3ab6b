import subprocess
import sys
from pathlib import Path

import pytest

from aksis.checkpoint import save_checkpoint
from aksis.cli import main
from aksis.tokenizer import Tokenizer


def test_tokenize_prints_tokens_ids_and_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--text", "Hi <|user|>", "--tokenizer", "byte"]) == 0
    out = capsys.readouterr().out
    ids = Tokenizer.byte_level().encode("Hi <|user|>")
    assert f"ids: {ids}" in out
    assert "count: 11" in out
    assert "tokens: ['H', 'i', ' ', '<', '|'" in out


def test_tokenize_a_file_with_a_saved_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Tokenizer.byte_level().save(tmp_path / "tokenizer.json")
    (tmp_path / "in.txt").write_text("é", encoding="utf-8")
    assert main(["tokenize", "--file", str(tmp_path / "in.txt"), "--tokenizer", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ids: [195, 169]" in out and "count: 2" in out


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--text", "x", "--tokenizer", "no-such-tokenizer"]) == 2
    assert "unknown tokenizer 'no-such-tokenizer'" in capsys.readouterr().err
    assert main(["tokenize", "--file", str(tmp_path / "absent.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_text("[1, 2]")
    assert main(["tokenize", "--text", "x", "--tokenizer", str(tmp_path / "tokenizer.json")]) == 2
    assert "tokenizer data must be a JSON object, got list" in capsys.readouterr().err


def test_help_runs_as_a_module_and_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aksis.cli", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    assert "tokenize" in result.stdout


def test_train_model_has_a_flag_with_help_for_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from aksis.config import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["train-model", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--learning-rate LEARNING_RATE peak learning rate (default: 0.0006)" in text


def test_train_model_bad_settings_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train-model", "--batch-size", "0", "--output-dir", str(tmp_path)]) == 2
    assert "batch_size must be at least 1" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    assert main(["train-model", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown TrainConfig field(s): epochz" in capsys.readouterr().err
    assert main(["train-model", "--learning-rate", "nan", "--output-dir", str(tmp_path)]) == 2
    assert "must be finite numbers: learning_rate nan" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]  # nothing written


# ----- inference commands -----

AKSIS = [sys.executable, "-m", "aksis.cli"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with the byte tokenizer, saved the way the trainer saves a run (run/best/)."""
    import torch
    from conftest import tiny_config

    from aksis.model import GPT

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(GPT(tiny_config("llama", vocab_size=260)), run / "best", tokenizer=Tokenizer.byte_level())
    return run


def run_cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AKSIS, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_generate_text_streams_as_a_subprocess(checkpoint: Path) -> None:
    args = ["generate-text", "--checkpoint-path", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "12"]
    streamed = run_cli(*args, "--sampler", "top-p", "--seed", "1", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.startswith("ROMEO:") and "tokens/s), ended by" in streamed.stderr
    again = run_cli(*args, "--sampler", "top-p", "--seed", "1")
    assert again.stdout == streamed.stdout  # same seed, same text, streamed or not


@pytest.mark.parametrize(
    "sampler",
    [
        ["--sampler", "greedy"],
        ["--sampler", "temperature", "--temperature", "1.2"],
        ["--sampler", "top-k", "--top-k", "5"],
        ["--sampler", "top-p", "--top-p", "0.9"],
        ["--sampler", "beam", "--beam-width", "3", "--num-return", "2"],
        ["--sampler", "creative", "--repetition-penalty", "1.3"],
        [],
    ],
    ids=lambda a: a[1] if a else "checkpoint-defaults",
)
def test_generate_text_with_each_sampler(
    checkpoint: Path, sampler: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate-text", "--checkpoint-path", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "8"]
    assert main([*args, *sampler, "--seed", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "ended by" in out.err
    if "beam" in sampler:
        assert out.out.count("--- beam") == 2 and out.out.count("\nTo be") == 2 and "log-probability" in out.out
    else:
        assert out.out.startswith("To be")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", "x", "--max-new-tokens", "-5"], "max_new_tokens must be at least 1, got -5"),
        (["--prompt", "x", "--max-new-tokens", "10000000"], "max_new_tokens must be at most 100,000"),
        (["--prompt", "x", "--sampler", "nucleus"], "invalid choice: 'nucleus'"),
        (["--prompt", "x", "--sampler", "top-k", "--temperature", "0"], "needs a temperature above 0"),
        (["--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "x", "--beam-width", "3"], "--beam-width applies to --sampler beam"),
        (["--prompt", "x", "--num-return", "2"], "--num-return applies to beam search"),
        (["--prompt", "x", "--sampler", "beam", "--num-return", "9"], "between 1 and the beam width (4)"),
        # values that used to end in a traceback, or (nan) to sample silently at temperature 1
        (["--prompt", "x", "--temperature", "1e-300"], "temperature must be 0 (greedy) or at least 0.001"),
        (["--prompt", "x", "--temperature", "nan"], "temperature must be a finite number, got nan"),
        (["--prompt", "x", "--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
        (["--prompt", "x", "--seed", "18446744073709551616"], "seed must be a whole number from 0 to"),
        (["--prompt", "x", "--sampler", "beam", "--beam-width", "100000"], "num_beams must be between 1 and 64"),
        (["--prompt", "x", "--max-time", "-1"], "max_time must be a positive number of seconds"),
    ],
)
def test_generate_text_bad_input_exits_2_with_a_clear_message(
    checkpoint: Path, args: list[str], message: str, tmp_path: Path
) -> None:
    result = run_cli("generate-text", "--checkpoint-path", str(checkpoint), *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_max_time_ends_a_generation_and_says_so(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate-text", "--checkpoint-path", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "64"]
    assert main([*args, "--sampler", "greedy", "--max-time", "1e-9", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("[1 tokens in") and err.rstrip().endswith("ended by time]")


def test_a_missing_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    result = run_cli(
        "chat-with-model",
        "--checkpoint-path",
        "./no-such-run",
        "--context-file",
        "chat.json",
        stdin="hi\n",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "no checkpoint folder at ./no-such-run: check the path" in result.stderr
    result = run_cli("generate-text", "--checkpoint-path", "./no-such-run", "--prompt", "hi", cwd=tmp_path)
    assert result.returncode == 2 and "no checkpoint folder at ./no-such-run" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_chat_loop_streams_replies_and_keeps_the_context_file(checkpoint: Path, tmp_path: Path) -> None:
    from aksis.chat import Conversation

    chat_file = tmp_path / "chat.json"
    args = ["chat-with-model", "--checkpoint-path", str(checkpoint), "--context-file", str(chat_file)]
    first = run_cli(*args, "--system-prompt", "Speak in verse.", "--max-new-tokens", "6", stdin="Hello\nHow are you?\n")
    assert first.returncode == 0, first.stderr  # stdin ended: Ctrl-D
    assert first.stdout.count("model> ") == 2 and f"conversation saved to {chat_file}" in first.stderr
    saved = Conversation.load(chat_file)
    assert saved.system_prompt == "Speak in verse."
    assert [m.role for m in saved.messages] == ["user", "assistant", "user", "assistant"]
    assert saved.messages[2].content == "How are you?"

    # The context file is read back; /save writes a copy, /reset clears, /quit leaves.
    second = run_cli(
        *args,
        "--max-new-tokens",
        "4",
        stdin=f"Again\n/save {tmp_path}\n/save {tmp_path / 'copy.json'}\n/nope\n/reset\n/quit\n",
    )
    assert second.returncode == 0, second.stderr
    assert "4 messages from" in second.stderr and "unknown command /nope" in second.stdout
    assert "cannot save the conversation to" in second.stderr  # a folder: the chat goes on
    assert len(Conversation.load(tmp_path / "copy.json").messages) == 6
    cleared = Conversation.load(chat_file)
    assert cleared.messages == [] and cleared.system_prompt == "Speak in verse."


def test_generate_text_and_chat_compiled_say_what_eager_says(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate-text", "--checkpoint-path", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "8"]
    for sampler in (["--sampler", "greedy"], ["--sampler", "beam", "--num-return", "2"]):
        assert main([*args, *sampler, "--device", "cpu"]) == 0
        eager = capsys.readouterr().out
        assert main([*args, *sampler, "--device", "cpu", "--compile"]) == 0
        assert capsys.readouterr().out == eager
    chat = ["chat-with-model", "--checkpoint-path", str(checkpoint), "--sampler", "greedy", "--max-new-tokens", "6"]
    replies = [run_cli(*chat, *extra, stdin="Hello\nHow are you?\n") for extra in ([], ["--compile"])]
    assert all(r.returncode == 0 for r in replies), replies[1].stderr
    assert replies[0].stdout == replies[1].stdout and replies[0].stdout.count("model> ") == 2


def test_chat_refuses_a_context_file_it_could_not_write(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    args = [
        "chat-with-model",
        "--checkpoint-path",
        str(checkpoint),
        "--context-file",
        str(tmp_path / "file" / "c.json"),
    ]
    result = run_cli(*args, stdin="hi\n")
    assert result.returncode == 2 and "cannot write the context file" in result.stderr


def test_chat_refuses_a_malformed_context_file_and_leaves_it_alone(checkpoint: Path, tmp_path: Path) -> None:
    chat_file = tmp_path / "chat.json"
    chat_file.write_text('{"format": "aksis-chat", "version": 1, "messages": [{"role": "robot"}]}')
    before = chat_file.read_bytes()
    result = run_cli(
        "chat-with-model", "--checkpoint-path", str(checkpoint), "--context-file", str(chat_file), stdin="hi\n"
    )
    assert result.returncode == 2 and "message 0 must be" in result.stderr and "left untouched" in result.stderr
    assert chat_file.read_bytes() == before


def test_chat_ctrl_c_leaves_cleanly_with_the_context_saved(checkpoint: Path, tmp_path: Path) -> None:
    import signal
    import time

    from aksis.chat import Conversation

    chat_file = tmp_path / "chat.json"
    proc = subprocess.Popen(
        [*AKSIS, "chat-with-model", "--checkpoint-path", str(checkpoint), "--context-file", str(chat_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("Hello\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while not chat_file.exists() and time.monotonic() < deadline:  # saved after the first turn
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "conversation saved" in err
    assert [m.role for m in Conversation.load(chat_file).messages] == ["user", "assistant"]


def test_benchmark_inference_reports_speed_and_memory(checkpoint: Path) -> None:
    import json

    result = run_cli(
        "benchmark-inference", "--checkpoint-path", str(checkpoint), "--max-new-tokens", "16", "--num-runs", "2",
        "--batch-size", "2", "--compare-no-cache", "--json", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for mode in ("cached", "no_cache"):
        assert set(report[mode]) == {"tokens_per_s", "ttft_ms", "ms_per_token"}
        stats = report[mode]["tokens_per_s"]
        assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert report["speedup"] > 0 and report["peak_memory_mib"] > 0 and report["batch_size"] == 2


def test_benchmark_inference_table_for_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["benchmark-inference", "--preset", "tiny", "--max-new-tokens", "4", "--num-runs", "1", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "preset tiny (random weights)" in out and "time to first token (ms)" in out and "peak memory" in out
    assert main([*args[:-2], "--num-runs", "0"]) == 2
    assert "--num-runs must be at least 1" in capsys.readouterr().err
    assert main(["benchmark-inference", "--preset", "huge"]) == 2
    assert "huge" in capsys.readouterr().err


def test_benchmark_inference_compiled_on_a_cpu_says_where_the_step_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    from aksis import native
    from aksis.aot import steps_dir

    args = ["benchmark-inference", "--preset", "tiny", "--max-new-tokens", "2", "--num-runs", "1", "--device", "cpu"]
    assert main([*args, "--compile"]) == 0
    captured = capsys.readouterr()
    assert "compiled" in captured.out
    if native.loaded:  # the decode step compiled ahead of time (aksis.aot); elsewhere torch.compile, which says nothing
        assert f"kept in {steps_dir()}" in captured.err and any(steps_dir().glob("*.pt2"))


def test_load_data_prints_statistics_and_a_decoded_batch(tmp_path: Path) -> None:
    from aksis.corpora import shakespeare_plays

    (tmp_path / "play.txt").write_text(shakespeare_plays()[0])
    result = run_cli(
        "load-data", "--dataset", str(tmp_path / "play.txt"), "--tokenizer", "byte", "--batch-size", "3",
        "--max-length", "64", "--show-chars", "50", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tokenizer: byte (byte, 260 tokens)" in out and "blocks of 64 tokens" in out
    assert out.count("--- block") == 3
    first = out.split("--- block 0\n")[1].split(" …")[0]
    assert len(first) == 50 and first in shakespeare_plays()[0]


def test_load_data_marks_the_trained_tokens_of_conversations(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["load-data", "--dataset", "shakespeare-chat", "--data-format", "chat", "--tokenizer", "byte"]
    assert main([*args, "--batch-size", "2", "--max-length", "128"]) == 0
    out = capsys.readouterr().out
    assert "the tokens that carry loss" in out and "[[" in out and "<|assistant|>[[" in out
    assert main(["load-data", "--dataset", "no-such-corpus"]) == 2
    assert "unknown dataset 'no-such-corpus'" in capsys.readouterr().err
    assert main(["load-data", "--max-length", "0"]) == 2
    assert "--max-length must be at least 1" in capsys.readouterr().err


def test_evaluate_reports_a_checkpoint_beside_another_and_saves_results(checkpoint: Path, tmp_path: Path) -> None:
    import json

    import torch
    from conftest import tiny_config

    from aksis.corpora import shakespeare_plays
    from aksis.model import GPT

    torch.manual_seed(1)
    other = tmp_path / "other"
    save_checkpoint(GPT(tiny_config("gpt2", vocab_size=260)), other, tokenizer=Tokenizer.byte_level())
    (tmp_path / "play.txt").write_text(shakespeare_plays()[0][:20_000])
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "To be", "reference": " or not to be"}\n')
    result = run_cli(
        "evaluate", "--checkpoint-path", str(checkpoint), "--compare", str(other), "--dataset", "play.txt",
        "--tasks", "perplexity,continuation,bleu,rouge", "--prompts-file", "prompts.jsonl", "--num-samples", "3",
        "--prompt-tokens", "16", "--new-tokens", "8", "--max-new-tokens", "8", "--device", "cpu", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("## Evaluation on play.txt / validation: perplexity, continuation, prompts")
    assert f"| metric | {checkpoint} | {other} |" in lines
    for row in ("| perplexity |", "| bits per byte |", "| continuation bleu |", "| prompts rougeL |"):
        assert any(line.startswith(row) for line in lines), row
    for folder in (checkpoint / "best", other):
        saved = json.loads((folder / "eval_results.json").read_text())
        assert saved["dataset"] == "play.txt" and saved["metrics"]["perplexity"] > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--push-to-hub"], "--push-to-hub needs --hub-model-id"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--tasks", "accuracy"], "unknown task(s) accuracy"),
        (["--tasks", "prompts"], "needs (prompt, reference) pairs: give --prompts-file"),
        (["--dataset", "no-such-corpus"], "unknown dataset 'no-such-corpus'"),
        (["--prompts-file", "absent.jsonl"], "cannot read the prompts file"),
    ],
)
def test_evaluate_bad_input_exits_2(checkpoint: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("evaluate", "--checkpoint-path", str(checkpoint), "--no-save", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
