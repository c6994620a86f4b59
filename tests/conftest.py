"""Shared test fixtures: the conformance folder (HMAR_CONFORMANCE_DIR or ../shared/conformance)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def conformance_path() -> Path:
    return Path(os.environ.get("HMAR_CONFORMANCE_DIR", ROOT.parent / "shared" / "conformance")).resolve()


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    path = conformance_path()
    if not (path / "config.json").is_file():
        pytest.fail(f"conformance fixtures not found at {path} (set HMAR_CONFORMANCE_DIR)")
    return path


@pytest.fixture(scope="session")
def conformance_config(conformance_dir: Path) -> dict:
    return json.loads((conformance_dir / "config.json").read_text())


def load_fixture(conformance_dir: Path, config: dict, role: str):
    """A `.pth`/`.pt` named by config['files'][role], loaded the only safe way."""
    return torch.load(conformance_dir / config["files"][role], map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield
