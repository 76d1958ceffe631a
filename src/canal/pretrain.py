"""Masked-expression pre-training on unlabeled cells, and gene-embedding initialisation.

As in scBERT: a share of each cell's gene tokens (default 15%) is hidden — replaced by the mask
token (or, optionally, kept or replaced by a random bin) — and the network predicts the hidden
expression bins from the others with a cross-entropy head (``CanalNet.to_out``). Every layer is
trained. Labels are never read.

Progress is measured on held-out cells whose masks are drawn once, so the masked-token accuracy
of successive evaluations is comparable; it is reported next to the majority-bin baseline (always
guessing the most common bin), overall and on expressed tokens (bin >= 1), where the baseline is
the most common non-zero bin.

Runs are resumable: the state after every ``checkpoint_every`` steps (weights, optimizer, step,
history) is handed to a callback that writes it atomically; the batch order of an epoch and the
masks of a step are functions of (seed, epoch) and (seed, step), so a run resumed from step ``s``
continues exactly as the uninterrupted run would have.

Gene embeddings (scBERT's ``pos_emb``) can be initialised in the spirit of gene2vec from the
corpus itself (:func:`corpus_gene_embedding`: genes that co-express get nearby vectors) or read
from a gene2vec-style text file keyed by gene symbol (:func:`read_gene_embedding`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import tqdm

from canal import distributed, pp
from canal._settings import settings
from canal.data import CellData, panel_dropout
from canal.runtime import keep_heap
from canal.train import check_loop_options

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from canal.nn import CanalNet

logger = logging.getLogger(__name__)

MaskOn = Literal["all", "expressed", "balanced"]


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of masked-expression pre-training (saved in the checkpoint).

    Attributes
    ----------
    epochs, batch_size, lr
        Passes over the corpus, cells per step (per process under ``torchrun``), peak learning
        rate (AdamW).
    max_steps
        Stop after this many optimizer steps (``None``: ``epochs`` full passes).
    warmup_steps
        Linear warm-up, then cosine decay to 5% of ``lr`` at the last step.
    weight_decay
        AdamW weight decay.
    mask_prob
        Share of a cell's gene tokens that are hidden (the extra per-cell token never is).
    mask_on
        Which tokens may be hidden: ``"all"`` (scBERT: expressed and unexpressed genes alike),
        ``"expressed"`` (bin >= 1 only) or ``"balanced"`` (expressed tokens at ``mask_prob``,
        unexpressed ones as often in number, so both kinds weigh the same in the loss).
    replace_prob
        Share of hidden tokens replaced by the mask token (scBERT: 0.9); of the others,
        ``random_token_prob`` get a random bin and the rest keep their bin.
    random_token_prob
        See ``replace_prob``.
    panel_dropout
        Half of each batch's cells hide each measured gene with a probability drawn in
        ``[0, panel_dropout]`` per cell, as not measured (see ``StageConfig.panel_dropout``).
    val_fraction, val_max_cells
        Held-out cells (seeded) for the masked-token accuracy, at most ``val_max_cells``.
    eval_every
        Evaluate on the held-out cells every this many steps (and at the end).
    checkpoint_every
        Hand the resumable state to the checkpoint callback every this many steps.
    precision
        ``"bf16"`` autocasts the matrix products (about 2x on recent CPUs); ``"fp32"`` is exact.
    seed
        Seeds the held-out split, batch order, masks and validation masks.
    """

    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    mask_prob: float = 0.15
    mask_on: MaskOn = "all"
    replace_prob: float = 0.9
    random_token_prob: float = 0.0
    panel_dropout: float = 0.0
    val_fraction: float = 0.05
    val_max_cells: int = 1000
    eval_every: int = 200
    checkpoint_every: int = 200
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_on not in ("all", "expressed", "balanced"):
            raise ValueError(f"mask_on must be 'all', 'expressed' or 'balanced', got "
                             f"{self.mask_on!r}")
        if not (0 <= self.replace_prob <= 1 and 0 <= self.random_token_prob <= 1
                and self.replace_prob + self.random_token_prob <= 1):
            raise ValueError("replace_prob and random_token_prob must be in [0, 1] and sum to "
                             "at most 1")
        check_loop_options(self)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1 (or None)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------


