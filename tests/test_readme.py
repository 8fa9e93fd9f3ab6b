"""The README's examples run as written: every python block, and every command in its bash blocks, in README
order in one folder (so each command finds the checkpoints of the training runs before it). Training runs are
cut to a few steps, generation to a few tokens, chats to one message; install, test and lint commands are
what CI itself runs. The Hub is conftest's local server: the commands run logged in (HF_TOKEN) as its user, who
stands in for the README's `your-name`."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import Hub, publish_stand_in

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
LINES = [line.split("  #")[0].strip() for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()]
TRAINING = ("aksis train-model", "python training/", "accelerate launch")
COMMANDS = [line for line in LINES if line.startswith(("aksis ", "python -m aksis", "python evaluation/", *TRAINING))]


def test_readme_has_examples() -> None:
    assert len(PYTHON) >= 6 and len(COMMANDS) >= 15
    for command in ("train-model", "generate-text", "chat-with-model", "benchmark-inference", "load-data", "evaluate"):
        assert any(command in line for line in COMMANDS), command


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


def shortened(command: str, steps: int) -> tuple[str, str | None]:
    """The command cut to a test's length (flags given last win), and what to type into it."""
    if command.startswith(TRAINING):
        return f"{command} --max-steps {steps} --eval-every 2 --eval-batches 1 --no-progress", None
    if "generate-text" in command:
        return f"{command} --max-new-tokens 8", None
    if "chat-with-model" in command:
        return f"{command} --max-new-tokens 8", "Good morrow!\n/quit\n"
    if "evaluate" in command:
        return f"{command} --max-texts 1 --num-samples 2", None
    if "benchmark-inference" in command:
        return f"{command} --max-new-tokens 4 --num-runs 1", None
    return command, None


def test_commands_run_in_order(tmp_path: Path, hub: Hub) -> None:
    """As a user types them, from a clone's root: `aksis` and `python` come from PATH (the installed package)."""
    (tmp_path / "training").symlink_to(ROOT / "training")
    (tmp_path / "evaluation").symlink_to(ROOT / "evaluation")
    (tmp_path / "my_texts").mkdir()
    from aksis.corpora import shakespeare_plays

    for i, play in enumerate(shakespeare_plays()[:2]):
        (tmp_path / "my_texts" / f"play{i}.txt").write_text(play)
    # The pretrained models the README names, as tiny stand-ins on the local Hub (the real ones are far from here).
    named = set(re.findall(r"HuggingFaceTB/SmolLM2[\w.-]*", README.read_text(encoding="utf-8")))
    for i, repo_id in enumerate(sorted(named)):
        publish_stand_in(hub, repo_id, shakespeare_plays()[:2], tmp_path / f"stand-in-{i}")
    env = {**os.environ, "HF_TOKEN": hub.write_token}  # as after `hf auth login`
    steps = 0
    for command in COMMANDS:
        steps = steps + 2 if "--resume" in command else 2
        short, stdin = shortened(command.replace("your-name/", f"{hub.user}/"), steps)
        result = subprocess.run(
            short, shell=True, cwd=tmp_path, input=stdin, capture_output=True, text=True, timeout=300, env=env
        )
        assert result.returncode == 0, f"{short}\n{result.stderr}"
        if command.startswith(TRAINING):
            assert f"{steps} steps" in result.stdout, result.stdout
        if re.search(r"(aksis|aksis\.cli) tokenize ", command):
            assert "count:" in result.stdout
        if "generate-text" in command:
            assert "ROMEO:" in result.stdout and "ended by" in result.stderr
    runs = {p.parent.parent.name for p in (tmp_path / "checkpoints").glob("*/best/model.safetensors")}
    assert {"tiny-shakespeare", "tiny-shakespeare-chat"} <= runs


def test_first_command_installs_and_serves_the_app(tmp_path: Path) -> None:
    """The newcomer's first command ends in `python app.py`; run from a fresh clone (no checkpoints, no Hub), the
    app serves its page and offers to train a model."""
    import signal
    import socket

    import httpx

    first = next(code for lang, code in BLOCKS if lang == "bash").strip()
    assert first.startswith("pip install") and first.endswith("&& python app.py")
    (tmp_path / "app.py").symlink_to(ROOT / "app.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    app = subprocess.Popen(
        ["python", "app.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert app.stdout is not None
        lines = []
        for line in app.stdout:  # gradio prints its URL once it serves
            lines.append(line)
            if f"127.0.0.1:{port}" in line:
                break
        else:
            pytest.fail("python app.py ended without serving:\n" + "".join(lines))
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=30).json()
        assert config["title"] == "aksis"
        (welcome,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "welcome"]
        assert welcome["props"]["visible"] is True  # no model anywhere: the one-click training is offered
    finally:
        app.send_signal(signal.SIGINT)
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
