"""Checkpoint directories: ``model.pt`` (weights only), ``config.json``, ``bank.h5ad``,
``history.json``, and ``optimizer.pt`` while a pre-training run is unfinished.

Nothing is pickled: weights load with ``torch.load(..., weights_only=True)``, metadata is JSON,
the example bank is an ``.h5ad``. Writes are atomic: a temporary sibling directory is filled,
then renamed over the target, under a lock file so that concurrent writers queue instead of
racing; a write interrupted between its two renames is recovered on the next load or save.

Every other file canal writes (predictions, embeddings, evaluation reports, stream results) goes
through :func:`atomic_path`: written to a temporary file in the same folder, then renamed into
place, so a full disk, a permission error or a kill never leaves a half-written file or touches
the previous one. Such errors are raised as :class:`OutputError`, naming the cause.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger(__name__)

FORMAT = "canal-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.pt"
CONFIG = "config.json"
BANK = "bank.h5ad"
HISTORY = "history.json"
OPTIMIZER = "optimizer.pt"
#: Seconds a save waits for another process writing the same checkpoint.
LOCK_TIMEOUT = 600.0
#: config.json keys owned by this module (bookkeeping, not model metadata).
_OWN_KEYS = ("checkpoint_id", "written_by", "checksum", "bank_cells")
#: Checkpoint ids this process loaded or wrote, and when it started: a checkpoint written since
#: by an id not among them comes from another run.
_SEEN: set[str] = set()
_STARTED = time.time()


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, foreign or from a newer canal."""


class OutputError(OSError):
    """A file canal writes could not be written (disk full, permission, not a folder).

    The previous file at that path, if any, is left as it was.
    """


