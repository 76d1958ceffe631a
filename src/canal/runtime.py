"""The one forward pass over cells: eval mode, precision, batching, preallocated outputs.

Prediction, embedding, calibration, the training loop's validation and teacher passes, and
interpretation all run the network through :func:`forward_cells`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from canal._settings import settings
from canal.nn import CanalNet, CellOutput

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from canal.data import Batch

Precision = Literal["fp32", "bf16"]

#: Cells per forward pass when nothing else is asked (larger batches are slower on CPUs).
BATCH_SIZE = 64


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: While a loop runs: serve blocks up to 1 GiB from the heap and keep up to 1 GiB free at its top.
_KEEP = 1 << 30
#: Afterwards: glibc's own ceilings for its adaptive thresholds (32 MiB mmap, 64 MiB trim).
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20
_heap_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def keep_heap() -> Iterator[None]:
    """Keep freed memory in the process while canal's loops run (glibc only; else nothing).

    Every forward pass allocates temporaries of tens of megabytes (a batch of 64 cells x 1,001
    genes x 256 feed-forward units is 66 MB). glibc's malloc serves blocks above 32 MiB with a
    fresh ``mmap`` and unmaps them when freed, so the kernel zeroes new pages for every batch:
    on a 2-core CPU this took 40% of a forward pass's CPU time in page faults (6.5 million
    minor faults for 1,024 cells). Inside this context the blocks come from the heap and stay
    there between batches; on leaving, the thresholds return to glibc's usual ceilings and the
    free heap is handed back to the system (``malloc_trim``), so resident memory after the
    call is what it would have been. Nested uses act once. Turned off by
    ``canal.settings.keep_heap = False`` (or ``CANAL_KEEP_HEAP=0``); tcmalloc or jemalloc
    preloaded, it changes nothing.
    """
    global _heap_depth
    libc = _glibc() if settings.keep_heap else None
    outer = libc is not None and _heap_depth == 0
    if outer:
        libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    _heap_depth += 1
    try:
        yield
    finally:
        _heap_depth -= 1
        if outer:
            libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
            libc.malloc_trim(0)


def check_precision(precision: str) -> str:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision


def check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


@contextlib.contextmanager
def eval_mode(net: torch.nn.Module) -> Iterator[None]:
    """Put ``net`` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def autocast(device: torch.device, precision: str):
    """bf16 autocast of the matrix products for ``"bf16"``; nothing for ``"fp32"``."""
    check_precision(precision)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_cells(net: CanalNet, batches: Iterable[Batch], *, n_cells: int, start: int = 0,
                  precision: Precision = "fp32", device: str | torch.device | None = None,
                  progress: str | None = None) -> CellOutput:
    """Representations and logits of every cell in ``batches`` (eval mode, no gradients).

    Outputs are copied into tensors allocated once for all ``n_cells`` cells: keeping a small
    tensor per batch instead fragments the heap between the large per-batch temporaries, and
    resident memory then grows with the number of batches.

    Parameters
    ----------
    net
        The network; it is moved to ``device`` and its train/eval mode is restored afterwards.
    batches
        :class:`~canal.data.Batch` objects: tokens, or hidden states of layer ``start - 1``.
    n_cells
        Total cells in ``batches``.
    start
        First encoder layer to run (``> 0`` when the batches carry cached hidden states).
    precision
        ``"fp32"`` or ``"bf16"`` (autocast of the matrix products; the attention kernel stays
        in float32).
    device
        Torch device; ``None`` uses ``canal.settings.device``.
    progress
        Label of a progress bar (shown when ``canal.settings.progress``); ``None``: no bar.

    Returns
    -------
    :class:`~canal.nn.CellOutput` of ``float32`` CPU tensors, one row per cell, in order.
    """
    check_precision(precision)
    dev = settings.torch_device(device)
    net.to(dev)
    reps = torch.empty(n_cells, net.config.rep_dim)
    logits = torch.empty(n_cells, net.head.n_classes)
    done = 0
    bar = tqdm(total=n_cells, unit="cell", desc=progress, leave=False,
               disable=progress is None or not settings.progress)
    with keep_heap(), torch.no_grad(), eval_mode(net), autocast(dev, precision):
        for batch in batches:
            stop = done + batch.n_cells
            if stop > n_cells:
                raise ValueError(f"more than n_cells={n_cells} cells in the batches")
            b = batch.to(dev)
            out = net(b.tokens, hidden=b.hidden, present=b.present, start=start)
            reps[done:stop] = out.representation.float()
            logits[done:stop] = out.logits.float()
            done = stop
            bar.update(batch.n_cells)
    bar.close()
    if done != n_cells:
        raise ValueError(f"the batches held {done} cells, not n_cells={n_cells}")
    return CellOutput(reps, logits)
