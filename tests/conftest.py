"""Shared test fixtures: the conformance folder (HMAR_CONFORMANCE_DIR, else the tests/conformance folder
of the checkout) and model folders assembled from it."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def conformance_path() -> Path:
    """The fixture folder the conformance tests read: HMAR_CONFORMANCE_DIR when set and not empty (another
    folder of the same form), else the frozen copy in the repository."""
    return Path(os.environ.get("HMAR_CONFORMANCE_DIR") or ROOT / "tests" / "conformance").resolve()


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    path = conformance_path()
    if not (path / "config.json").is_file():
        source = "HMAR_CONFORMANCE_DIR" if os.environ.get("HMAR_CONFORMANCE_DIR") else "the checkout's own copy"
        pytest.fail(f"conformance fixtures not found at {path} ({source})")
    return path


@pytest.fixture(scope="session")
def conformance_config(conformance_dir: Path) -> dict:
    return json.loads((conformance_dir / "config.json").read_text())


def fixture_file(conformance_dir: Path, config: dict, role: str) -> Path:
    """The file config['files'][role] names: in the folder, or, where the folder holds its recipe
    instead (`NAME.recipe.json`, for weights too large to keep in the repository), rebuilt from it."""
    name = config["files"][role]
    path = conformance_dir / name
    recipe = conformance_dir / f"{Path(name).stem}.recipe.json"
    if path.exists() or not recipe.is_file():
        return path
    return _rebuilt(recipe)


def _rebuilt(recipe_path: Path) -> Path:
    """The weights a recipe describes, written once per machine into the temp folder (keyed by their
    hash, replaced atomically, so concurrent test workers agree). The recipe is how the fixture's
    deterministic random weights were drawn: one float32 generator seeded with `seed` draws a standard
    normal tensor of each entry's shape in the listed order; "scaled" entries are it times
    1/sqrt(fan-in) (the elements of one output row; a vector's length), "norm" entries (normalisation
    weights) 1 + 0.1 times it, and "zeros" entries (buffers) draw nothing."""
    recipe = json.loads(recipe_path.read_text())
    target = Path(tempfile.gettempdir()) / f"hmar-conformance-{recipe['tensors_sha256'][:16]}" / recipe["file"]
    if target.is_file():
        return target
    torch.manual_seed(recipe["seed"])
    state = {}
    for key, shape, rule in recipe["tensors"]:
        if rule == "zeros":
            state[key] = torch.zeros(shape)
            continue
        draw = torch.randn(shape)
        fan_in = draw[0].numel() if draw.dim() > 1 else draw.numel()
        state[key] = 1 + 0.1 * draw if rule == "norm" else draw * fan_in ** -0.5
    if _tensors_sha256(state) != recipe["tensors_sha256"]:
        raise RuntimeError(f"{recipe_path.name} rebuilds other weights than the fixture's on this torch build")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    torch.save(state, partial)
    os.replace(partial, target)
    return target


def _tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_fixture(conformance_dir: Path, config: dict, role: str):
    """A `.pth`/`.pt` named by config['files'][role], loaded the only safe way."""
    return torch.load(fixture_file(conformance_dir, config, role), map_location="cpu", weights_only=True)


def assemble_model_folder(parent: Path, conformance_dir: Path, config: dict, family: str) -> Path:
    """A model folder (config.json + weight files) of the fixtures' tokenizer and `family` (hmar or
    var) sections, in `parent`."""
    folder = parent / f"tiny-{family}"
    folder.mkdir()
    roles = ("tokenizer", family)
    for role in roles:
        shutil.copy(fixture_file(conformance_dir, config, role), folder / config["files"][role])
    data = {"tokenizer": config["tokenizer"], family: config[family], "files": {r: config["files"][r] for r in roles}}
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="session")
def conformance_models(tmp_path_factory, conformance_dir: Path, conformance_config: dict) -> dict[str, Path]:
    """The HMAR and VAR model folders of the fixtures, assembled once per session (do not change them)."""
    parent = tmp_path_factory.mktemp("models")
    return {family: assemble_model_folder(parent, conformance_dir, conformance_config, family) for family in ("hmar", "var")}


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(session, config, items):
    """Tests that read an interpreter worker's results (a module's INTERPRETER_WORKERS: fixture name ->
    worker flag) run last, in their order, so that the worker process started after collection
    computes while the other tests run."""
    waiting = [item for item in items if _interpreter_jobs(item)]
    if waiting and _schedules_interpreter(config):
        items[:] = [item for item in items if not _interpreter_jobs(item)] + waiting


def pytest_collection_finish(session):
    from tests import interpreter

    if _schedules_interpreter(session.config):
        jobs = dict.fromkeys(job for item in session.items for job in _interpreter_jobs(item))
        interpreter.start(list(jobs))


def pytest_sessionfinish(session, exitstatus):
    from tests import interpreter

    interpreter.stop()


def _schedules_interpreter(config) -> bool:
    """Not for --collect-only, nor in a pytest-xdist worker: there a worker process of its own runs
    each module's interpreter workers, while the other xdist worker uses the second core."""
    return not config.option.collectonly and not hasattr(config, "workerinput")


def _interpreter_jobs(item) -> list[tuple[str, str]]:
    module = getattr(item, "module", None)
    workers = getattr(module, "INTERPRETER_WORKERS", {})
    return [(module.__name__, flag) for name, flag in workers.items() if name in item.fixturenames]


def pytest_configure(config):
    # pytest-xdist workers share the cores: one intra-op thread pool each the size of its share, rather
    # than each one spinning up a thread per core
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if hasattr(config, "workerinput") and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