def mask_tokens(tokens: torch.Tensor, config: PretrainConfig, *, generator: torch.Generator,
                present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide a share of each cell's gene tokens.

    Parameters
    ----------
    tokens
        ``(cells, n_genes + 1)`` token ids (the last column is the extra per-cell token).
    config
        ``mask_prob``, ``mask_on``, ``replace_prob``, ``random_token_prob``.
    generator
        CPU generator: the same generator state gives the same masks.
    present
        ``(cells, n_genes + 1)`` bool, genes measured (``None``: all); a gene not measured is
        never hidden (there is nothing to predict).

    Returns
    -------
    ``(inputs, hidden)``: the corrupted tokens and a boolean mask of the hidden positions (the
    targets are ``tokens[hidden]``). Every cell has at least one hidden token.
    """
    _n_cells, seq = tokens.shape
    genes = torch.zeros(seq, dtype=torch.bool)
    genes[:-1] = True  # never hide the extra per-cell token
    if present is not None:
        genes = genes & present
    expressed = (tokens > 0) & genes
    u = torch.rand(tokens.shape, generator=generator)
    if config.mask_on == "all":
        hidden = (u < config.mask_prob) & genes
    elif config.mask_on == "expressed":
        hidden = (u < config.mask_prob) & expressed
    else:  # balanced: as many unexpressed as expressed tokens, in expectation
        n_expr = expressed.sum(1, keepdim=True).float()
        n_zero = (genes.sum(-1, keepdim=True) - n_expr).clamp(min=1)
        p_zero = (config.mask_prob * n_expr / n_zero).clamp(max=1.0)
        hidden = ((u < config.mask_prob) & expressed) | ((u < p_zero) & genes & ~expressed)
    # at least one hidden token per cell (a cell with none would contribute nothing)
    none = ~hidden.any(1)
    if none.any():
        eligible = expressed if config.mask_on == "expressed" else genes.expand_as(tokens)
        eligible = eligible[none] | (~eligible[none].any(1, keepdim=True) & genes)
        pick = torch.multinomial(eligible.float(), 1, generator=generator).squeeze(1)
        hidden[none.nonzero().squeeze(1), pick] = True
    inputs = tokens.clone()
    v = torch.rand(tokens.shape, generator=generator)
    to_mask = hidden & (v < config.replace_prob)
    to_random = hidden & (v >= config.replace_prob) & (
        v < config.replace_prob + config.random_token_prob)
    inputs[to_mask] = pp.MASK_TOKEN
    if to_random.any():
        inputs[to_random] = torch.randint(0, pp.N_BINS, (int(to_random.sum()),),
                                          generator=generator)
    return inputs, hidden


def masked_logits(net: CanalNet, inputs: torch.Tensor, hidden: torch.Tensor,
                  present: torch.Tensor | None = None, genes: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Bin logits at the hidden positions only, ``(n_hidden, n_tokens)``.

    The masked-expression head runs on the hidden positions alone (15% of the tokens), not on
    the whole sequence. Genes not measured (``present`` False) are no attention keys.
    ``genes``: each cell's vocabulary rows (see :meth:`canal.nn.CanalNet.embed`).
    """
    h = net.encode(inputs, present=present, genes=genes)
    return net.to_out(net.norm(h[hidden]))


class _MLM(nn.Module):
    """Wraps the network so that DDP sees one forward call (encoder + masked head)."""

    def __init__(self, net: CanalNet):
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor,
                present: torch.Tensor | None = None, genes: torch.Tensor | None = None
                ) -> torch.Tensor:
        return masked_logits(self.net, inputs, hidden, present, genes)


