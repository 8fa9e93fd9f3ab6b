"""The README's examples run as written: every python block, every aksis command in the bash blocks, and
every training command (cut short: a few steps each; install, test and lint commands are what CI itself runs)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
LINES = [line.split("  #")[0].strip() for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()]
TRAINING = [line for line in LINES if line.startswith(("aksis train-model", "python training/", "accelerate launch"))]
COMMANDS = [line for line in LINES if line.startswith(("aksis ", "python -m aksis")) and line not in TRAINING]


def test_readme_has_examples() -> None:
    assert len(PYTHON) >= 4 and len(COMMANDS) >= 2 and len(TRAINING) >= 3


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_example_runs(command: str, tmp_path: Path) -> None:
    # As a user types it: the `aksis` console script and `python` come from PATH (the installed package).
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "count:" in result.stdout


def test_training_commands_run_in_order(tmp_path: Path) -> None:
    """Each training command as written, in README order (so --resume finds the run before it), with a few
    steps appended; relative paths resolve as in a clone of the repository."""
    (tmp_path / "training").symlink_to(ROOT / "training")
    (tmp_path / "my_texts").mkdir()
    from aksis.data import shakespeare_plays

    for i, play in enumerate(shakespeare_plays()[:2]):
        (tmp_path / "my_texts" / f"play{i}.txt").write_text(play)
    steps = 0
    for command in TRAINING:
        steps = steps + 2 if "--resume" in command else 2
        short = f"{command} --max-steps {steps} --eval-every 2 --eval-batches 1 --no-progress"
        result = subprocess.run(short, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{short}\n{result.stderr}"
        assert f"{steps} steps" in result.stdout, result.stdout
    assert len(list((tmp_path / "checkpoints").glob("*/best/model.safetensors"))) == 3  # three runs, one resumed
