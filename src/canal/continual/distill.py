"""Representation knowledge distillation: keep the new model's cell representation close to the
previous stage's.

The distiller owns a frozen snapshot of the previous stage's network (the teacher). Since the
teacher never changes during a stage and runs without dropout, its representation of a cell is
a constant: it is computed once per stage per cell (:meth:`Distiller.precompute`), not on every
batch of every epoch.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from canal.runtime import forward_cells

if TYPE_CHECKING:
    from collections.abc import Iterable

    from canal.data import Batch

logger = logging.getLogger(__name__)


class Distiller:
    """MSE between current and previous representations, weighted lambda * old/all types.

    Parameters
    ----------
    weight
        CANAL's lambda (default 0.1).
    """

    def __init__(self, weight: float = 0.1):
        if weight < 0:
            raise ValueError(f"distillation weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.teacher: nn.Module | None = None
        self.n_old = 0
        self.targets: torch.Tensor | None = None

    def snapshot(self, net: nn.Module, *, n_old_types: int) -> None:
        """Freeze a copy of ``net`` (before the stage) as the teacher."""
        if n_old_types == 0:
            self.teacher = None
            self.n_old = 0
            return
        self.teacher = copy.deepcopy(net).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.n_old = int(n_old_types)

    @property
    def active(self) -> bool:
        return self.teacher is not None and self.weight > 0

    def scale(self, n_all_types: int) -> float:
        """lambda * (old types / all types); 0 at stage 1 (no teacher)."""
        if not self.active or n_all_types == 0:
            return 0.0
        return self.weight * self.n_old / n_all_types

    def precompute(self, batches: Iterable[Batch], *, n_cells: int, start: int = 0,
                   precision: str = "fp32", device: torch.device | None = None) -> torch.Tensor:
        """The teacher's representation of every cell in ``batches`` (one pass, no gradients).

        ``start > 0``: the batches carry hidden states of layer ``start - 1`` that the teacher
        shares with the student (frozen layers), so only its later layers run.
        """
        if self.teacher is None:
            raise ValueError("no teacher: call snapshot(net, n_old_types=...) first")
        return forward_cells(self.teacher, batches, n_cells=n_cells, start=start,
                             precision=precision, device=device).representation

    def set_targets(self, representations: torch.Tensor) -> None:
        """Teacher representations of every training cell, in training-set order."""
        self.targets = representations.detach().float()

    def loss(self, index: torch.Tensor, representation: torch.Tensor, *,
             n_all_types: int) -> torch.Tensor:
        """Weighted MSE between the student's representations and the teacher's for ``index``."""
        scale = self.scale(n_all_types)
        if scale == 0.0 or self.targets is None:
            return representation.new_zeros(())
        target = self.targets[index].to(representation.device)
        return scale * nn.functional.mse_loss(representation.float(), target)
