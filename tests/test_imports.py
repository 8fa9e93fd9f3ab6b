"""Imports point down: every module of the package may import only modules listed before it in ORDER (the README's
Layout section shows the same order). Read from the source with `ast`, so imports inside functions and under
TYPE_CHECKING count too; a cycle cannot pass, and a new module has to be given its place."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aksis"

ORDER = [
    # nothing of aksis below them
    "aksis",
    "aksis.config",
    "aksis.tokenizer",
    "aksis.hf_tokenizer",
    "aksis.native",
    "aksis.kernels",
    "aksis.quantize",
    "aksis.scores",
    "aksis.plots",
    # on the configs and the tokenizer
    "aksis.device",
    "aksis.kv_cache",
    "aksis.losses",
    "aksis.optim",
    "aksis.chat_template",
    "aksis.jinja_template",
    # the model, and what reads and writes it
    "aksis.model",
    "aksis.aot",
    "aksis.transformers_format",
    "aksis.checkpoint",
    "aksis.interop",
    "aksis.gguf_format",
    "aksis.training_state",
    "aksis.runs",
    "aksis.generation",
    "aksis.chat",
    # data, evaluation, sharing
    "aksis.corpora",
    "aksis.blocks",
    "aksis.metrics",
    "aksis.card",
    "aksis.hub",
    # the loop
    "aksis.trainer",
    # the app and the command line
    "aksis.ui.feedback",
    "aksis.ui.space_runs",
    "aksis.ui.models",
    "aksis.ui.context",
    "aksis.ui.inputs",
    "aksis.ui.sampling",
    "aksis.ui.arena_tab",
    "aksis.ui.chat_tab",
    "aksis.ui.evaluate_tab",
    "aksis.ui.generate_tab",
    "aksis.ui.model_tab",
    "aksis.ui.train_tab",
    "aksis.ui",
    "aksis.cli",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """The package's modules (the `evaluate` metric scripts it ships as data are not modules of aksis)."""
    found = {module_name(p): p for p in PACKAGE.rglob("*.py") if "metric_modules" not in p.parts}
    assert found, f"no modules under {PACKAGE}"
    return found


def aksis_imports(path: Path) -> set[str]:
    """The aksis modules a file imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "aksis"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "aksis":
            names.add(node.module)
            # `from aksis.ui import arena_tab` imports a module of the package, not a name of aksis.ui
            names |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules()}
    return names


def test_every_module_has_its_place_in_the_order() -> None:
    assert sorted(modules()) == sorted(ORDER), "add new modules to ORDER (and to the README's Layout)"
    assert len(set(ORDER)) == len(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_a_module_imports_only_modules_below_it(name: str) -> None:
    below = set(ORDER[: ORDER.index(name)])
    imported = aksis_imports(modules()[name]) - {name}
    upward = sorted(imported - below - ({"aksis"} if name != "aksis" else set()))
    assert not upward, f"{name} imports {', '.join(upward)}, which come after it in ORDER"


def test_the_order_test_sees_upward_imports(tmp_path: Path) -> None:
    """The check itself: an import inside a function, or under TYPE_CHECKING, is found."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from aksis.trainer import Trainer\n"
        "def f():\n    import aksis.hub\n    from aksis.ui import chat_tab\n"
    )
    assert aksis_imports(source) == {"aksis.trainer", "aksis.hub", "aksis.ui", "aksis.ui.chat_tab"}


def test_the_readme_shows_this_order() -> None:
    layout = (PACKAGE.parent / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = layout.split("```\n", 2)[1]  # the first code block of the section: the order, line by line
    shown = ["aksis", *(f"aksis.{name.replace('/', '.')}" for name in block.replace("·", " ").split())]
    assert shown == ORDER
