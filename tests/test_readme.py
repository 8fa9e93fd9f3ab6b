"""The README's examples run as written: every python block, and every aksis command in the bash blocks
(install, test and lint commands are what CI itself runs)."""

import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
COMMANDS = [
    line.split("  #")[0].strip()
    for lang, code in BLOCKS
    if lang == "bash"
    for line in code.splitlines()
    if line.startswith(("aksis ", "python -m aksis"))
]


def test_readme_has_examples() -> None:
    assert len(PYTHON) >= 4 and len(COMMANDS) >= 2


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
