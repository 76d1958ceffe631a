"""Shared fixtures: real data from ../shared/data (subsets) and tiny models."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anndata as ad
import pytest
import torch

from canal import Annotator, ModelConfig
from canal._settings import data_dir, settings

if TYPE_CHECKING:
    from pathlib import Path

settings.progress = False
# CANAL_TEST_THREADS=1 lets two suites share the 2-core machine without thrashing
torch.set_num_threads(int(os.environ.get("CANAL_TEST_THREADS", min(2, os.cpu_count() or 1))))

TINY = ModelConfig(dim=16, depth=2, heads=2, dim_head=8, head_hidden=32, rep_dim=16, seed=0)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real data missing: {path}; put ../shared/data beside the project or set "
                    "CANAL_DATA")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _require(data_dir())


@pytest.fixture(scope="session")
def baron(data_root) -> ad.AnnData:
    """Baron human pancreas, all 2,142 cells (raw counts)."""
    return ad.read_h5ad(data_root / "pancreas" / "baron_human.h5ad")


@pytest.fixture(scope="session")
def baron_mouse(data_root) -> ad.AnnData:
    return ad.read_h5ad(data_root / "pancreas" / "baron_mouse.h5ad")


@pytest.fixture(scope="session")
def seger(data_root) -> ad.AnnData:
    return ad.read_h5ad(data_root / "pancreas" / "segerstolpe_lawlor.h5ad")


@pytest.fixture(scope="session")
def panel(baron) -> list[str]:
    """A 200-gene HVG panel from Baron human."""
    from canal import pp

    return pp.select_panel(baron, n_genes=200)


@pytest.fixture
def tiny_model(panel) -> Annotator:
    return Annotator.from_genes(panel, config=TINY)


def load_script(path: Path, name: str):
    """Import a benchmark script (not a package module) by its file path."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