class GeneSetSampler:
    """Each cell's gene panel for pre-training over a vocabulary: ``n_genes`` genes drawn from
    those its dataset measures, weighted toward variable genes.

    A gene's weight in a dataset is the variance of its log-expression over the dataset's cells
    plus ``floor`` times the mean variance (so every measured gene is drawn now and then);
    genes the dataset does not measure weigh 0. Cells of one dataset in a batch share the
    panel drawn for it. A dataset measuring fewer than ``n_genes`` genes reads all of them,
    and the remaining positions hold other vocabulary genes marked not measured.

    Parameters
    ----------
    data
        Cells on the vocabulary (one column per vocabulary gene; ``measured`` per dataset).
    n_genes
        Genes per cell's panel (the network's ``n_genes``).
    floor
        See above.
    """

    def __init__(self, data: CellData, n_genes: int, *, floor: float = 0.1):
        self.data = data
        self.n_genes = int(n_genes)
        n_vocab = data.X.shape[1]
        if self.n_genes > n_vocab:
            raise ValueError(f"the vocabulary has {n_vocab} genes, fewer than the panel's "
                             f"{self.n_genes}")
        groups = (np.zeros(data.n_cells, dtype=np.int64) if data.group is None
                  else data.group)
        measured = (np.ones((1, n_vocab), dtype=bool) if data.measured is None
                    else data.measured)
        self.groups = groups
        weights = np.zeros(measured.shape)
        for g in range(len(measured)):
            X = data.X[np.flatnonzero(groups == g)]
            if X.shape[0] == 0:
                continue
            mean = np.asarray(X.mean(axis=0)).ravel()
            var = np.clip(np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2, 0, None)
            var = np.where(measured[g], var, 0.0)
            level = var[measured[g]].mean() if measured[g].any() else 0.0
            weights[g] = np.where(measured[g], var + floor * max(level, 1e-12), 0.0)
        self.weights = torch.from_numpy(weights)
        self.measured = torch.from_numpy(measured)

    def draw(self, index: np.ndarray, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Tokens, key mask and vocabulary rows of cells ``index``.

        Returns
        -------
        ``(tokens, present, genes)``: ``(cells, n_genes + 1)`` token ids, the
        ``(cells, n_genes + 1)`` key mask (``None`` when every drawn gene is measured) and
        ``(cells, n_genes)`` vocabulary rows.
        """
        index = np.asarray(index)
        n = self.n_genes
        tokens = torch.zeros(len(index), n + 1, dtype=torch.int64)
        genes = torch.zeros(len(index), n, dtype=torch.int64)
        present = torch.ones(len(index), n + 1, dtype=torch.bool)
        cell_groups = self.groups[index]
        for g in np.unique(cell_groups):
            rows = np.flatnonzero(cell_groups == g)
            w = self.weights[int(g)]
            k = min(n, int((w > 0).sum()))
            pick = torch.multinomial(w, k, replacement=False, generator=generator)
            if k < n:  # pad with genes the dataset does not measure
                others = torch.nonzero(w <= 0).squeeze(1)
                fill = others[torch.randperm(len(others), generator=generator)[:n - k]]
                pick = torch.cat([pick, fill])
                present[torch.from_numpy(rows), k:n] = False
            block = self.data.X[index[rows]][:, pick.numpy()]
            tokens[torch.from_numpy(rows)] = pp.bin_tokens(block)
            genes[torch.from_numpy(rows)] = pick
        return tokens, None if present.all() else present, genes


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class _Validation:
    """Held-out cells with masks drawn once; the majority-bin baselines come from training."""

    inputs: torch.Tensor
    hidden: torch.Tensor
    targets: torch.Tensor
    majority_bin: int
    majority_expressed_bin: int
    present: torch.Tensor | None = None
    #: vocabulary rows of each held-out cell's gene tokens (pre-training over a vocabulary)
    genes: torch.Tensor | None = None

    @classmethod
    def build(cls, data: CellData, index: np.ndarray, train_index: np.ndarray,
              config: PretrainConfig, sampler: GeneSetSampler | None = None) -> _Validation:
        gen = torch.Generator().manual_seed(int(config.seed) * 7919 + 17)
        genes = None
        if sampler is None:
            tokens = data.tokens(np.sort(index))
            present = data.present(np.sort(index))
        else:  # panels drawn once, so that successive evaluations are comparable
            tokens, present, genes = sampler.draw(np.sort(index), gen)
        inputs, hidden = mask_tokens(tokens, config, generator=gen, present=present)
        # bin frequencies over (a sample of) the training cells' measured gene tokens
        rng = np.random.default_rng(config.seed)
        sample = np.sort(rng.choice(train_index, size=min(len(train_index), 2000),
                                    replace=False))
        if sampler is None:
            sample_tokens = data.tokens(sample)[:, :-1]
            measured = torch.from_numpy(data.measured_rows(sample))
        else:
            sample_tokens, sample_present, _ = sampler.draw(sample, gen)
            sample_tokens = sample_tokens[:, :-1]
            measured = (torch.ones_like(sample_tokens, dtype=torch.bool)
                        if sample_present is None else sample_present[:, :-1])
        counts = torch.bincount(sample_tokens[measured], minlength=pp.N_BINS)[:pp.N_BINS]
        return cls(inputs=inputs, hidden=hidden, targets=tokens[hidden],
                   majority_bin=int(counts.argmax()),
                   majority_expressed_bin=int(counts[1:].argmax()) + 1, present=present,
                   genes=genes)

    @torch.no_grad()
    def evaluate(self, net: CanalNet, *, device: torch.device, autocast: bool,
                 batch_size: int = 64) -> dict[str, float]:
        was_training = net.training
        net.eval()
        preds, losses = [], []
        for s in range(0, len(self.inputs), batch_size):
            inp = self.inputs[s:s + batch_size].to(device)
            hid = self.hidden[s:s + batch_size].to(device)
            pres = None if self.present is None else self.present[s:s + batch_size].to(device)
            genes = None if self.genes is None else self.genes[s:s + batch_size].to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                logits = masked_logits(net, inp, hid, pres, genes).float()
            tgt = self.targets_for(s, s + batch_size).to(device)
            losses.append(nn.functional.cross_entropy(logits, tgt, reduction="sum").cpu())
            preds.append(logits.argmax(1).cpu())
        net.train(was_training)
        pred = torch.cat(preds)
        tgt = self.targets
        expr = tgt >= 1
        return {
            "val_loss": float(torch.stack(losses).sum() / max(len(tgt), 1)),
            "val_accuracy": float((pred == tgt).float().mean()),
            "val_baseline_accuracy": float((tgt == self.majority_bin).float().mean()),
            "val_expressed_accuracy": float((pred[expr] == tgt[expr]).float().mean())
            if expr.any() else float("nan"),
            "val_expressed_baseline_accuracy":
                float((tgt[expr] == self.majority_expressed_bin).float().mean())
                if expr.any() else float("nan"),
            "val_hidden_tokens": int(len(tgt)),
        }

    def targets_for(self, start: int, stop: int) -> torch.Tensor:
        """Targets of the hidden tokens of held-out cells ``start:stop`` (row-major order)."""
        before = int(self.hidden[:start].sum())
        n = int(self.hidden[start:stop].sum())
        return self.targets[before:before + n]


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def held_out(n_cells: int, config: PretrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded training / held-out cell indices."""
    rng = np.random.default_rng([int(config.seed), 3])
    perm = rng.permutation(n_cells)
    n_val = min(int(round(config.val_fraction * n_cells)), config.val_max_cells)
    if config.val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= n_cells:
        raise ValueError(f"{n_cells} cells are too few to hold out {n_val} for validation; "
                         "pass more cells or a smaller val_fraction")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@keep_heap()
def run_pretraining(
    net: CanalNet,
    data: CellData,
    *,
    config: PretrainConfig,
    state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Pre-train ``net`` in place by masked-expression modelling on the cells of ``data``.

    Parameters
    ----------
    net
        The network; every parameter is trained except the classification head.
    data
        Cells on the network's gene panel (labels, if any, are ignored); for a network with a
        gene vocabulary (``net.vocab``), cells on the vocabulary: each batch then reads, per
        cell, a panel of ``n_genes`` genes its dataset measures (:class:`GeneSetSampler`), so
        the encoder is tied to no one panel.
    config
        :class:`PretrainConfig`.
    state
        A state returned by an earlier, interrupted call (or handed to ``on_checkpoint``): the
        run resumes from its step, with its optimizer state and history.
    on_checkpoint
        Called with the resumable state every ``config.checkpoint_every`` steps (on every rank
        under ``torchrun``; the callee writes from rank 0 only).
    device
        Torch device (default ``canal.settings.device``).

    Returns
    -------
    The final state: ``step``, ``total_steps``, ``done``, ``history`` (training loss per
    logged interval and held-out metrics per evaluation), ``final`` (the last held-out metrics),
    timings and the ``optimizer`` state dict.
    """
    device = device or settings.torch_device()
    net.to(device)
    autocast = config.precision == "bf16"
    train_idx, val_idx = held_out(data.n_cells, config)
    mine = distributed.shard(train_idx, seed=config.seed)
    steps_per_epoch = max(1, math.ceil(len(mine) / config.batch_size))
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    for p in net.parameters():
        p.requires_grad_(True)
    for p in net.head.parameters():  # the classifier takes no part in pre-training
        p.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    state = dict(state or {})
    step = int(state.get("step", 0))
    history: dict[str, list] = state.get("history") or {"train": [], "val": []}
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    seconds = float(state.get("train_seconds", 0.0))
    cells_seen = int(state.get("cells_seen", 0))
    if step >= total:
        logger.info("pre-training already finished (%d steps)", step)
    sampler = None
    if net.vocab is not None:
        if data.X.shape[1] != net.config.n_vocab:
            raise ValueError(f"the cells have {data.X.shape[1]} genes and the network's "
                             f"vocabulary {net.config.n_vocab}; read them on the vocabulary")
        sampler = GeneSetSampler(data, net.config.n_genes)
    elif data.X.shape[1] != net.config.n_genes:
        raise ValueError(f"the cells have {data.X.shape[1]} genes and the network's panel "
                         f"{net.config.n_genes}; read them on the panel")
    val = (_Validation.build(data, val_idx, train_idx, config, sampler) if len(val_idx)
           else None)
    model = distributed.wrap(_MLM(net))
    warmup = min(config.warmup_steps, max(1, total // 10))

    def snapshot(done: bool) -> dict[str, Any]:
        return {"step": step, "total_steps": total, "done": done, "history": history,
                "optimizer": optimizer.state_dict(), "train_seconds": seconds,
                "cells_seen": cells_seen, "n_train": int(len(train_idx)),
                "n_val": int(len(val_idx)), "world_size": distributed.world_size(),
                "final": history["val"][-1] if history["val"] else None}

    def evaluate() -> None:
        if val is None:
            return
        m = val.evaluate(net, device=device, autocast=autocast)
        m["step"] = step
        history["val"].append(m)
        logger.info("step %d: held-out masked accuracy %.4f (majority bin %.4f), expressed "
                    "%.4f (majority %.4f), loss %.4f", step, m["val_accuracy"],
                    m["val_baseline_accuracy"], m["val_expressed_accuracy"],
                    m["val_expressed_baseline_accuracy"], m["val_loss"])

    if step == 0 and not history["val"]:
        evaluate()  # the untrained model, for reference
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", leave=False,
               disable=not settings.progress or not distributed.is_main())
    net.train()
    loss_sum, loss_n = 0.0, 0
    epoch = step // steps_per_epoch
    while step < total:
        order = mine[np.random.default_rng([int(config.seed), 5, epoch]).permutation(len(mine))]
        first = step - epoch * steps_per_epoch
        for b in range(first, steps_per_epoch):
            if step >= total:
                break
            t0 = time.perf_counter()
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            gen = torch.Generator().manual_seed(
                int(config.seed) * 1_000_003 + step * 101 + distributed.rank())
            if sampler is None:
                tokens, present, genes = data.tokens(idx), data.present(idx), None
            else:
                tokens, present, genes = sampler.draw(idx, gen)
            present, _ = panel_dropout(present, len(idx), net.config.n_genes,
                                       rate=config.panel_dropout, share=0.5, generator=gen)
            inputs, hidden = mask_tokens(tokens, config, generator=gen, present=present)
            targets = tokens[hidden]
            for g in optimizer.param_groups:
                g["lr"] = config.lr * _lr_factor(step, warmup=warmup, total=total)
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                logits = model(inputs.to(device), hidden.to(device),
                               None if present is None else present.to(device),
                               None if genes is None else genes.to(device))
            loss = nn.functional.cross_entropy(logits.float(), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            cells_seen += len(idx)
            seconds += time.perf_counter() - t0
            loss_sum += float(loss.detach())
            loss_n += 1
            bar.update(1)
            if step % 50 == 0 or step == total:
                mean = distributed.sum_across([loss_sum, loss_n])
                history["train"].append({"step": step, "loss": mean[0] / max(mean[1], 1),
                                         "lr": optimizer.param_groups[0]["lr"]})
                bar.set_postfix(loss=f"{history['train'][-1]['loss']:.4f}")
                loss_sum, loss_n = 0.0, 0
            if step % config.eval_every == 0 and step < total:
                evaluate()
                net.train()
            if on_checkpoint is not None and step % config.checkpoint_every == 0 and step < total:
                on_checkpoint(snapshot(done=False))
        epoch += 1
    bar.close()
    if not history["val"] or history["val"][-1]["step"] != step:
        evaluate()
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    final = snapshot(done=True)
    final["cells_per_second"] = cells_seen * distributed.world_size() / max(seconds, 1e-9)
    if on_checkpoint is not None:
        on_checkpoint(final)
    return final


# --------------------------------------------------------------------------------------------
# gene embeddings
# --------------------------------------------------------------------------------------------


def corpus_gene_embedding(X: sp.spmatrix | np.ndarray, dim: int, *, seed: int = 0,
                          max_cells: int = 20000) -> np.ndarray:
    """Gene vectors from co-expression: a truncated eigendecomposition of the gene correlation.

    ``C = V diag(s) V^T`` for the genes x genes Pearson correlation of log-expression over the
    corpus cells; the embedding ``V[:, :dim] * sqrt(s[:dim])`` makes the dot product of two
    genes' vectors approximate their correlation, so co-expressed genes get nearby vectors (the
    idea of gene2vec, from this corpus instead of GEO). Scaled to unit standard deviation per
    entry, as ``nn.Embedding`` initialises. Genes never expressed in the corpus get small random
    vectors (seeded).

    Parameters
    ----------
    X
        Cells x panel genes, log-normalized.
    dim
        Embedding size (the model's ``dim``).
    seed
        Seed for the cell sample and the vectors of unexpressed genes.
    max_cells
        Cells sampled to estimate the correlation.

    Returns
    -------
    A ``(genes, dim)`` float32 array.
    """
    X = sp.csr_matrix(X, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if X.shape[0] > max_cells:
        X = X[np.sort(rng.choice(X.shape[0], max_cells, replace=False))]
    n, _g = X.shape
    mean = np.asarray(X.mean(axis=0)).ravel()
    cov = (X.T @ X).toarray() / n - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    live = sd > 1e-8
    corr = np.zeros_like(cov)
    corr[np.ix_(live, live)] = cov[np.ix_(live, live)] / np.outer(sd[live], sd[live])
    vals, vecs = np.linalg.eigh(corr)
    order = np.argsort(vals)[::-1][:dim]
    emb = vecs[:, order] * np.sqrt(np.clip(vals[order], 0, None))
    if emb.shape[1] < dim:
        emb = np.pad(emb, ((0, 0), (0, dim - emb.shape[1])))
    scale = emb[live].std() if live.any() else 1.0
    emb = emb / max(scale, 1e-8)
    emb[~live] = rng.normal(0, 0.1, size=(int((~live).sum()), dim))
    # eigenvector signs are arbitrary; fix them so the result is reproducible across LAPACKs
    signs = np.sign(emb[np.abs(emb).argmax(axis=0), np.arange(dim)])
    return (emb * np.where(signs == 0, 1, signs)).astype(np.float32)


def coexpression_embedding(X: sp.spmatrix | np.ndarray, known: np.ndarray,
                           vectors: np.ndarray, *, norm: float | None = None, k: int = 10,
                           seed: int = 0, max_cells: int = 5000) -> np.ndarray:
    """Vectors for genes outside a gene vocabulary, from their co-expression with genes in it.

    An unknown gene's vector is the mean of the vocabulary vectors of the ``k`` known genes it
    correlates with most (Pearson, log-expression over the cells of ``X``), weighted by those
    positive correlations, then rescaled to ``norm`` (e.g. the median norm of the whole
    vocabulary's vectors; default: that of ``vectors``), so that it sits among them at their
    scale. A gene correlated with no known gene (never expressed in
    these cells, or no known gene at all) gets a random direction (seeded) at that norm.

    Parameters
    ----------
    X
        Cells x genes, log-normalized (e.g. a stage's cells on its new panel).
    known
        ``(genes,)`` bool: the genes that have a vocabulary vector.
    vectors
        ``(known.sum(), dim)``: their vectors, in column order.
    k
        Known genes averaged per unknown gene.
    seed
        Seed for the cell sample and the random directions.
    max_cells
        Cells sampled to estimate the correlations.

    Returns
    -------
    A ``(genes not known, dim)`` float32 array, in column order.
    """
    known = np.asarray(known, dtype=bool)
    vectors = np.asarray(vectors, dtype=np.float64)
    dim = vectors.shape[1]
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(X, dtype=np.float64)
    if X.shape[0] > max_cells:
        X = X[np.sort(rng.choice(X.shape[0], max_cells, replace=False))]
    unknown = np.flatnonzero(~known)
    norms = np.linalg.norm(vectors, axis=1)
    if norm is None:
        norm = float(np.median(norms)) if len(norms) else math.sqrt(dim)
    target = float(norm)
    out = rng.normal(size=(len(unknown), dim))
    out *= target / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    if not known.any() or not len(unknown):
        return out.astype(np.float32)
    n = X.shape[0]
    mean = np.asarray(X.mean(axis=0)).ravel()
    sd = np.sqrt(np.clip(np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2, 0, None))
    kn = np.flatnonzero(known)
    Xk = X[:, kn].tocsc()
    k = min(k, len(kn))
    for s in range(0, len(unknown), 2048):
        cols = unknown[s:s + 2048]
        cov = (X[:, cols].T @ Xk).toarray() / n - np.outer(mean[cols], mean[kn])
        denom = np.outer(sd[cols], sd[kn])
        corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)
        top = np.argpartition(-corr, k - 1, axis=1)[:, :k]
        w = np.clip(np.take_along_axis(corr, top, axis=1), 0, None)
        live = w.sum(1) > 1e-8
        vec = np.einsum("gk,gkd->gd", w[live], vectors[top[live]])
        vec *= target / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        out[s + np.flatnonzero(live)] = vec
    return out.astype(np.float32)


def read_gene_embedding(path: str | Path, genes: Sequence[str], *, dim: int | None = None,
                        seed: int = 0) -> np.ndarray:
    """Gene vectors for ``genes`` from a gene2vec-style text file.

    Each line is a gene symbol followed by its vector, separated by spaces or tabs (a first line
    ``N DIM``, as word2vec writes, is skipped). Genes missing from the file get small random
    vectors (seeded); the share found is logged and a warning is raised below 50%. A file whose
    vectors are longer than ``dim`` is reduced to ``dim`` by PCA.

    Returns
    -------
    A ``(len(genes), dim)`` float32 array in the order of ``genes``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"gene embedding file {path} not found")
    vectors: dict[str, np.ndarray] = {}
    width = None
    with open(path) as fh:
        for n, line in enumerate(fh):
            parts = line.split()
            if not parts:
                continue
            if n == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError as err:
                raise ValueError(f"{path}, line {n + 1}: expected a gene symbol followed by "
                                 "numbers (gene2vec text format)") from err
            if width is None:
                width = len(vec)
            elif len(vec) != width:
                raise ValueError(f"{path}, line {n + 1}: {len(vec)} values, earlier lines have "
                                 f"{width}; the file is truncated or malformed")
            vectors.setdefault(parts[0], vec)
    if not vectors:
        raise ValueError(f"{path} holds no gene vectors")
    dim = width if dim is None else dim
    if width < dim:
        raise ValueError(f"{path} has {width}-dimensional vectors, the model needs {dim}; build "
                         f"the model with ModelConfig(dim={width}) or give a wider embedding")
    found = [g for g in genes if g in vectors]
    share = len(found) / max(len(genes), 1)
    msg = f"{len(found)} of {len(genes)} panel genes ({share:.0%}) have a vector in {path.name}"
    if share < 0.5:
        logger.warning("%s; the others start from random vectors", msg)
    else:
        logger.info(msg)
    mat = np.stack([vectors[g] for g in found]) if found else np.zeros((0, width), np.float32)
    if width > dim and len(found):
        centered = mat - mat.mean(0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        mat = centered @ vt[:dim].T
    scale = mat.std() if mat.size else 1.0
    rng = np.random.default_rng(seed)
    out = rng.normal(0, 0.1, size=(len(genes), dim)).astype(np.float32)
    where = {g: i for i, g in enumerate(found)}
    for i, g in enumerate(genes):
        if g in where:
            out[i] = mat[where[g]] / max(scale, 1e-8)
    return out
