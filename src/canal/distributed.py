"""Data-parallel training over processes launched by ``torchrun`` (PyTorch DDP).

``torchrun --nproc_per_node=N -m canal fit ...`` starts N copies of canal; each reads the
environment ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and :func:`init` joins them into one process group: NCCL for CUDA tensors (with
gloo for CPU-side bookkeeping), gloo alone on CPUs. Without ``torchrun`` (``WORLD_SIZE`` unset
or 1) nothing is initialised and every helper here is the identity: the single-process path.

What the training loop uses (:func:`canal.train.run_stage`):

- :func:`shard`: a rank's fixed share of a stage's cells (a seeded permutation, dealt out in
  turn; padded with the rank's own cells so that every rank takes the same number of steps).
  A rank computes and caches only its own cells; each epoch reshuffles within the share.
- :func:`wrap`: the network inside ``DistributedDataParallel`` (gradients all-reduced).
- :func:`sum_across`: sums of per-rank numbers (validation counts and losses), added up in rank
  order on every rank, so every rank sees bit-identical totals and stops early at the same epoch.
- :func:`gather_cells`: per-rank rows put back into the original cell order on every rank
  (final representations and logits, teacher targets), so the example bank and the novelty
  thresholds come out identical on every rank.
- :func:`on_main`: work done by rank 0 only (writing a checkpoint); the others wait for it and
  re-raise its error if it fails.

What sharded prediction uses (:func:`canal.annotate.represent`, behind ``Annotator.predict``
and ``Annotator.embed``):

- :func:`block`: a rank's contiguous block of rows of one file, in whole batches, so every
  rank runs exactly the batches a single process would run on those cells.
- :func:`gather_blocks`: the ranks' per-cell outputs concatenated in rank order (= cell order)
  on every rank.
- :func:`agree`: a step that may fail on one rank only (a bad cell in its block); when it
  fails anywhere, it fails everywhere instead of leaving the others waiting in a collective.
- :func:`local_device`: ``cuda`` resolved to this rank's GPU (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------
# the process group
# ------------------------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


_rank, _world_size = rank, world_size  # for functions whose arguments shadow these names


def is_main() -> bool:
    """Whether this process is rank 0 (always true when not distributed)."""
    return rank() == 0


def init(*, device: str | torch.device | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group that ``torchrun`` set up, if there is one.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a process group already exists.

    Parameters
    ----------
    device
        The device training will use (default: ``canal.settings.device``). On CUDA, this
        process is bound to GPU ``LOCAL_RANK`` and the backend is NCCL for CUDA tensors and
        gloo for CPU tensors; otherwise the backend is gloo.
    timeout_s
        How long a collective waits for the other processes before failing.

    Returns
    -------
    Whether this process is part of a multi-process group afterwards.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return active()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                           "install a torch build with distributed support or run one process")
    from canal._settings import settings

    dev = settings.torch_device(device)
    if dev.type == "cuda":
        n_gpus = torch.cuda.device_count()
        if local_rank() >= n_gpus:
            raise RuntimeError(f"LOCAL_RANK {local_rank()} but only {n_gpus} GPUs on this node; "
                               f"pass --nproc_per_node={n_gpus} or fewer")
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    logger.info("rank %d of %d joined the process group (%s)", rank(), world_size(), backend)
    return active()


def cleanup() -> None:
    """Leave and destroy the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(*, device: str | torch.device | None = None) -> Iterator[bool]:
    """``with session():`` — :func:`init` on entry, :func:`cleanup` on exit if it initialised.

    Yields whether the process is part of a multi-process group.
    """
    owned = launched() and not (dist.is_available() and dist.is_initialized())
    try:
        yield init(device=device)
    finally:
        if owned:
            cleanup()


# ------------------------------------------------------------------------------------------
# collectives
# ------------------------------------------------------------------------------------------


def broadcast_object(obj: T, *, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, bit-identical on every rank.

    The per-rank vectors are gathered and added in rank order (float64) on every rank, so the
    totals do not depend on the reduction order of the backend.
    """
    if not active():
        return [float(v) for v in values]
    mine = torch.tensor([float(v) for v in values], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(parts, mine)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total.tolist()


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (any length along dim 0, same trailing shape and dtype).

    Returns
    -------
    One tensor per rank, in rank order, on the device of ``tensor``.
    """
    if not active():
        return [tensor]
    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    lengths = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded.contiguous())
    return [p[:k] for p, k in zip(parts, lengths, strict=True)]


