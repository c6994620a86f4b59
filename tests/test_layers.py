"""The import contract in pyproject.toml (`[tool.importlinter]`): the CLI on top, then training, the
engine, the kernels; nothing imports the CLI. `lint-imports` (import-linter) checks it here, so that
the test command enforces it.

import-linter finds a package's modules by walking its folder, and hmar.kernels and hmar.train live
beside hmar/, not in it (pyproject's package-dir). So the check runs on a copy of the sources laid
out as they install, made from that same mapping; the copy is also where the tests below plant
forbidden imports, to show that the contract catches them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _installed_layout(target: Path) -> Path:
    """The Python sources of every package, copied to where pyproject's package-dir installs them."""
    package_dirs = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dirs.items():
        destination = target.joinpath(*package.split("."))
        for source in (ROOT / folder).rglob("*.py"):  # subpackages too
            copy = destination / source.relative_to(ROOT / folder)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, copy)
    return target


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with pyproject's contracts over `tree` (first on the path, ahead of the editable install)."""
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
               "--no-cache", "--no-logo", str(PYPROJECT)]
    env = dict(os.environ, PYTHONPATH=str(tree), NO_COLOR="1")
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _installed_layout(tmp_path / "src")


def test_the_import_contract_is_kept(tree):
    result = _lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("importer, imported", [
    ("hmar.kernels.devices", "hmar.transformer"), ("hmar.benchmark", "hmar.train.loop"), ("hmar.train.data", "hmar_cli.options"),
], ids=["kernels-import-the-engine", "engine-imports-training", "training-imports-the-cli"])
def test_an_import_against_the_layers_breaks_the_contract(tree, importer, imported):
    path = tree.joinpath(*importer.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\nimport {imported}\n")
    result = _lint_imports(tree)
    assert result.returncode != 0 and f"- {importer} -> {imported}" in result.stdout, result.stdout + result.stderr


def test_a_new_engine_module_must_be_placed_in_a_layer(tree):
    (tree / "hmar" / "unplaced.py").write_text("import hmar.config\n")
    result = _lint_imports(tree)
    assert result.returncode != 0 and "hmar.unplaced" in result.stdout, result.stdout + result.stderr


def test_every_loaded_file_is_one_module():
    """No source file is loaded under two names (e.g. kernels/adaln.py as both hmar.kernels.adaln and
    kernels.adaln), and the kernels package's names are its submodules, not functions shadowing them."""
    import hmar.kernels
    import hmar.kernels.block_sparse_attention  # noqa: F401
    import hmar.train.loop  # noqa: F401
    import hmar_cli.app  # noqa: F401

    names_of: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(ROOT):
            names_of.setdefault(str(Path(file).resolve()), []).append(name)
    assert names_of and not {file: names for file, names in names_of.items() if len(names) > 1}
    assert not {"kernels", "train"} & set(sys.modules)
    assert type(hmar.kernels.block_sparse_attention).__name__ == "module"
