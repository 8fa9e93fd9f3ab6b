import subprocess
import sys
from pathlib import Path

import pytest

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
