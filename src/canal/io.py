"""Checkpoint directories: ``model.pt`` (weights only), ``config.json``, ``bank.h5ad``,
``history.json``, and ``optimizer.pt`` while a pre-training run is unfinished.

Nothing is pickled: weights load with ``torch.load(..., weights_only=True)``, metadata is JSON,
the example bank is an ``.h5ad``. Writes are atomic: a temporary sibling directory is filled,
then renamed over the target.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT = "canal-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.pt"
CONFIG = "config.json"
BANK = "bank.h5ad"
HISTORY = "history.json"
OPTIMIZER = "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, foreign or from a newer canal."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    bank: Any = None  # AnnData or None
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None  # resumable optimizer state (weights-only file)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for name in ("canal", "anndata", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to the directory ``path`` atomically (temp dir, then rename).

    An existing checkpoint at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()}
        torch.save(state, tmp / WEIGHTS)
        meta = dict(checkpoint.meta)
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, versions=versions())
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=False, default=to_jsonable))
        (tmp / HISTORY).write_text(json.dumps(checkpoint.history, indent=2, default=to_jsonable))
        if checkpoint.bank is not None:
            checkpoint.bank.write_h5ad(tmp / BANK)
        if checkpoint.optimizer is not None:
            torch.save(checkpoint.optimizer, tmp / OPTIMIZER)
        old = None
        if path.exists():
            if not (path / CONFIG).exists() and any(path.iterdir()):
                raise CheckpointError(f"{path} exists and is not a canal checkpoint; choose "
                                      "another output directory")
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("checkpoint written to %s", path)
    return path


def to_jsonable(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a canal checkpoint is a directory holding "
                              f"{WEIGHTS} and {CONFIG}")
    cfg = path / CONFIG
    if not cfg.exists():
        raise CheckpointError(f"{path} has no {CONFIG}: not a canal checkpoint (for scBERT "
                              "weights use canal.nn.load_scbert_state_dict)")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg} is corrupt ({err}); restore it or re-run the stage that "
                              "wrote it") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg} is not a canal checkpoint config (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version!r}, newer than this canal "
                              f"reads ({FORMAT_VERSION}); upgrade canal")
    return meta


def load_checkpoint(path: str | Path, *, with_bank: bool = True) -> Checkpoint:
    """Read a checkpoint directory; raise :class:`CheckpointError` naming the problem."""
    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path} has no {WEIGHTS}; the checkpoint is incomplete")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/garbled files
        raise CheckpointError(f"{weights} is corrupt or not a weights-only state dict ({err}); "
                              "restore it or re-run the stage that wrote it") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights} does not hold a state dict of tensors")
    bank = None
    if with_bank and (path / BANK).exists():
        import anndata as ad

        try:
            bank = ad.read_h5ad(path / BANK)
        except Exception as err:
            raise CheckpointError(f"{path / BANK} is corrupt ({err}); restore it") from err
    optimizer = None
    if (path / OPTIMIZER).exists():
        try:
            optimizer = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path / OPTIMIZER} is corrupt ({err}); delete it to restart "
                                  "pre-training from the saved weights") from err
    history = []
    if (path / HISTORY).exists():
        try:
            history = json.loads((path / HISTORY).read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path / HISTORY} is corrupt ({err})") from err
    return Checkpoint(state_dict=state, meta=meta, bank=bank, history=history,
                      optimizer=optimizer)
