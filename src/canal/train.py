"""The one training loop for a stage, shared by every strategy.

CANAL's defaults: only the final norm, the second-to-last encoder layer and the head are trained;
label-smoothed cross-entropy; Adam with linear warm-up and cosine restarts; a stratified 20%
validation split; early stopping on validation accuracy with the best weights restored. The peak
learning rate is 1e-3 rather than CANAL's 2e-4 (set for the paper-size model): with the CPU
default model, 2e-4 left the first stage under-trained (pancreas stream, seed 0, 6 epochs:
closed-set accuracy on the unseen donor 0.867 at 2e-4 vs 0.933 at 1e-3, held-out accuracy of
the stages 0.942 vs 0.959, backward transfer +0.26 vs +0.04).

Layers before the first trainable one are frozen and have no dropout, so their output for a cell
does not change during the stage: it is computed once per stage (the frozen-prefix cache) and
every epoch starts from it. The teacher's representations are likewise computed once per stage.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from canal import distributed
from canal._settings import settings
from canal.data import Batch, CellData, panel_dropout
from canal.runtime import (
    BATCH_SIZE,
    autocast,
    check_precision,
    eval_mode,
    forward_cells,
    keep_heap,
)

if TYPE_CHECKING:
    from canal.continual.distill import Distiller
    from canal.nn import CanalNet, CellOutput

logger = logging.getLogger(__name__)

Strategy = Literal["canal", "naive", "replay", "distill", "joint"]
Trainable = Literal["canal", "head", "all"]

#: What each strategy uses: (replay from the bank, distillation, bank keeps every cell).
STRATEGIES: dict[str, tuple[bool, bool, bool]] = {
    "canal": (True, True, False),
    "naive": (False, False, False),
    "replay": (True, False, False),
    "distill": (False, True, False),
    "joint": (True, False, True),
}


def check_loop_options(config) -> None:
    """Checks shared by the training configs: ``precision``, ``val_fraction``, ``epochs``,
    ``batch_size``."""
    check_precision(config.precision)
    if not 0 <= config.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")


@dataclass(frozen=True)
class StageConfig:
    """Hyper-parameters of one fine-tuning stage (saved in the checkpoint history).

    Attributes
    ----------
    strategy
        ``canal`` (replay + distillation), ``naive`` (plain sequential fine-tuning), ``replay``,
        ``distill``, or ``joint`` (every cell of every stage so far: the upper bound).
    epochs, batch_size, lr
        Maximum epochs, cells per step (per process under ``torchrun``), peak learning rate
        (Adam; CANAL used 2e-4 with the paper-size model, see the module docstring).
    warmup_epochs, restart_epochs
        Linear warm-up length, then cosine annealing restarted every ``restart_epochs``.
    label_smoothing
        Cross-entropy label smoothing.
    val_fraction, patience
        Stratified validation share; epochs without improvement before stopping.
    trainable
        ``canal``: final norm + second-to-last encoder layer + head (CANAL/scBERT); ``head``:
        head only; ``all``: everything.
    bank_size, prototype
        Example-bank size L and how cells are ranked (see :class:`canal.continual.ExampleBank`).
    distill_weight
        lambda of the representation distillation (scaled by old/all types).
    panel_dropout, panel_dropout_cells
        Panel dropout: a share ``panel_dropout_cells`` of each batch's cells hide each of
        their measured genes with a probability drawn uniformly in ``[0, panel_dropout]`` per
        cell, with the not-measured semantics (no attention key, the head's ``unknown``
        value), so the model learns to read partial panels. ``0``: off (exact CANAL).
    novelty_score, novelty_fpr
        The calibrated novelty rule fitted after the stage on its validation cells: the score
        (see :func:`canal.novelty.novelty_scores`) and the share of known cells it rejects.
    precision
        ``bf16`` runs forward passes under bfloat16 autocast (faster on recent CPUs and GPUs).
    cache_limit_gb
        Largest frozen-prefix cache kept in memory; above it, the prefix is recomputed per batch.
    n_panel
        Genes of the panel a first stage chooses from its highly variable genes
        (``fit_stage(panel="hvg")``, CANAL's 1,000); later stages keep their panel.
    seed
        Seeds the split, the batch order, dropout and new classifier rows.
    """

    strategy: Strategy = "canal"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    restart_epochs: int = 5
    label_smoothing: float = 0.1
    val_fraction: float = 0.2
    patience: int = 4
    trainable: Trainable = "canal"
    bank_size: int = 1000
    prototype: Literal["classifier", "mean"] = "classifier"
    distill_weight: float = 0.1
    panel_dropout: float = 0.0
    panel_dropout_cells: float = 0.5
    novelty_score: Literal["knn", "mahalanobis", "relative_mahalanobis", "energy",
                           "max_logit", "msp"] = "knn"
    novelty_fpr: float = 0.05
    precision: Literal["fp32", "bf16"] = "fp32"
    cache_limit_gb: float = 6.0
    n_panel: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got "
                             f"{self.strategy!r}")
        if self.trainable not in ("canal", "head", "all"):
            raise ValueError(f"trainable must be 'canal', 'head' or 'all', got {self.trainable!r}")
        check_loop_options(self)
        if not 0 < self.novelty_fpr < 1:
            raise ValueError(f"novelty_fpr must be in (0, 1), got {self.novelty_fpr}")
        if self.n_panel < 1:
            raise ValueError(f"n_panel must be at least 1, got {self.n_panel}")
        if not 0 <= self.panel_dropout < 1 or not 0 <= self.panel_dropout_cells <= 1:
            raise ValueError(f"panel_dropout must be in [0, 1) and panel_dropout_cells in "
                             f"[0, 1], got {self.panel_dropout} and {self.panel_dropout_cells}")

    @property
    def uses_replay(self) -> bool:
        return STRATEGIES[self.strategy][0]

    @property
    def uses_distillation(self) -> bool:
        return STRATEGIES[self.strategy][1]

    @property
    def keeps_all(self) -> bool:
        return STRATEGIES[self.strategy][2]

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> StageConfig:
        return replace(self, **changes)


@dataclass
class StageResult:
    """What a stage returns: its history and the final model's view of its training cells."""

    history: dict
    representations: torch.Tensor
    logits: torch.Tensor
    #: the validation cells (rows of the stage's data not trained on)
    val_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def trainable_start(net: CanalNet, trainable: Trainable) -> int:
    """Index of the first encoder layer that is trained (layers before it are cached)."""
    depth = net.depth
    if trainable == "all":
        return 0
    if trainable == "head":
        return depth
    return max(depth - 2, 0)


def set_trainable(net: CanalNet, trainable: Trainable) -> list[nn.Parameter]:
    """Freeze the network but for the parts named by ``trainable``; returns those parameters.

    The masked-expression head ``to_out`` takes no part in classification and stays frozen
    (it would get no gradient anyway; DDP requires every trained parameter to get one).
    """
    for p in net.parameters():
        p.requires_grad_(trainable == "all")
    for p in net.to_out.parameters():
        p.requires_grad_(False)
    if trainable != "all":
        parts: list[nn.Module] = [net.head]
        if trainable == "canal":
            parts += [net.norm, net.performer.net.layers[max(net.depth - 2, 0)]]
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(True)
    return [p for p in net.parameters() if p.requires_grad]


def stratified_split(labels: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/validation split; types with < 2 cells stay in training."""
    idx = np.arange(len(labels))
    if fraction == 0:
        return idx, idx[:0]
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = idx[labels == c]
        if len(members) < 2:
            continue
        n_val = max(1, int(round(fraction * len(members))))
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else idx[:0]
    return np.setdiff1d(idx, val_idx), val_idx


class _Inputs:
    """Per-cell inputs of the trained part: cached prefix states, or tokens when not cached.

    Only the cells ``index`` (default: all) are cached: under ``torchrun``, a rank's own cells.
    A cell whose genes are hidden by panel dropout recomputes the frozen prefix with the
    smaller panel, so no hidden gene reaches any layer.
    """

    def __init__(self, net: CanalNet, data: CellData, start: int, *, batch_size: int,
                 device: torch.device, limit_gb: float, precision: str,
                 index: np.ndarray | None = None):
        self.net, self.data, self.start, self.device = net, data, start, device
        self.index = np.arange(data.n_cells) if index is None else np.unique(index)
        self.row = np.full(data.n_cells, -1, dtype=np.int64)  # cell -> cache row
        self.row[self.index] = np.arange(len(self.index))
        c = net.config
        need_gb = len(self.index) * c.seq_len * c.dim * 4 / 1e9
        self.cache: torch.Tensor | None = None
        self.seconds = 0.0
        if start > 0 and need_gb <= limit_gb:
            t0 = time.perf_counter()
            self.cache = torch.empty(len(self.index), c.seq_len, c.dim, dtype=torch.float32,
                                     device=device)
            with torch.no_grad(), eval_mode(net), autocast(device, precision):
                for idx, b in data.batches(batch_size, index=self.index):
                    b = b.to(device)
                    h = net.encode(b.tokens, present=b.present, stop=start)
                    self.cache[torch.as_tensor(self.row[idx], device=device)] = h.float()
            self.seconds = time.perf_counter() - t0
            logger.info("cached %d cells x %d frozen layers (%.2f GB) in %.1fs",
                        len(self.index), start, need_gb, self.seconds)
        elif start > 0:
            logger.warning("frozen-prefix cache would take %.1f GB > cache_limit_gb; recomputing "
                           "frozen layers every batch", need_gb)

    def _prefix(self, net, idx: np.ndarray, present: torch.Tensor | None) -> torch.Tensor:
        tokens = self.data.tokens(idx).to(self.device)
        with torch.no_grad():
            return distributed.unwrap(net).encode(tokens, present=present, stop=self.start)

    def forward(self, net, idx: np.ndarray, *, dropout=None):
        """The network's output for cells ``idx``; ``dropout(present, n)`` hides genes."""
        present = self.data.present(idx)
        changed = None
        if dropout is not None:
            present, changed = dropout(present, len(idx))
        if present is not None:
            present = present.to(self.device)
        if self.start == 0:
            return net(self.data.tokens(idx).to(self.device), present=present)
        if self.cache is None:
            return net(hidden=self._prefix(net, idx, present), present=present, start=self.start)
        hidden = self.cache[torch.as_tensor(self.row[idx], device=self.device)]
        if changed is not None and changed.any():
            rows = changed.to(self.device)
            hidden[rows] = self._prefix(net, idx[changed.numpy()], present[rows])
        return net(hidden=hidden, present=present, start=self.start)

    def batches(self, idx: np.ndarray, batch_size: int):
        """Batches of cells ``idx`` resuming at layer ``start`` (cached states or tokens)."""
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            present = self.data.present(part)
            if self.cache is not None:
                rows = torch.as_tensor(self.row[part], device=self.device)
                yield Batch(None, present, self.cache[rows])
            elif self.start > 0:
                p = None if present is None else present.to(self.device)
                yield Batch(None, present, self._prefix(self.net, part, p))
            else:
                yield Batch(self.data.tokens(part), present)

    def outputs(self, net: CanalNet, idx: np.ndarray, *, precision: str) -> CellOutput:
        """Eval-mode representations and logits of cells ``idx`` (no gradients)."""
        return forward_cells(net, self.batches(idx, BATCH_SIZE), n_cells=len(idx),
                             start=self.start, precision=precision, device=self.device)


def _same_prefix(a: CanalNet, b: CanalNet, start: int) -> bool:
    mods = lambda n: [n.token_emb, n.pos_emb, *n.performer.net.layers[:start]]  # noqa: E731
    for ma, mb in zip(mods(a), mods(b), strict=True):
        for pa, pb in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True):
            if not torch.equal(pa.to(pb.device), pb):
                return False
    return True


def _val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Validation accuracy and mean loss; under ``torchrun``, over every rank's cells."""
    if not distributed.active():
        return (float((logits.argmax(1) == labels).float().mean()),
                float(nn.functional.cross_entropy(logits, labels)))
    correct, loss, n = distributed.sum_across([
        float((logits.argmax(1) == labels).sum()),
        float(nn.functional.cross_entropy(logits, labels, reduction="sum")), len(labels)])
    return correct / n, loss / n


def lr_schedule(optimizer: torch.optim.Optimizer, *, warmup: int, period: int
                ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine annealing restarted every ``period``
    steps (down to 5% of the peak); shared by fine-tuning and pre-training."""
    warmup, period = max(1, int(warmup)), max(1, int(period))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) % period
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / period))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


@torch.no_grad()
def init_unknown(net: CanalNet, inputs: _Inputs, cells: np.ndarray) -> None:
    """Start the head's ``unknown`` values at each gene's mean scalar over ``cells`` where
    measured, so that a gene a query lacks reads as an average cell's, not as silence (as
    CellTypist and Symphony put missing genes at the reference mean). Genes measured in none
    of the cells keep 0. Under ``torchrun`` the mean is over every rank's cells."""
    total = torch.zeros(net.config.seq_len, dtype=torch.float64)
    count = torch.zeros(net.config.seq_len, dtype=torch.float64)
    with eval_mode(net):
        for batch in inputs.batches(cells, BATCH_SIZE):
            b = batch.to(inputs.device)
            h = net.encode(b.tokens, hidden=b.hidden, present=b.present,
                           start=inputs.start if b.hidden is not None else 0)
            z = net.head.gene_values(net.norm(h)).double().cpu()
            seen = (torch.ones_like(z, dtype=torch.bool) if b.present is None
                    else b.present.cpu())
            total += torch.where(seen, z, 0.0).sum(0)
            count += seen.sum(0)
    n = len(total)
    summed = torch.tensor(distributed.sum_across([*total.tolist(), *count.tolist()]),
                          dtype=torch.float64)
    total, count = summed[:n], summed[n:]
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    net.head.unknown.copy_(mean.to(net.head.unknown))


def _teacher_targets(distiller: Distiller, net: CanalNet, data: CellData, inputs: _Inputs,
                     start: int, precision: str, device: torch.device) -> None:
    """Give the distiller its targets: the teacher's representation of every cell, once."""
    teacher = distiller.teacher.to(device)
    if inputs.cache is not None and _same_prefix(teacher, net, start):
        batches, first = inputs.batches(inputs.index, BATCH_SIZE), start  # shared frozen prefix
    else:
        batches, first = (b for _, b in data.batches(BATCH_SIZE, index=inputs.index)), 0
    reps = distiller.precompute(batches, n_cells=len(inputs.index), start=first,
                                precision=precision, device=device)
    distiller.set_targets(distributed.gather_cells(inputs.index, reps, data.n_cells).to(device))


class _EarlyStopping:
    """Best = highest validation accuracy, ties (e.g. a majority-class plateau early on) broken
    by lower validation loss; keeps the best weights."""

    def __init__(self, patience: int, use_val: bool):
        self.patience, self.use_val = patience, use_val
        self.best, self.state, self.epoch, self.waited = (-1.0, -math.inf), None, 0, 0

    def step(self, net: nn.Module, epoch: int, acc: float, loss: float) -> bool:
        """Record an epoch; ``True`` when training should stop."""
        score = (acc if self.use_val else 0.0, -loss)
        if score > self.best:
            self.best, self.epoch, self.waited = score, epoch, 0
            self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            return False
        self.waited += 1
        return self.use_val and self.waited >= self.patience

    def restore(self, net: nn.Module) -> None:
        if self.state is not None:
            net.load_state_dict(self.state)


@keep_heap()
def run_stage(net: CanalNet, data: CellData, *, config: StageConfig,
              distiller: Distiller | None = None, device: torch.device | None = None
              ) -> StageResult:
    """Train ``net`` in place on labelled cells ``data`` (new cells and replayed bank cells).

    In a process group (``torchrun``, see :mod:`canal.distributed`) every rank holds all of
    ``data``, trains on its own share of it (gradients all-reduced by DDP), and gets the same
    history, the same final weights and the representations of every cell.

    Returns
    -------
    A :class:`StageResult` with the stage history and the final (best) model's representations
    and logits of every cell of ``data``, in order (used to refill the bank and calibrate
    novelty thresholds without another pass).
    """
    if data.labels is None:
        raise ValueError("training cells need labels")
    device = device or settings.torch_device()
    if data.labels.min() < 0 or data.labels.max() >= net.head.n_classes:
        raise ValueError("labels out of range of the classifier; grow the head first")
    t_start = time.perf_counter()
    net.to(device)
    params = set_trainable(net, config.trainable)
    if data.fully_measured and config.panel_dropout == 0:
        # no cell lacks a gene: `unknown` takes no part (and DDP needs every parameter used)
        net.head.unknown.requires_grad_(False)
        params = [p for p in params if p is not net.head.unknown]
    start = trainable_start(net, config.trainable)
    train_idx, val_idx = stratified_split(data.labels, config.val_fraction, config.seed)
    # under torchrun: this rank's cells (a single process keeps them all)
    my_train = distributed.shard(train_idx, seed=config.seed)
    my_val = distributed.shard(val_idx, seed=config.seed, pad=False)
    inputs = _Inputs(net, data, start, batch_size=max(config.batch_size, BATCH_SIZE),
                     device=device, limit_gb=config.cache_limit_gb, precision=config.precision,
                     index=np.union1d(my_train, my_val) if distributed.active() else None)
    if distiller is not None and distiller.active:
        _teacher_targets(distiller, net, data, inputs, start, config.precision, device)
    if not net.head.unknown.any():  # a head that never read a partial panel
        init_unknown(net, inputs, my_train)

    steps_per_epoch = max(1, math.ceil(len(my_train) / config.batch_size))
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = lr_schedule(optimizer, warmup=config.warmup_epochs * steps_per_epoch,
                            period=config.restart_epochs * steps_per_epoch)
    loop = _Epoch(distributed.wrap(net), inputs, data, config, optimizer, scheduler, distiller,
                  device)
    stopper = _EarlyStopping(config.patience, use_val=len(val_idx) > 0)
    hist: dict = {"train_loss": [], "distill_loss": [], "val_accuracy": [], "val_loss": [],
                  "epoch_seconds": []}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + distributed.rank())  # dropout differs across ranks
        bar = tqdm(range(config.epochs), desc="stage", unit="epoch",
                   disable=not settings.progress or not distributed.is_main(), leave=False)
        for epoch in bar:
            t0 = time.perf_counter()
            loss, d_loss = loop.train(my_train)
            acc, vloss = loop.validate(my_val) if len(val_idx) else (float("nan"), loss)
            for key, v in zip(hist, (loss, d_loss, acc, vloss, time.perf_counter() - t0),
                              strict=True):
                hist[key].append(v)
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{acc:.3f}")
            if stopper.step(net, epoch, acc, vloss):
                break
        bar.close()
    stopper.restore(net)
    out = inputs.outputs(net, inputs.index, precision=config.precision)
    reps = distributed.gather_cells(inputs.index, out.representation, data.n_cells)
    logits = distributed.gather_cells(inputs.index, out.logits, data.n_cells)
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    hist.update(
        epochs_run=len(hist["train_loss"]), best_epoch=stopper.epoch,
        best_val_accuracy=stopper.best[0] if len(val_idx) else None,
        n_train=int(len(train_idx)), n_val=int(len(val_idx)), cached_layers=start,
        cache_seconds=inputs.seconds, train_seconds=loop.seconds,
        train_cells_per_second=loop.cells * distributed.world_size() / max(loop.seconds, 1e-9),
        wall_seconds=time.perf_counter() - t_start, world_size=distributed.world_size(),
    )
    return StageResult(history=hist, representations=reps, logits=logits, val_index=val_idx)