@dataclass
class Checkpoint:
    """The contents of a checkpoint directory."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    bank: Any = None  # AnnData or None
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None  # resumable optimizer state (weights-only file)
    #: set by :func:`load_checkpoint`: the last stage kept an example bank but ``bank.h5ad`` is
    #: gone, so a replaying strategy would train without the earlier stages' cells
    bank_missing: bool = False
    checkpoint_id: str | None = None


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

    An existing checkpoint at ``path`` is replaced only once the new one is complete. Writers of
    one path queue on a lock file (``.NAME.lock`` beside it); leftovers of an interrupted write
    are recovered or removed first. A checkpoint that another run wrote to ``path`` while this
    one ran is not replaced: this model goes to a sibling ``NAME.unsaved-*`` and a
    :class:`CheckpointError` says so. On a full disk the model is written to the system's
    temporary folder instead and an :class:`OutputError` says where.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _named_error(err, path) or err from err
    meta = dict(checkpoint.meta)
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, versions=versions())
    for key in _OWN_KEYS:
        meta.pop(key, None)
    meta.update(checkpoint_id=uuid.uuid4().hex, checksum=panel_checksum(meta),
                bank_cells=int(checkpoint.bank.n_obs) if checkpoint.bank is not None else 0,
                written_by={"host": socket.gethostname(), "pid": os.getpid(),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    try:
        with _lock(path):
            _recover(path)
            if path.exists() and not (path / CONFIG).exists() and (
                    not path.is_dir() or any(path.iterdir())):
                raise CheckpointError(f"{path} exists and is not a canal checkpoint; choose "
                                      "another output directory")
            other = _written_by_other_run(path)
            if other is not None:
                kept = _write_dir(path.parent / f"{path.name}.unsaved-{meta['checkpoint_id'][:8]}",
                                  checkpoint, meta)
                raise CheckpointError(
                    f"{path} was written by another canal run ({other}) while this one ran; "
                    f"not replacing it. This run's model is at {kept}: keep one of the two "
                    f"(e.g. mv {kept} {path}) or give each run its own output directory")
            _write_dir(path, checkpoint, meta)
    except Timeout as err:
        raise CheckpointError(f"another canal process has been writing {path} for over "
                              f"{LOCK_TIMEOUT:.0f}s (lock {_lock_path(path)}); wait for it to "
                              "finish, or write to another directory") from err
    _SEEN.add(meta["checkpoint_id"])
    logger.info("checkpoint written to %s", path)
    return path


def _write_dir(path: Path, checkpoint: Checkpoint, meta: dict[str, Any]) -> Path:
    """Fill a temporary sibling of ``path``, then rename it over ``path`` (two renames)."""
    _check_space(path, _checkpoint_bytes(checkpoint), checkpoint=checkpoint, meta=meta)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _fill(tmp, checkpoint, meta)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _named_error(err, path)
        if named is not None and named.errno == errno.ENOSPC:
            raise _disk_full(named, path, checkpoint, meta) from err
        if named is not None:
            raise named from err
        raise
    return path


def _fill(folder: Path, checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()}
    torch.save(state, folder / WEIGHTS)
    (folder / HISTORY).write_text(json.dumps(checkpoint.history, indent=2, default=to_jsonable))
    if checkpoint.bank is not None:
        checkpoint.bank.write_h5ad(folder / BANK)
    if checkpoint.optimizer is not None:
        torch.save(checkpoint.optimizer, folder / OPTIMIZER)
    # config.json last: a folder holding it is complete
    (folder / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=False, default=to_jsonable))


def _checkpoint_bytes(checkpoint: Checkpoint) -> int:
    n = sum(v.numel() * v.element_size() for v in checkpoint.state_dict.values())
    if checkpoint.bank is not None:
        n += _adata_bytes(checkpoint.bank)
    if checkpoint.optimizer is not None:
        n += 2 * n  # Adam keeps two moments per weight
    return n


def _disk_full(err: OutputError, path: Path, checkpoint: Checkpoint,
               meta: dict[str, Any]) -> OutputError:
    """Write the model to the system's temporary folder instead; say where (or that it failed)."""
    kept = folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"canal-unsaved-{path.name}-"))
        if not same_device(folder, path.parent):
            _fill(folder, checkpoint, meta)
            kept = folder
        else:
            shutil.rmtree(folder, ignore_errors=True)
    except Exception:  # the fallback is best effort; the original error is what matters
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    where = (f"; the trained model was written to {kept} instead (move it: mv {kept} {path})"
             if kept is not None else
             "; it could not be written elsewhere either: set TMPDIR to a folder on another "
             "disk with space (or free space) and re-run")
    return OutputError(errno.ENOSPC, f"{err.strerror}{where}")


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _lock(path: Path) -> FileLock:
    return FileLock(_lock_path(path), timeout=LOCK_TIMEOUT)


def _leftovers(path: Path, kind: str) -> list[Path]:
    """``.NAME.old-*`` or ``.NAME.tmp-*`` siblings of ``path``, oldest first."""
    found = list(path.parent.glob(f".{path.name}.{kind}-*")) if path.parent.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _recover(path: Path) -> None:
    """Under the lock: restore a checkpoint moved aside by a write that died between its two
    renames, and remove temporaries of interrupted writes."""
    olds = _leftovers(path, "old")
    if olds and not path.exists() and (olds[-1] / CONFIG).exists():
        os.replace(olds.pop(), path)
        logger.warning("recovered %s from %s.old-*, left by a write interrupted between its "
                       "two renames", path, path.name)
    for stale in olds + _leftovers(path, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)
        logger.info("removed %s, left by an interrupted write", stale)


