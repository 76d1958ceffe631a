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
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from canal import distributed
from canal._settings import settings
from canal.continual.distill import Distiller
from canal.data import CellData
from canal.nn import CanalNet

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
    if config.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}")
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
    precision
        ``bf16`` runs forward passes under bfloat16 autocast (faster on recent CPUs and GPUs).
    cache_limit_gb
        Largest frozen-prefix cache kept in memory; above it, the prefix is recomputed per batch.
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
    precision: Literal["fp32", "bf16"] = "fp32"
    cache_limit_gb: float = 6.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got "
                             f"{self.strategy!r}")
        if self.trainable not in ("canal", "head", "all"):
            raise ValueError(f"trainable must be 'canal', 'head' or 'all', got {self.trainable!r}")
        check_loop_options(self)

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


@dataclass
class StageResult:
    """What a stage returns: its history and the final model's view of its training cells."""

    history: dict
    representations: torch.Tensor
    logits: torch.Tensor
    extras: dict = field(default_factory=dict)


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


def _lr_lambda(warmup: int, period: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) % period
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / period))

    return f


class _Inputs:
    """Per-cell inputs of the trained part: cached prefix states, or tokens when not cached.

    Only the cells ``index`` (default: all) are cached: under ``torchrun``, a rank's own cells.
    """

    def __init__(self, net: CanalNet, data: CellData, start: int, *, batch_size: int,
                 device: torch.device, limit_gb: float, autocast: bool,
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
            net.eval()
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                for idx, tokens in data.batches(batch_size, index=self.index):
                    h = net.encode(tokens.to(device), stop=start)
                    self.cache[torch.as_tensor(self.row[idx], device=device)] = h.float()
            self.seconds = time.perf_counter() - t0
            logger.info("cached %d cells x %d frozen layers (%.2f GB) in %.1fs",
                        len(self.index), start, need_gb, self.seconds)
        elif start > 0:
            logger.warning("frozen-prefix cache would take %.1f GB > cache_limit_gb; recomputing "
                           "frozen layers every batch", need_gb)

    def forward(self, net: CanalNet, idx: np.ndarray):
        if self.cache is not None:
            hidden = self.cache[torch.as_tensor(self.row[idx], device=self.device)]
            return net(hidden=hidden, start=self.start)
        tokens = self.data.tokens(idx).to(self.device)
        if self.start == 0:
            return net(tokens)
        with torch.no_grad():
            hidden = distributed.unwrap(net).encode(tokens, stop=self.start)
        return net(hidden=hidden, start=self.start)

    def outputs(self, net: CanalNet, idx: np.ndarray, *, batch_size: int, autocast: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode representations and logits of cells ``idx`` (no gradients)."""
        net.eval()
        reps, logits = [], []
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=autocast):
            for s in range(0, len(idx), batch_size):
                out = self.forward(net, idx[s:s + batch_size])
                reps.append(out.representation.float().cpu())
                logits.append(out.logits.float().cpu())
        if not reps:
            return torch.zeros(0, net.config.rep_dim), torch.zeros(0, net.head.n_classes)
        return torch.cat(reps), torch.cat(logits)


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
    n_classes = net.head.n_classes
    if data.labels.min() < 0 or data.labels.max() >= n_classes:
        raise ValueError("labels out of range of the classifier; grow the head first")
    t_start = time.perf_counter()
    autocast = config.precision == "bf16"
    net.to(device)
    params = set_trainable(net, config.trainable)
    start = trainable_start(net, config.trainable)
    train_idx, val_idx = stratified_split(data.labels, config.val_fraction, config.seed)
    # under torchrun: this rank's cells (a single process keeps them all)
    my_train = distributed.shard(train_idx, seed=config.seed)
    my_val = distributed.shard(val_idx, seed=config.seed, pad=False)
    inputs = _Inputs(net, data, start, batch_size=max(config.batch_size, 64), device=device,
                     limit_gb=config.cache_limit_gb, autocast=autocast,
                     index=np.union1d(my_train, my_val) if distributed.active() else None)
    if distiller is not None and distiller.active:
        teacher = distiller.teacher.to(device)
        if inputs.cache is not None and _same_prefix(teacher, net, start):
            reps, _ = inputs.outputs(teacher, inputs.index, batch_size=64, autocast=autocast)
        else:
            with torch.no_grad():
                reps = torch.cat([teacher(t.to(device)).representation.float().cpu()
                                  for _, t in data.batches(64, index=inputs.index)])
        distiller.set_targets(distributed.gather_cells(inputs.index, reps, data.n_cells)
                              .to(device))
    labels = torch.as_tensor(data.labels, device=device)
    model = distributed.wrap(net)  # DistributedDataParallel under torchrun
    steps_per_epoch = max(1, math.ceil(len(my_train) / config.batch_size))
    optimizer = torch.optim.Adam(params, lr=config.lr)
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(warmup, max(1, config.restart_epochs * steps_per_epoch)))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    gen = torch.Generator().manual_seed(config.seed)
    hist: dict = {"train_loss": [], "distill_loss": [], "val_accuracy": [], "val_loss": [],
                  "epoch_seconds": []}
    best_score, best_state, best_epoch, waited = (-1.0, -math.inf), None, 0, 0
    cells_seen, train_seconds = 0, 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + distributed.rank())  # dropout differs across ranks
        bar = tqdm(range(config.epochs), desc="stage", unit="epoch",
                   disable=not settings.progress or not distributed.is_main(), leave=False)
        for epoch in bar:
            t0 = time.perf_counter()
            net.train()
            order = my_train[torch.randperm(len(my_train), generator=gen).numpy()]
            tot, tot_d, n_b = 0.0, 0.0, 0
            for s in range(0, len(order), config.batch_size):
                idx = order[s:s + config.batch_size]
                with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                    out = inputs.forward(model, idx)
                    loss = criterion(out.logits.float(), labels[torch.as_tensor(idx)])
                d_loss = (distiller.loss(torch.as_tensor(idx, device=device),
                                         out.representation, n_all_types=n_classes)
                          if distiller is not None else loss.new_zeros(()))
                optimizer.zero_grad(set_to_none=True)
                (loss + d_loss).backward()
                optimizer.step()
                scheduler.step()
                tot += float(loss.detach())
                tot_d += float(d_loss.detach())
                n_b += 1
                cells_seen += len(idx)
            train_seconds += time.perf_counter() - t0
            tot, tot_d, n_b = distributed.sum_across([tot, tot_d, n_b])
            hist["train_loss"].append(tot / max(n_b, 1))
            hist["distill_loss"].append(tot_d / max(n_b, 1))
            if len(val_idx):
                _, vlog = inputs.outputs(net, my_val, batch_size=64, autocast=autocast)
                acc, vloss = _val_metrics(vlog, torch.as_tensor(data.labels[my_val]))
            else:
                acc, vloss = float("nan"), hist["train_loss"][-1]
            hist["val_accuracy"].append(acc)
            hist["val_loss"].append(vloss)
            hist["epoch_seconds"].append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}", val_acc=f"{acc:.3f}")
            # best = highest validation accuracy, ties (e.g. a majority-class plateau early on)
            # broken by lower validation loss
            score = (acc if len(val_idx) else 0.0, -vloss)
            if score > best_score:
                best_score, best_epoch, waited = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                waited += 1
                if len(val_idx) and waited >= config.patience:
                    break
        bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    reps, logits = inputs.outputs(net, inputs.index, batch_size=64, autocast=autocast)
    reps = distributed.gather_cells(inputs.index, reps, data.n_cells)
    logits = distributed.gather_cells(inputs.index, logits, data.n_cells)
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    hist.update(
        epochs_run=len(hist["train_loss"]), best_epoch=best_epoch,
        best_val_accuracy=best_score[0] if len(val_idx) else None,
        n_train=int(len(train_idx)), n_val=int(len(val_idx)), cached_layers=start,
        cache_seconds=inputs.seconds, train_seconds=train_seconds,
        train_cells_per_second=cells_seen * distributed.world_size() / max(train_seconds, 1e-9),
        wall_seconds=time.perf_counter() - t_start, world_size=distributed.world_size(),
    )
    return StageResult(history=hist, representations=reps, logits=logits)
