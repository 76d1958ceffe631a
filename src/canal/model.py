"""The user-facing model: :class:`Annotator`.

An Annotator couples a :class:`~canal.nn.CanalNet` with its fixed gene panel, its cell-type
library (the classifier's classes, in order), its stage counter, its example bank and its
training history. It reads AnnData and writes results back into it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from canal import annotate, io, novelty, pp
from canal._settings import settings
from canal.continual import Distiller, ExampleBank
from canal.data import CellData, concat, encode_labels, read_labels
from canal.nn import CanalNet, ModelConfig
from canal.train import StageConfig, run_stage

logger = logging.getLogger(__name__)

#: Where the shipped pre-trained weights live inside the package.
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "default"


class Annotator:
    """A cell-type annotator: network + gene panel + cell-type library + example bank.

    Create one with :meth:`from_pretrained` (shipped or saved weights) or :meth:`create`
    (random initialisation on a panel chosen from data).
    """

    def __init__(self, net: CanalNet, genes: Sequence[str], *, cell_types: Sequence[str] = (),
                 stage: int = 0, meta: dict[str, Any] | None = None, bank=None,
                 history: list[dict] | None = None):
        genes = [str(g) for g in genes]
        if len(genes) != net.config.n_genes:
            raise ValueError(f"{len(genes)} genes for a network built for {net.config.n_genes}")
        if len(set(genes)) != len(genes):
            raise ValueError("the gene panel has duplicate genes")
        if len(cell_types) != net.head.n_classes:
            raise ValueError(f"{len(cell_types)} cell types for a head with "
                             f"{net.head.n_classes} outputs")
        self.net = net
        self.genes = genes
        self.cell_types = [str(c) for c in cell_types]
        self.stage = int(stage)
        self.meta = dict(meta or {})
        self.bank = bank
        self.history = list(history or [])

    # ---------------------------------------------------------------------------------------
    # construction, saving, loading
    # ---------------------------------------------------------------------------------------

    @classmethod
    def create(cls, adata, *, n_genes: int = 1000, config: ModelConfig | None = None,
               genes: Sequence[str] | None = None, gene_embedding=None,
               layer: str | None = None) -> Annotator:
        """A randomly initialised model whose gene panel is chosen from ``adata``.

        Parameters
        ----------
        adata
            One AnnData or a list of them (HVGs are chosen over all; see
            :func:`canal.pp.select_panel`).
        n_genes
            Panel size (CANAL uses 1,000 highly variable genes).
        config
            Network sizes; ``n_genes`` is set from the panel.
        genes
            Use this panel instead of choosing HVGs.
        gene_embedding
            Optional ``(n_genes, dim)`` matrix to initialise the gene vectors (e.g. gene2vec).
        """
        if genes is None:
            genes = pp.select_panel(adata, n_genes=n_genes, layer=layer)
        config = (config or ModelConfig()).replace(n_genes=len(genes))
        net = CanalNet(config, gene_embedding=gene_embedding)
        return cls(net, genes)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Annotator:
        """Load a checkpoint directory; with no path, the weights shipped with canal."""
        if path is None:
            path = DEFAULT_WEIGHTS
            if not (path / io.CONFIG).exists():
                raise FileNotFoundError(f"no shipped weights at {path}; reinstall canal or pass "
                                        "a checkpoint path")
        ckpt = io.load_checkpoint(path)
        meta = ckpt.meta
        try:
            config = ModelConfig.from_dict(meta["model_config"])
            genes, cell_types = meta["genes"], meta.get("cell_types", [])
        except KeyError as err:
            raise io.CheckpointError(f"{path}/config.json lacks {err}; the checkpoint is "
                                     "incomplete") from err
        net = CanalNet(config, n_classes=len(cell_types))
        try:
            net.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as err:
            raise io.CheckpointError(f"weights in {path} do not match its config.json ({err}); "
                                     "the checkpoint is corrupt or was edited") from err
        extra = {k: v for k, v in meta.items()
                 if k not in {"model_config", "genes", "cell_types", "stage", "format",
                              "format_version", "versions"}}
        return cls(net, genes, cell_types=cell_types, stage=meta.get("stage", 0), meta=extra,
                   bank=ckpt.bank, history=ckpt.history)

    load = from_pretrained

    def save(self, path: str | Path) -> Path:
        """Write the model as a checkpoint directory (atomic)."""
        meta = dict(self.meta)
        meta.update(model_config=self.net.config.to_dict(), genes=self.genes,
                    cell_types=self.cell_types, stage=self.stage)
        ckpt = io.Checkpoint(state_dict=self.net.state_dict(), meta=meta, bank=self.bank,
                             history=self.history)
        return io.save_checkpoint(path, ckpt)

    def __repr__(self) -> str:
        c = self.net.config
        return (f"Annotator(stage={self.stage}, genes={len(self.genes)}, "
                f"cell_types={len(self.cell_types)}, dim={c.dim}, depth={c.depth}, "
                f"heads={c.heads})")

    # ---------------------------------------------------------------------------------------
    # data
    # ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, adata, *, labels=None, layer: str | None = None,
                case_insensitive: bool = False, orthologs=False,
                min_overlap: float = 0.2) -> CellData:
        """Align ``adata`` to the model's gene panel, log-normalized (see :mod:`canal.pp`)."""
        return CellData.from_adata(adata, self.genes, labels=labels, layer=layer,
                                   case_insensitive=case_insensitive, orthologs=orthologs,
                                   min_overlap=min_overlap)

    @torch.inference_mode()
    def outputs(self, data: CellData, *, batch_size: int = 64,
                device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations and logits of every cell, in batches (eval mode, no gradients)."""
        dev = settings.torch_device(device)
        self.net.to(dev).eval()
        reps, logits = [], []
        for _, tokens in data.batches(batch_size):
            out = self.net(tokens.to(dev))
            reps.append(out.representation.float().cpu())
            logits.append(out.logits.float().cpu())
        return torch.cat(reps), torch.cat(logits)

    def embed(self, adata, *, key_added: str = "X_canal", batch_size: int = 64,
              inplace: bool = True, **prepare_kwargs) -> np.ndarray | None:
        """Cell representations.

        Returns
        -------
        Sets ``adata.obsm[key_added]`` (cells x ``rep_dim``) when ``inplace``, else returns it.
        """
        rep, _ = self.outputs(self.prepare(adata, **prepare_kwargs), batch_size=batch_size)
        rep = rep.numpy()
        if not inplace:
            return rep
        adata.obsm[key_added] = rep
        return None

    # ---------------------------------------------------------------------------------------
    # continual fine-tuning
    # ---------------------------------------------------------------------------------------

    def fit_stage(self, adata, *, labels_key: str = "cell_type",
                  config: StageConfig | None = None, layer: str | None = None,
                  case_insensitive: bool = False, orthologs=False,
                  device: str | torch.device | None = None) -> Annotator:
        """Fine-tune on one labelled dataset (a stage), keeping what earlier stages taught.

        New cell types grow the classifier (known rows keep their weights); types absent from
        this stage stay in the library. Depending on ``config.strategy``, cells from the example
        bank are replayed and the representation is distilled from the previous stage's model.
        Afterwards the bank is refilled, the novelty threshold is calibrated on the training
        cells (``meta["novelty"]``), the stage counter advances and the history grows.

        Parameters
        ----------
        adata
            Labelled cells (raw counts or log-normalized), any genes: they are aligned to the
            model's gene panel.
        labels_key
            Column of ``adata.obs`` holding the cell types.
        config
            Stage hyper-parameters (:class:`canal.train.StageConfig`).

        Returns
        -------
        The annotator itself, trained.
        """
        config = config or StageConfig()
        labels = read_labels(adata, labels_key)
        new_types = sorted(set(labels) - set(self.cell_types))
        n_old = len(self.cell_types)
        distiller = None
        if config.uses_distillation:
            distiller = Distiller(config.distill_weight)
            distiller.snapshot(self.net, n_old_types=n_old)
        gen = torch.Generator().manual_seed(config.seed)
        new = self.prepare(adata, layer=layer, case_insensitive=case_insensitive,
                           orthologs=orthologs)
        self.net.head.grow(len(new_types), generator=gen)
        self.cell_types += new_types
        new.labels = encode_labels(labels, self.cell_types, key=labels_key)
        stage = self.stage + 1
        parts, stages = [new], [np.full(new.n_cells, stage)]
        names = [np.asarray(adata.obs_names, dtype=str)]
        if config.uses_replay and self.bank is not None and self.bank.n_obs:
            old = ExampleBank.from_anndata(self.bank)
            parts.append(CellData(old.X, encode_labels(old.labels, self.cell_types)))
            stages.append(old.obs["stage"].to_numpy())
            names.append(old.obs["cell"].to_numpy(dtype=str))
        data = concat(parts)
        logger.info("stage %d: %d new cells, %d replayed, %d new types %s", stage, new.n_cells,
                    data.n_cells - new.n_cells, len(new_types), new_types)
        result = run_stage(self.net, data, config=config, distiller=distiller,
                           device=settings.torch_device(device))
        head = self.net.head
        weight = head.classifier.weight.detach().float().cpu()
        if config.uses_replay:  # other strategies leave the bank as it was
            bank = ExampleBank(None if config.keeps_all else config.bank_size,
                               prototype=config.prototype)
            bank.update(data.X, np.asarray(self.cell_types)[data.labels], result.representations,
                        library=self.cell_types, classifier_weight=weight,
                        stage=np.concatenate(stages), cell_names=np.concatenate(names))
            self.bank = bank.to_anndata(self.genes)
        dev = next(head.parameters()).device
        with torch.no_grad():
            head.eval()
            self.meta["novelty"] = novelty.calibrate(
                result.representations, result.logits,
                lambda h: head.classify(h.to(dev)).float().cpu(),
                generator=torch.Generator().manual_seed(config.seed))
        self.meta["novelty"].update(seed=config.seed, stage=stage)
        self.stage = stage
        self.history.append({"stage": stage, "config": config.to_dict(), "n_cells": new.n_cells,
                             "n_replayed": data.n_cells - new.n_cells, "new_types": new_types,
                             "cell_types": list(self.cell_types), **result.history})
        return self

    # ---------------------------------------------------------------------------------------
    # prediction and novelty calibration (see canal.annotate)
    # ---------------------------------------------------------------------------------------

    def calibrate_novelty(self, data, *, batch_size: int = 64, seed: int = 0,
                          temperature: float = annotate.TEMPERATURE,
                          **prepare_kwargs) -> dict[str, Any]:
        """Calibrate the non-transductive novelty score on reference cells.

        Parameters
        ----------
        data
            Reference cells: an AnnData (e.g. the training data or ``self.bank``) or a
            :class:`~canal.data.CellData` already on the panel.
        batch_size
            Cells per forward pass.
        seed
            Seed of the mixup generator (the result is deterministic).
        temperature
            Energy temperature.
        **prepare_kwargs
            Passed to :meth:`prepare` for AnnData input (``layer``, ``orthologs``, ...).

        Returns
        -------
        The calibration dict (see :func:`canal.annotate.calibration`), also stored as
        ``self.meta["novelty"]`` and saved with the checkpoint; used by
        ``predict(..., novelty="calibrated")``.
        """
        if not isinstance(data, CellData):
            data = self.prepare(data, **prepare_kwargs)
        cal = annotate.calibration(self.net, data, batch_size=batch_size, seed=seed,
                                   temperature=temperature)
        cal["stage"] = self.stage
        self.meta["novelty"] = cal
        return cal

    def predict(
        self,
        adata,
        *,
        key_added: str = "canal",
        novelty: Literal["energy", "calibrated", "none"] = "energy",
        batch_size: int = 64,
        precision: Literal["fp32", "bf16"] = "fp32",
        inplace: bool = True,
        layer: str | None = None,
        case_insensitive: bool = False,
        orthologs: bool | str = False,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> pd.DataFrame | None:
        """Annotate cells with the known cell types, calling novel cells ``Unassigned``.

        Cells are streamed in batches (backed AnnData works; memory stays bounded).

        Parameters
        ----------
        adata
            Cells to annotate: raw counts or log-normalized (detected, never normalized twice),
            in memory or opened with ``backed="r"``. Genes are matched by symbol to the panel.
        key_added
            Prefix of the fields written.
        novelty
            ``"energy"``: CANAL's transductive mode, scores normalised over the cells given and
            a mixup threshold from their representations (seeded, deterministic).
            ``"calibrated"``: the bounds and threshold stored by :meth:`calibrate_novelty`, so a
            cell's result does not depend on the other cells. ``"none"``: no ``Unassigned``.
            ``"energy"`` on a single cell falls back to ``"calibrated"`` when the model is
            calibrated, else raises a ValueError.
        batch_size
            Cells per forward pass; results do not depend on it.
        precision
            ``"bf16"`` autocasts the matrix products (faster on CPUs with bf16 support and on
            GPUs); ``"fp32"`` is exact.
        inplace
            Write into ``adata``; with ``False`` return a DataFrame and leave ``adata`` as is.
        layer
            Read expression from ``adata.layers[layer]`` instead of ``adata.X``.
        case_insensitive, orthologs
            Gene matching across case / species (see :func:`canal.pp.align_genes`).
        seed
            Seed of the ``"energy"`` mode's mixup.
        device
            Torch device; ``None`` uses ``canal.settings.device``.

        Returns
        -------
        With ``inplace=True`` nothing; sets ``adata.obs[key_added]`` (categorical: the cell-type
        library plus ``"Unassigned"``), ``adata.obs[f"{key_added}_confidence"]`` (float32,
        largest probability), ``adata.obs[f"{key_added}_novelty"]`` (float32 novelty score,
        NaN with ``novelty="none"``), ``adata.obsm[f"X_{key_added}"]`` (float32
        representation), ``adata.obsm[f"{key_added}_probabilities"]`` (DataFrame, one column per
        known type) and ``adata.uns[key_added]["params"]`` (novelty mode, threshold,
        temperature, genes found, stage, batch size, precision). With ``inplace=False`` a
        DataFrame indexed by ``adata.obs_names`` with the three obs columns and one probability
        column per known type.
        """
        result = annotate.annotate(
            self.net, adata, self.genes, self.cell_types, novelty=novelty,
            calibration=self.meta.get("novelty"), batch_size=batch_size, precision=precision,
            layer=layer, case_insensitive=case_insensitive, orthologs=orthologs, seed=seed,
            device=device)
        result.params["stage"] = self.stage
        if not inplace:
            return annotate.results_frame(result, adata.obs_names, key_added=key_added)
        annotate.write_results(adata, result, key_added=key_added)
        return None