def gather_cells(index: np.ndarray, values: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Put every rank's rows back into cell order: row ``i`` of the result is cell ``i``.

    Parameters
    ----------
    index
        The cells this rank computed (its :func:`shard` s), one per row of ``values``.
    values
        This rank's rows.
    n_cells
        Total number of cells; together the ranks must cover every cell.

    Returns
    -------
    ``(n_cells, ...)`` tensor, identical on every rank.
    """
    index = np.asarray(index, dtype=np.int64)
    if len(index) != values.shape[0]:
        raise ValueError(f"{len(index)} cell indices for {values.shape[0]} rows")
    if not active() and np.array_equal(index, np.arange(n_cells)):
        return values
    idx = torch.cat(all_gather_rows(torch.from_numpy(index)))
    rows = torch.cat(all_gather_rows(values))
    out = values.new_zeros((n_cells, *values.shape[1:]))
    seen = torch.zeros(n_cells, dtype=torch.bool)
    out[idx.to(values.device)] = rows
    seen[idx] = True
    if not bool(seen.all()):
        raise RuntimeError(f"{int((~seen).sum())} of {n_cells} cells were computed by no rank; "
                           "every rank must shard the same cells with the same seed")
    return out


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` on rank 0 only; every rank returns its result (which must be picklable).

    The other ranks wait for rank 0; if ``fn`` raises there, they raise a ``RuntimeError``
    naming the error instead of hanging in a later collective.
    """
    if not active():
        return fn(*args, **kwargs)
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as err:
            broadcast_object((None, f"{type(err).__name__}: {err}"))
            raise
        return broadcast_object((result, None))[0]
    result, message = broadcast_object((None, None))
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


# ------------------------------------------------------------------------------------------
# data and model
# ------------------------------------------------------------------------------------------


def shard(indices: np.ndarray, *, seed: int, pad: bool = True, rank: int | None = None,
          world_size: int | None = None) -> np.ndarray:
    """This rank's share of ``indices``: a seeded permutation dealt out to the ranks in turn.

    Every rank computes the same permutation, so the shares are disjoint and together hold
    every index exactly once. With ``pad``, shares one short are topped up with one of the
    rank's own indices (as ``DistributedSampler`` pads), so every rank has the same number of
    cells and therefore takes the same number of optimizer steps.

    Parameters
    ----------
    indices
        Cell indices to share out.
    seed
        Seed of the permutation; the same on every rank.
    pad
        Make every share as long as the longest.
    rank, world_size
        Default: this process's (a single process gets ``indices`` unchanged).

    Returns
    -------
    This rank's indices, sorted, then padded (the training loop shuffles them every epoch).
    """
    indices = np.asarray(indices)
    r = _rank() if rank is None else int(rank)
    w = _world_size() if world_size is None else int(world_size)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside world size {w}")
    if w == 1:
        return indices
    if pad and len(indices) < w:
        raise ValueError(f"{len(indices)} training cells for {w} processes; use at most "
                         f"{max(len(indices), 1)} processes (--nproc_per_node) or more cells")
    perm = indices[np.random.default_rng([int(seed), 9]).permutation(len(indices))]
    mine = np.sort(perm[r::w])
    longest = -(-len(indices) // w)
    if pad and len(mine) < longest:
        mine = np.concatenate([mine, mine[:longest - len(mine)]])
    return mine


def wrap(net: nn.Module) -> nn.Module:
    """``net`` inside ``DistributedDataParallel`` when distributed, else ``net`` itself.

    Call it after freezing (only parameters that require gradients are synchronised). DDP
    copies rank 0's parameters and buffers to the other ranks once, here; buffers are not
    re-sent on every forward pass, as canal's (the Performer projections) never change.
    """
    if not active():
        return net
    from torch.nn.parallel import DistributedDataParallel

    dev = next(net.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` wrapper (or ``net`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return net.module if isinstance(net, DistributedDataParallel) else net


# ------------------------------------------------------------------------------------------
# sharded inference
# ------------------------------------------------------------------------------------------


def block(n_cells: int, *, multiple: int = 1, rank: int | None = None,
          world_size: int | None = None) -> slice:
    """This rank's contiguous block of ``n_cells`` rows.

    The rows are cut into runs of ``multiple`` (the batch size; the last run may be shorter)
    and the runs are dealt out in order, as evenly as possible, so rank ``r`` holds rows
    before rank ``r + 1``'s and every block starts on a batch boundary of the single-process
    pass. With more ranks than runs, the last ranks get empty blocks.

    Returns
    -------
    ``slice(start, stop)``; ``slice(0, n_cells)`` when not distributed.
    """
    r = _rank() if rank is None else int(rank)
    w = _world_size() if world_size is None else int(world_size)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside world size {w}")
    if int(multiple) < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    runs = -(-int(n_cells) // int(multiple))
    start, stop = (min(runs * k // w * int(multiple), int(n_cells)) for k in (r, r + 1))
    return slice(start, stop)


def gather_blocks(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, on every rank (CPU tensors).

    With :func:`block` shares that is cell order. A process group whose only backend is NCCL
    (set up outside canal) cannot move CPU tensors: the rows then travel through this rank's
    GPU and come back to the CPU.
    """
    if not active():
        return tensor
    nccl_only = dist.get_backend() == "nccl"
    moved = tensor.to(f"cuda:{torch.cuda.current_device()}") if nccl_only else tensor
    out = torch.cat(all_gather_rows(moved))
    return out.to(tensor.device) if nccl_only else out


def agree(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` on every rank; if it raises on any rank, every rank raises.

    The rank where it failed re-raises its own error; the others raise a ``RuntimeError``
    naming the first failed rank and its error.
    """
    if not active():
        return fn(*args, **kwargs)
    failure: BaseException | None = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # reported to every rank below, then re-raised
        failure = err
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages,
                           None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    for r, message in enumerate(messages):
        if message is not None:
            raise RuntimeError(f"rank {r} failed: {message}")
    return result


def local_device(device: torch.device) -> torch.device:
    """``device``, with a bare ``cuda`` resolved to this rank's GPU when distributed.

    ``torchrun`` runs one process per GPU: rank ``LOCAL_RANK`` of a node uses ``cuda:LOCAL_RANK``
    (:func:`init` also makes that the current device).
    """
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", local_rank())
    return device