class _Epoch:
    """One epoch of training (and of validation) over a stage's cells."""

    def __init__(self, model, inputs: _Inputs, data: CellData, config: StageConfig, optimizer,
                 scheduler, distiller: Distiller | None, device: torch.device):
        self.model, self.inputs, self.config, self.device = model, inputs, config, device
        self.net = distributed.unwrap(model)
        self.optimizer, self.scheduler, self.distiller = optimizer, scheduler, distiller
        self.labels = torch.as_tensor(data.labels, device=device)
        self.val_labels = torch.as_tensor(data.labels)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.order_gen = torch.Generator().manual_seed(config.seed)
        self.drop_gen = torch.Generator().manual_seed(config.seed + 7919 * (1 + distributed.rank()))
        self.n_genes = data.X.shape[1]
        self.seconds, self.cells = 0.0, 0

    def _dropout(self, present, n):
        return panel_dropout(present, n, self.n_genes, rate=self.config.panel_dropout,
                             share=self.config.panel_dropout_cells, generator=self.drop_gen)

    def train(self, cells: np.ndarray) -> tuple[float, float]:
        """One pass over ``cells`` in a seeded order; mean classification and distill loss."""
        t0 = time.perf_counter()
        self.net.train()
        order = cells[torch.randperm(len(cells), generator=self.order_gen).numpy()]
        dropout = self._dropout if self.config.panel_dropout > 0 else None
        n_classes = self.net.head.n_classes
        tot, tot_d, n_b = 0.0, 0.0, 0
        for s in range(0, len(order), self.config.batch_size):
            idx = order[s:s + self.config.batch_size]
            with autocast(self.device, self.config.precision):
                out = self.inputs.forward(self.model, idx, dropout=dropout)
                loss = self.criterion(out.logits.float(), self.labels[torch.as_tensor(idx)])
            d_loss = (self.distiller.loss(torch.as_tensor(idx, device=self.device),
                                          out.representation, n_all_types=n_classes)
                      if self.distiller is not None else loss.new_zeros(()))
            self.optimizer.zero_grad(set_to_none=True)
            (loss + d_loss).backward()
            self.optimizer.step()
            self.scheduler.step()
            tot += float(loss.detach())
            tot_d += float(d_loss.detach())
            n_b += 1
            self.cells += len(idx)
        self.seconds += time.perf_counter() - t0
        tot, tot_d, n_b = distributed.sum_across([tot, tot_d, n_b])
        return tot / max(n_b, 1), tot_d / max(n_b, 1)

    def validate(self, cells: np.ndarray) -> tuple[float, float]:
        out = self.inputs.outputs(self.net, cells, precision=self.config.precision)
        return _val_metrics(out.logits, self.val_labels[torch.as_tensor(cells)])