def _written_by_other_run(path: Path) -> str | None:
    """Who wrote the checkpoint at ``path``, if another run did so after this one started."""
    cfg = path / CONFIG
    if not cfg.exists() or cfg.stat().st_mtime < _STARTED:
        return None
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    ckpt_id = meta.get("checkpoint_id") if isinstance(meta, dict) else None
    if not ckpt_id or ckpt_id in _SEEN:
        return None
    who = meta.get("written_by") or {}
    return f"process {who.get('pid', '?')} on {who.get('host', '?')} at {who.get('time', '?')}"


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
    if not path.exists() and _leftovers(path, "old"):
        try:
            with _lock(path):
                _recover(path)
        except (OSError, Timeout) as err:
            logger.warning("could not recover %s from its interrupted write (%s)", path, err)
    meta = read_meta(path)
    own = {k: meta.pop(k) for k in _OWN_KEYS if k in meta}
    if "checksum" in own and own["checksum"] != panel_checksum(meta):
        raise CheckpointError(f"{path / CONFIG}: its genes or cell types were edited after "
                              "training (checksum mismatch); the weights follow the original "
                              "order, so restore that config.json or re-train the stage")
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
    missing = with_bank and bank is None and _bank_expected(own, meta, history)
    if missing:
        logger.warning("%s has no %s although its last stage kept an example bank; training "
                       "another stage with replay would forget the earlier stages", path, BANK)
    ckpt_id = own.get("checkpoint_id")
    if ckpt_id:
        _SEEN.add(ckpt_id)
    return Checkpoint(state_dict=state, meta=meta, bank=bank, history=history,
                      optimizer=optimizer, bank_missing=missing, checkpoint_id=ckpt_id)


def _bank_expected(own: dict[str, Any], meta: dict[str, Any], history: list) -> bool:
    """Whether the checkpoint's last stage left an example bank (older ones do not record it)."""
    if "bank_cells" in own:
        return bool(own["bank_cells"])
    if not meta.get("stage") or not history:
        return False
    from canal.train import STRATEGIES

    last = history[-1] if isinstance(history[-1], dict) else {}
    strategy = (last.get("config") or {}).get("strategy")
    return bool(STRATEGIES.get(strategy, (False,))[0])


def bank_missing_error(path: str | Path, strategy: str) -> CheckpointError:
    """The error to raise when a replaying ``strategy`` starts from a checkpoint whose bank is
    missing (:attr:`Checkpoint.bank_missing`)."""
    return CheckpointError(
        f"{Path(path) / BANK} is missing: the checkpoint's last stage kept an example bank of "
        f"earlier stages' cells, and strategy {strategy!r} replays it, so this stage would "
        f"forget them. Restore {BANK} from a copy of the checkpoint, or train without replay "
        "(strategy 'distill', CLI --strategy distill) knowing earlier types may be forgotten")


