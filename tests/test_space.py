"""The Space packaging: README.md's front matter (what a Hugging Face Space reads) and the Spacefile manifest
point at files that exist, and name the Gradio version that requirements.txt and pyproject.toml install."""

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def front_matter() -> dict[str, object]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "README.md must open with the Space's YAML front matter between --- lines"
    data = yaml.safe_load(match.group(1))
    assert isinstance(data, dict)
    return data


def requirements() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower(): r for r in reqs}


def project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]  # type: ignore[no-any-return]


def test_front_matter_runs_app_py_with_the_pinned_gradio() -> None:
    meta = front_matter()
    assert meta["sdk"] == "gradio"
    assert (ROOT / str(meta["app_file"])).is_file()
    gradio = requirements()["gradio"]
    pinned = [s.version for s in gradio.specifier if s.operator == "=="]
    assert pinned == [str(meta["sdk_version"])], "requirements.txt must pin gradio to the front matter's sdk_version"
    deps = {Requirement(d).name.lower(): Requirement(d) for d in project()["dependencies"]}  # type: ignore[attr-defined]
    assert str(meta["sdk_version"]) in deps["gradio"].specifier, "pyproject.toml must admit the Space's gradio"
    python = str(meta["python_version"])
    assert python.count(".") == 1 and f"{python}.0" in project_python(), "the Space's Python must be one we support"
    for key in ("title", "emoji", "colorFrom", "colorTo", "license"):
        assert meta.get(key), f"front matter needs {key}"
    assert len(str(meta["short_description"])) <= 60  # the Hub refuses longer ones


def project_python() -> SpecifierSet:
    return SpecifierSet(str(project()["requires-python"]))


def test_requirements_match_pyproject() -> None:
    """requirements.txt (what a Space installs) and pyproject.toml (what pip installs) name the same packages, and
    every version a requirement admits is one pyproject admits too (checked at each one's lower bound or pin)."""
    space = requirements()
    package = {Requirement(d).name.lower(): Requirement(d) for d in project()["dependencies"]}  # type: ignore[attr-defined]
    assert set(space) == set(package)
    for name, req in space.items():
        for spec in req.specifier:
            assert spec.version in package[name].specifier, f"{name}: {req} (requirements.txt) vs {package[name]}"


def test_spacefile_runs_app_py() -> None:
    manifest = yaml.safe_load((ROOT / "Spacefile").read_text(encoding="utf-8"))
    (micro,) = manifest["micros"]
    assert micro["primary"] is True and micro["engine"].startswith("python")
    script = micro["run"].split()
    assert script[0] == "python" and (ROOT / micro["src"] / script[1]).is_file()
    assert script[1] == front_matter()["app_file"]