def panel_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's gene panel and cell-type library, in order."""
    text = json.dumps({"genes": list(meta.get("genes", [])),
                       "cell_types": list(meta.get("cell_types", []))}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Output files: same-file checks and atomic writes
# --------------------------------------------------------------------------------------------


def same_file(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two paths name one file or directory (through symlinks and hard links alike)."""
    if a is None or b is None:
        return False
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)


def same_device(a: str | Path, b: str | Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def check_out(out: str | Path, *inputs: str | Path | None, flag: str = "--out") -> None:
    """Refuse an output path that is one of the inputs (same path, symlink or hard link).

    Raises
    ------
    ValueError naming the input.
    """
    for src in inputs:
        if same_file(out, src):
            raise ValueError(f"{flag} {out} is the input {src} (the same file); write the "
                             "result to a new path so the input stays intact")


def _named_error(err: BaseException, path: Path) -> OutputError | None:
    """Translate a write failure into an :class:`OutputError` naming its cause, if known."""
    if isinstance(err, OutputError):
        return err
    if not isinstance(err, OSError | RuntimeError):
        return None
    code = getattr(err, "errno", None)
    text = str(err)
    full = code in (errno.ENOSPC, errno.EDQUOT) or any(
        s in text for s in ("No space left", "errno = 28", "unexpected pos", "file write failed"))
    if not full:
        free = _free_bytes(path.parent)
        full = free is not None and free < 1 << 20
    if full:
        free = _free_bytes(path.parent)
        shown = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
        return OutputError(errno.ENOSPC, f"no space left on the device writing {path} ({shown}); "
                           "free space or write to another disk")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or isinstance(err, PermissionError) \
            or "Permission denied" in text or "errno = 13" in text:
        return OutputError(errno.EACCES, f"permission denied writing {path}; choose a folder "
                           "you can write to")
    if isinstance(err, IsADirectoryError) or code == errno.EISDIR:
        return OutputError(errno.EISDIR, f"{path} is a directory; pass a file path")
    if isinstance(err, FileNotFoundError) and not path.parent.exists():
        return OutputError(errno.ENOENT, f"the folder {path.parent} does not exist; create it "
                           "or choose another output path")
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _adata_bytes(adata) -> int:
    """About how many bytes an AnnData takes in an uncompressed ``.h5ad``."""
    import numpy as np
    import scipy.sparse as sp

    def size(x) -> int:
        if x is None:
            return 0
        if sp.issparse(x):
            return x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
        if hasattr(x, "memory_usage"):  # DataFrame
            return int(x.memory_usage(deep=True).sum())
        if isinstance(x, np.ndarray):
            return x.nbytes
        return 0

    if adata.isbacked:
        n = os.path.getsize(adata.filename)
    else:
        n = size(adata.X) + sum(size(v) for v in adata.layers.values())
        if adata.raw is not None:
            n += size(adata.raw.X)
    n += sum(size(v) for v in adata.obsm.values()) + sum(size(v) for v in adata.obsp.values())
    return n + size(adata.obs) + size(adata.var)


def _check_space(path: Path, nbytes: int, **fallback: Any) -> None:
    """Refuse before writing when the disk cannot hold about ``nbytes`` more (a full disk in the
    middle of an HDF5 write can crash the process instead of raising)."""
    free = _free_bytes(path.parent)
    need = int(nbytes * 1.05) + (1 << 20)
    if free is None or free >= need:
        return
    err = OutputError(errno.ENOSPC, f"no space left on the device writing {path}: it needs about "
                      f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; free space or "
                      "write to another disk")
    if fallback:
        raise _disk_full(err, path, **fallback)
    raise err


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; renamed over ``path`` on success.

    On any error (or a kill) the temporary file is removed and a previous file at ``path`` is
    left untouched; disk-full and permission errors are raised as :class:`OutputError`.
    """
    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        yield tmp
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        named = _named_error(err, path)
        if named is not None and named is not err:
            raise named from err
        raise


def write_h5ad(adata, path: str | Path) -> Path:
    """``adata.write_h5ad(path)``, atomically and always into a fresh file.

    A backed AnnData makes anndata append to an existing file (stale groups such as ``raw``
    survive); the temporary file avoids that. The disk's free space is checked first.

    A backed AnnData's ``X`` (and ``raw``, which backed mode also leaves on disk) is copied
    from its file by HDF5 itself, a chunk at a time: anndata would read each array of the
    matrix into memory whole, which for an atlas is gigabytes. Everything held in memory
    (obs, var, obsm, uns, ...) is written by anndata as usual.
    """
    path = Path(path)
    _check_space(path, _adata_bytes(adata))
    with atomic_path(path) as tmp:
        if adata.isbacked and not adata.is_view:
            _write_backed(adata, tmp)
        else:
            adata.write_h5ad(tmp)
    return path


def _write_backed(adata, path: Path) -> None:
    """Write a backed AnnData to a new ``path``: in-memory parts by anndata, ``X``/``raw``
    copied from the backing file by ``h5py`` (HDF5 object copy, bounded memory)."""
    import anndata as ad
    import h5py

    shell = ad.AnnData(obs=adata.obs, var=adata.var, uns=dict(adata.uns),
                       obsm=dict(adata.obsm), varm=dict(adata.varm), obsp=dict(adata.obsp),
                       varp=dict(adata.varp), layers=dict(adata.layers))
    shell.write_h5ad(path)
    with h5py.File(adata.filename, "r") as src, h5py.File(path, "a") as dst:
        for key in ("X", "raw"):
            if key in src and not (key == "raw" and adata.raw is None):
                dst.pop(key, None)
                src.copy(src[key], dst, name=key)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(frame, path: str | Path, **kwargs: Any) -> Path:
    """``frame.to_csv(path, **kwargs)``, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)
    return Path(path)


def save_figure(fig, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)``, atomically (the format follows ``path``'s suffix)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path
