"""The user-facing model: :class:`Annotator`.

An Annotator couples a :class:`~canal.nn.CanalNet` with its fixed gene panel, its cell-type
library (the classifier's classes, in order), its stage counter, its example bank and its
training history. It reads AnnData and writes results back into it.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from canal import annotate, distributed, io, novelty, pp
from canal._settings import settings
from canal.continual import Distiller, ExampleBank
from canal.data import CellData, concat, encode_labels, read_labels
from canal.metrics import UNASSIGNED
from canal.nn import CanalNet, ModelConfig
from canal.pp import GeneMatch
from canal.runtime import BATCH_SIZE, check_batch_size, forward_cells
from canal.train import StageConfig, run_stage

#: How the first stage chooses the gene panel (see :meth:`Annotator.fit_stage`).
PanelChoice = Literal["auto", "hvg", "pretrained"]

if TYPE_CHECKING:
    from collections.abc import Sequence


logger = logging.getLogger(__name__)

#: Where the shipped pre-trained weights live inside the package.
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "default"
VOCABULARY_WEIGHTS = Path(__file__).parent / "weights" / "vocabulary"
"""Weights pre-trained over a 20,270-gene vocabulary (``canal pretrain --vocabulary``; its
MODEL_CARD.md): fine-tuning from them chooses its own panel; not the default, see the README."""


class Annotator:
    """A cell-type annotator: network + gene panel + cell-type library + example bank.

    Create one with :meth:`from_pretrained` (shipped or saved weights) or :meth:`create`
    (random initialisation on a panel chosen from data).

    Attributes
    ----------
    match
        How data are read and genes matched (:class:`canal.GeneMatch`): set by the first
        :meth:`fit_stage` given one, saved with the model and used by every call that is not
        given another.
    bank
        The example bank (:class:`canal.continual.ExampleBank`), or ``None`` before a stage.
    vocabulary
        The genes of the network's gene vocabulary (``net.vocab``, one embedding each: the
        pre-training corpus' genes), or ``None`` when it has none; then the panel is the
        vocabulary (:meth:`vocabulary_embedding`).
    """

    def __init__(self, net: CanalNet, genes: Sequence[str], *, cell_types: Sequence[str] = (),
                 stage: int = 0, meta: dict[str, Any] | None = None,
                 bank: ExampleBank | None = None, history: list[dict] | None = None,
                 match: GeneMatch | None = None, vocabulary: Sequence[str] | None = None):
        genes = [str(g) for g in genes]
        if len(genes) != net.config.n_genes:
            raise ValueError(f"{len(genes)} genes for a network built for {net.config.n_genes}")
        if len(set(genes)) != len(genes):
            raise ValueError("the gene panel has duplicate genes")
        if len(cell_types) != net.head.n_classes:
            raise ValueError(f"{len(cell_types)} cell types for a head with "
                             f"{net.head.n_classes} outputs")
        if (vocabulary is not None and len(vocabulary) != net.config.n_vocab) or \
                (vocabulary is None and net.config.n_vocab):
            raise ValueError(f"{0 if vocabulary is None else len(vocabulary)} vocabulary genes "
                             f"for a network with a vocabulary of {net.config.n_vocab}")
        self.net = net
        self.genes = genes
        self.vocabulary = None if vocabulary is None else [str(g) for g in vocabulary]
        self.cell_types = [str(c) for c in cell_types]
        self.stage = int(stage)
        self.meta = dict(meta or {})
        if bank is not None and not isinstance(bank, ExampleBank):
            bank = ExampleBank.from_anndata(bank)
        self.bank = bank
        self.history = list(history or [])
        self.match = match or GeneMatch()
        #: the checkpoint this model was loaded from, when its example bank file was missing
        self._bank_missing_from: Path | None = None
        #: where the model was loaded from (recorded with every prediction)
        self.source: dict[str, str] = {}
        #: each gene's mean share of a cell's counts in the first stage's data (upper-case
        #: symbols): a query holding only part of the transcriptome is scaled by the share
        #: its genes held there (see :func:`canal.pp.reference_share`)
        self.gene_shares: pd.Series | None = None
        shares = self.meta.pop("gene_shares", None)
        if shares:
            self.gene_shares = pd.Series(shares["share"], index=shares["genes"], dtype=float)

    # ---------------------------------------------------------------------------------------
    # construction, saving, loading
    # ---------------------------------------------------------------------------------------

    @classmethod
    def from_genes(cls, genes: Sequence[str], *, config: ModelConfig | None = None,
                   gene_embedding=None) -> Annotator:
        """A randomly initialised model on a given gene panel (``config.n_genes`` is set from
        it); ``gene_embedding`` as in :meth:`create` (a path or a matrix)."""
        return cls.create(None, genes=genes, config=config, gene_embedding=gene_embedding)

    @classmethod
    def create(cls, adata, *, n_genes: int = 1000, config: ModelConfig | None = None,
               genes: Sequence[str] | None = None, gene_embedding=None,
               layer: str | None = None,
               combine: Literal["votes", "interleave"] = "votes",
               vocabulary: bool | Sequence[str] | None = None,
               match: GeneMatch | dict | Sequence[GeneMatch | dict | None] | None = None
               ) -> Annotator:
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
            How to initialise the gene vectors: ``None`` (random), ``"corpus"`` (co-expression
            in ``adata``, see :func:`canal.pretrain.corpus_gene_embedding`), the path of a
            gene2vec-style text file keyed by gene symbol (see
            :func:`canal.pretrain.read_gene_embedding`), or a ``(n_genes, dim)`` matrix.
        combine
            How several datasets' HVGs are combined (see :func:`canal.pp.select_panel`).
        vocabulary
            A gene vocabulary for pre-training over varying gene sets: ``True``, every gene
            the datasets express (:func:`canal.pp.gene_vocabulary`), or a list of genes (the
            panel's genes are added). Each vocabulary gene gets an embedding (``net.vocab``);
            with ``gene_embedding="corpus"`` the panel genes' vectors come from co-expression
            as without a vocabulary and the others from their co-expression with the panel
            genes (:func:`canal.pretrain.coexpression_embedding`). The panel's gene embeddings
            are its genes' vocabulary vectors.
        match
            How the datasets are read (one for all or one per dataset; e.g. orthologs for mouse
            files): used to build the vocabulary and the corpus embedding.
        """
        adatas = [] if adata is None else (list(adata) if isinstance(adata, list | tuple)
                                           else [adata])
        matches = list(match) if isinstance(match, list | tuple) else [match] * len(adatas)
        if len(matches) != len(adatas):
            raise ValueError(f"{len(matches)} gene matches for {len(adatas)} datasets")
        matches = [GeneMatch.resolve(m, GeneMatch(layer=layer)) for m in matches]
        if genes is None:
            genes = pp.select_panel(adata, n_genes=n_genes, layer=layer, combine=combine)
        genes = [str(g) for g in genes]
        if vocabulary is True:
            if not adatas:
                raise ValueError("vocabulary=True takes the datasets' genes: pass adata")
            vocabulary = pp.gene_vocabulary(adatas, match=matches)
        if vocabulary is not None and vocabulary is not False:
            vocabulary = sorted(set(map(str, vocabulary)) | set(genes))
        else:
            vocabulary = None
        config = (config or ModelConfig()).replace(
            n_genes=len(genes), n_vocab=0 if vocabulary is None else len(vocabulary))
        vocab_emb = None
        if isinstance(gene_embedding, str | Path):
            from canal import pretrain

            if str(gene_embedding) == "corpus":
                if not adatas:
                    raise ValueError("gene_embedding='corpus' needs the corpus: pass adata")
                X = concat([CellData.from_adata(a, genes, match=m)
                            for a, m in zip(adatas, matches, strict=True)]).X
                gene_embedding = pretrain.corpus_gene_embedding(X, config.dim, seed=config.seed)
                if vocabulary is not None:
                    vocab_emb = cls._corpus_vocabulary_embedding(
                        adatas, matches, genes, vocabulary, gene_embedding, seed=config.seed)
            else:
                path = gene_embedding
                gene_embedding = pretrain.read_gene_embedding(path, genes, dim=config.dim,
                                                              seed=config.seed)
                if vocabulary is not None:
                    vocab_emb = pretrain.read_gene_embedding(path, vocabulary, dim=config.dim,
                                                             seed=config.seed)
        net = CanalNet(config, gene_embedding=gene_embedding)
        if vocabulary is not None:
            rows = torch.as_tensor([vocabulary.index(g) for g in genes])
            with torch.no_grad():
                if vocab_emb is not None:
                    net.vocab.weight.copy_(torch.as_tensor(vocab_emb))
                if gene_embedding is not None:  # the panel's given vectors are its genes'
                    net.vocab.weight[rows] = torch.as_tensor(
                        np.asarray(gene_embedding, dtype=np.float32)[:len(genes)])
                net.pos_emb.emb.weight[:len(genes)] = net.vocab.weight[rows]
        return cls(net, genes, vocabulary=vocabulary)

    @staticmethod
    def _corpus_vocabulary_embedding(adatas: list, matches: list[GeneMatch], genes: list[str],
                                     vocabulary: list[str], panel_emb: np.ndarray, *,
                                     seed: int) -> np.ndarray:
        """Vocabulary vectors: the panel's co-expression vectors, and for every other gene its
        co-expression with the panel genes (at the panel vectors' median norm)."""
        from canal import pretrain

        lenient = [m.replace(min_overlap=0.0, warn_overlap=0.0) for m in matches]
        X = concat([CellData.from_adata(a, vocabulary, match=m)
                    for a, m in zip(adatas, lenient, strict=True)]).X
        where = {g: i for i, g in enumerate(vocabulary)}
        known = np.zeros(len(vocabulary), dtype=bool)
        known[[where[g] for g in genes]] = True
        vectors = np.zeros((len(vocabulary), panel_emb.shape[1]), dtype=np.float32)
        order = np.flatnonzero(known)  # column order of the known genes
        panel_rows = {g: i for i, g in enumerate(genes)}
        vectors[order] = panel_emb[[panel_rows[vocabulary[i]] for i in order]]
        vectors[~known] = pretrain.coexpression_embedding(X, known, vectors[order], seed=seed)
        return vectors

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
            net.load_weights(ckpt.state_dict)
        except RuntimeError as err:
            raise io.CheckpointError(f"weights in {path} do not match its config.json ({err}); "
                                     "the checkpoint is corrupt or was edited") from err
        extra = {k: v for k, v in meta.items()
                 if k not in {"model_config", "genes", "cell_types", "stage", "format",
                              "format_version", "versions", "gene_match", "vocabulary"}}
        try:
            model = cls(net, genes, cell_types=cell_types, stage=meta.get("stage", 0),
                        meta=extra, bank=ckpt.bank, history=ckpt.history,
                        match=GeneMatch.from_dict(meta.get("gene_match")),
                        vocabulary=meta.get("vocabulary"))
        except ValueError as err:
            raise io.CheckpointError(f"{path}/config.json does not match its weights ({err}); "
                                     "the checkpoint is corrupt or was edited") from err
        model._bank_missing_from = Path(path) if ckpt.bank_missing else None
        model.source = {"checkpoint": str(path), "checkpoint_id": ckpt.checkpoint_id or ""}
        return model

    def save(self, path: str | Path, *, optimizer: dict | None = None) -> Path:
        """Write the model as a checkpoint directory (atomic).

        Under ``torchrun`` only rank 0 writes; the other ranks wait until it is written.
        ``optimizer`` (an optimizer state dict) is saved beside the weights so that an
        unfinished pre-training run can resume.
        """
        meta = dict(self.meta)
        meta.update(model_config=self.net.config.to_dict(), genes=self.genes,
                    cell_types=self.cell_types, stage=self.stage,
                    gene_match=self.match.to_dict())
        if self.vocabulary is not None:
            meta["vocabulary"] = self.vocabulary
        if self.gene_shares is not None:
            kept = self.gene_shares[self.gene_shares > 0]
            meta["gene_shares"] = {"genes": kept.index.tolist(),
                                   "share": [float(f"{v:.6g}") for v in kept.to_numpy()]}
        bank = None if self.bank is None else self.bank.to_anndata(self.genes)
        ckpt = io.Checkpoint(state_dict=self.net.state_dict(), meta=meta, bank=bank,
                             history=self.history, optimizer=optimizer)
        return distributed.on_main(io.save_checkpoint, path, ckpt)

    def vocabulary_embedding(self) -> tuple[list[str], torch.Tensor]:
        """The gene vocabulary and its vectors, ``(genes, (len(genes), dim) tensor)``.

        A network without a vocabulary (every checkpoint written before it) has its panel as
        vocabulary: the panel genes and their gene embeddings.
        """
        if self.net.vocab is not None:
            return list(self.vocabulary), self.net.vocab.weight.detach().cpu().clone()
        n = self.net.config.n_genes
        return list(self.genes), self.net.pos_emb.emb.weight[:n].detach().cpu().clone()

    def __repr__(self) -> str:
        c = self.net.config
        vocab = f", vocabulary={c.n_vocab}" if c.n_vocab else ""
        return (f"Annotator(stage={self.stage}, genes={len(self.genes)}{vocab}, "
                f"cell_types={len(self.cell_types)}, dim={c.dim}, depth={c.depth}, "
                f"heads={c.heads})")

    # ---------------------------------------------------------------------------------------
    # data
    # ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, adata, *, labels=None, match: GeneMatch | dict | None = None
                ) -> CellData:
        """Read ``adata`` on the model's gene panel, log-normalized, with the genes it measures.

        ``match`` (a :class:`canal.GeneMatch`, or a dict of fields to change in the model's)
        defaults to the model's stored :attr:`match`.
        """
        return CellData.from_adata(adata, self.genes, labels=labels,
                                   match=GeneMatch.resolve(match, self.match),
                                   shares=self.gene_shares)

    def outputs(self, data: CellData, *, batch_size: int = BATCH_SIZE,
                device: str | torch.device | None = None, progress: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations and logits of every cell, in batches (eval mode, no gradients)."""
        out = forward_cells(self.net, (b for _, b in data.batches(batch_size)),
                            n_cells=data.n_cells, device=device, progress=progress)
        return out.representation, out.logits

    def embed(self, adata, *, key_added: str = "canal", match: GeneMatch | dict | None = None,
              batch_size: int = BATCH_SIZE, inplace: bool = True) -> np.ndarray | None:
        """Cell representations.

        Cells are streamed from ``adata`` in batches (backed AnnData stays on disk), as in
        :meth:`predict`. Inside a process group (``torchrun``) each rank embeds a contiguous
        block of the cells and every rank gets all of them, in order (see
        :func:`canal.annotate.represent`).

        Returns
        -------
        Sets ``adata.obsm[f"X_{key_added}"]`` (cells x ``rep_dim``, the key :meth:`predict`
        uses) when ``inplace``, else returns the array.
        """
        match = GeneMatch.resolve(match, self.match)
        alignment = match.align(adata, self.genes)
        out = annotate.represent(self.net, adata, self.genes, alignment=alignment, match=match,
                                 share=pp.reference_share(alignment, self.gene_shares),
                                 batch_size=check_batch_size(batch_size),
                                 progress="canal embed")
        rep = out.representation.numpy()
        if not inplace:
            return rep
        adata.obsm[annotate.output_keys(key_added)["rep"]] = rep
        return None

    # ---------------------------------------------------------------------------------------
    # pre-training
    # ---------------------------------------------------------------------------------------

    def pretrain(self, adatas, *, config=None, out: str | Path | None = None,
                 resume: bool = True, names: Sequence[str] | None = None,
                 match: GeneMatch | dict | Sequence[GeneMatch | dict | None] | None = None,
                 device: str | torch.device | None = None) -> dict[str, Any]:
        """Masked-expression pre-training on unlabeled cells (see :mod:`canal.pretrain`).

        Parameters
        ----------
        adatas
            One AnnData or a list (raw counts or log-normalized; any genes: each is aligned to
            the model's panel; genes a dataset lacks are not measured there). Labels are ignored.
        config
            :class:`canal.pretrain.PretrainConfig`.
        out
            Checkpoint directory written every ``config.checkpoint_every`` steps and at the
            end (atomically; with the optimizer state while unfinished).
        resume
            If ``out`` holds an unfinished run with the same config, panel and corpus size,
            continue it from its last step (the result equals an uninterrupted run); if it
            holds a finished one, load it and return. With ``False`` start afresh.
        names
            Names of the corpus datasets (recorded in the checkpoint).
        match
            How expression is read and genes matched (see :meth:`prepare`): one for all
            datasets, or a list with one per dataset (e.g. orthologs for the mouse files).

        Returns
        -------
        The pre-training record, also stored as ``self.meta["pretrain"]``: config, corpus,
        steps, wall time, cells/s, and held-out masked-token accuracy vs the majority-bin
        baseline after each evaluation (``history["val"]``) and at the end (``final``).
        """
        from canal import pretrain

        config = config or pretrain.PretrainConfig()
        adatas = list(adatas) if isinstance(adatas, list | tuple) else [adatas]
        names = list(names) if names is not None else [f"dataset {i + 1}"
                                                       for i in range(len(adatas))]
        if len(names) != len(adatas):
            raise ValueError(f"{len(names)} names for {len(adatas)} datasets")
        matches = list(match) if isinstance(match, list | tuple) else [match] * len(adatas)
        if len(matches) != len(adatas):
            raise ValueError(f"{len(matches)} gene matches for {len(adatas)} datasets")
        if self.vocabulary is None:
            parts = [self.prepare(a, match=m) for a, m in zip(adatas, matches, strict=True)]
        else:  # cells on the vocabulary: each batch draws its panels from it
            parts = [CellData.from_adata(a, self.vocabulary, match=GeneMatch.resolve(
                m, self.match).replace(min_overlap=0.0, warn_overlap=0.0))
                for a, m in zip(adatas, matches, strict=True)]
        data = concat(parts)
        corpus = [{"name": str(n), "n_cells": int(p.n_cells)}
                  for n, p in zip(names, parts, strict=True)]
        record = {"config": config.to_dict(), "corpus": corpus, "n_cells": int(data.n_cells)}
        if self.vocabulary is not None:
            record["vocabulary_size"] = len(self.vocabulary)
        state = None
        if out is not None and resume and (Path(out) / io.CONFIG).exists():
            state = self._resume_pretraining(Path(out), record)
            if state is not None and state.get("done"):
                return self.meta["pretrain"]

        def write(st: dict[str, Any]) -> None:
            self._panel_from_vocabulary()
            self.meta["pretrain"] = record | {k: v for k, v in st.items() if k != "optimizer"}
            if out is not None:
                self.save(out, optimizer=None if st["done"] else st["optimizer"])

        t0 = time.perf_counter()
        final = pretrain.run_pretraining(self.net, data, config=config, state=state,
                                         on_checkpoint=write,
                                         device=settings.torch_device(device))
        self._panel_from_vocabulary()
        self.meta["pretrain"] = record | {k: v for k, v in final.items() if k != "optimizer"}
        self.meta["pretrain"]["wall_seconds_last_run"] = time.perf_counter() - t0
        return self.meta["pretrain"]

    @torch.no_grad()
    def _panel_from_vocabulary(self) -> None:
        """Set the panel's gene embeddings to its genes' vocabulary vectors (after pre-training
        over the vocabulary, which trains those)."""
        if self.net.vocab is None:
            return
        where = {g: i for i, g in enumerate(self.vocabulary)}
        rows = torch.as_tensor([where[g] for g in self.genes], device=self.device)
        self.net.pos_emb.emb.weight[:len(self.genes)] = self.net.vocab.weight[rows]

    def _resume_pretraining(self, out: Path, record: dict[str, Any]) -> dict[str, Any] | None:
        ckpt = io.load_checkpoint(out, with_bank=False)
        prev = ckpt.meta.get("pretrain")
        if prev is None:
            raise ValueError(f"{out} is a checkpoint without a pre-training run; pass another "
                             "out, or resume=False to overwrite it")
        same = (ckpt.meta.get("genes") == self.genes
                and ckpt.meta.get("vocabulary") == self.vocabulary
                and ckpt.meta.get("model_config") == self.net.config.to_dict()
                and prev.get("config") == record["config"]
                and prev.get("n_cells") == record["n_cells"])
        if not same:
            raise ValueError(f"{out} holds a pre-training run with another config, panel or "
                             "corpus; pass resume=False (or --restart) to overwrite it, or "
                             "another output directory")
        self.net.load_weights(ckpt.state_dict)
        self.meta["pretrain"] = prev
        if prev.get("done"):
            logger.info("%s holds a finished pre-training run (%d steps); loaded it", out,
                        prev.get("step", 0))
            return {"done": True}
        if ckpt.optimizer is None:
            raise io.CheckpointError(f"{out} is an unfinished pre-training run without its "
                                     f"{io.OPTIMIZER}; pass resume=False to restart")
        logger.info("resuming pre-training from %s at step %d", out, prev["step"])
        return {k: prev[k] for k in ("step", "history", "train_seconds", "cells_seen")
                if k in prev} | {"optimizer": ckpt.optimizer}

    # ---------------------------------------------------------------------------------------
    # continual fine-tuning
    # ---------------------------------------------------------------------------------------

    def fit_stage(self, adata, *, labels_key: str = "cell_type",
                  config: StageConfig | None = None, match: GeneMatch | dict | None = None,
                  panel: PanelChoice | Sequence[str] | None = None,
                  device: str | torch.device | None = None) -> Annotator:
        """Fine-tune on one labelled dataset (a stage), keeping what earlier stages taught.

        New cell types grow the classifier (known rows keep their weights); types absent from
        this stage stay in the library. Depending on ``config.strategy``, cells from the example
        bank are replayed and the representation is distilled from the previous stage's model.
        Afterwards the bank is refilled, the calibrated novelty rule is fitted on the stage's
        validation cells (known cells not trained on; :attr:`novelty_calibration`), the stage
        counter advances and the history grows. A stage is a transaction: if it fails, the
        model is left exactly as it was.

        Parameters
        ----------
        adata
            Labelled cells (raw counts or log-normalized), any genes: they are aligned to the
            model's gene panel, and panel genes the data lack are not measured (not zero). A
            list of AnnData (e.g. files of different technologies) makes one stage in which
            each file keeps its own measured genes (``anndata.concat`` would fill a gene one
            file lacks with zeros, i.e. "measured and silent").
        labels_key
            Column of ``adata.obs`` holding the cell types.
        config
            Stage hyper-parameters (:class:`canal.train.StageConfig`).
        match
            How ``adata`` is read and its genes matched (:class:`canal.GeneMatch`, or a dict
            of fields to change); stored as the model's :attr:`match` for later calls.
            Default: the model's.
        panel
            The gene panel, chosen at the first stage only (a model with no cell types yet):
            ``"hvg"``, the stage's ``config.n_panel`` most highly variable genes
            (:func:`canal.pp.highly_variable_panel`); a list of gene symbols; or
            ``"pretrained"``, the panel the model has. ``None`` (``"auto"``): ``"hvg"`` for a
            model with a gene vocabulary (:attr:`vocabulary`), else ``"pretrained"``. A new
            panel takes each gene's vector from the vocabulary; a gene outside it starts
            from its co-expression with the panel's vocabulary genes in this stage's data, at
            the median norm of the vocabulary vectors
            (:func:`canal.pretrain.coexpression_embedding`). The encoder is kept, the
            classification head (one input per panel gene) is rebuilt, and the vocabulary is
            left out of the fine-tuned model. The choice is stored in ``meta["panel"]`` and
            reported by :meth:`predict`. Later stages keep the panel; ``panel=`` there is
            refused.

        Returns
        -------
        The annotator itself, trained.
        """
        config = config or StageConfig()
        if config.uses_replay and self._bank_missing_from is not None:
            raise io.bank_missing_error(self._bank_missing_from, config.strategy)
        match = GeneMatch.resolve(match, self.match)
        parts = list(adata) if isinstance(adata, list | tuple) else [adata]
        if not parts:
            raise ValueError("fit_stage got an empty list of datasets")
        labels = pd.concat([read_labels(a, labels_key) for a in parts], ignore_index=True)
        if UNASSIGNED in set(labels):
            raise ValueError(f"obs[{labels_key!r}] has cells labelled {UNASSIGNED!r}, the name "
                             "canal gives novel cells; drop them (adata[adata.obs[key] != "
                             f"'{UNASSIGNED}']) or rename the label before training")
        counts = labels.value_counts()
        if len(counts) == 1:
            logger.warning("the stage has a single cell type (%s): the classifier learns "
                           "nothing to tell it from others", counts.index[0])
        elif counts.min() < 2:
            logger.warning("cell type(s) %s have a single cell; they cannot be validated",
                           counts.index[counts < 2].tolist())
        # read before any change: bad input leaves the model as it was
        repanel = self._choose_panel(parts, panel, config, match)
        net, genes = (self.net, self.genes) if repanel is None else repanel[:2]
        shares = self.gene_shares if self.gene_shares is not None else \
            self._reference_shares(parts, match, genes)
        new = concat([CellData.from_adata(a, genes, match=match, shares=shares)
                      for a in parts])
        names = np.concatenate([np.asarray(a.obs_names, dtype=str) for a in parts])
        before = (copy.deepcopy(self.net), list(self.cell_types), self.bank,
                  self.meta.get("novelty"), self.genes, self.vocabulary, self.meta.get("panel"))
        try:
            if repanel is not None:
                self.net, self.genes, self.vocabulary = net, genes, None
                self.meta["panel"] = repanel[2]
            self._fit_stage(new, labels, names, labels_key, config, device)
            self.gene_shares = shares
        except BaseException:
            self.net, self.cell_types, self.bank, cal, self.genes, self.vocabulary, pan = before
            for key, value in (("novelty", cal), ("panel", pan)):
                self.meta.pop(key, None)
                if value is not None:
                    self.meta[key] = value
            raise
        self.match = match
        self._bank_missing_from = None
        return self

    def _choose_panel(self, parts: list, panel, config: StageConfig, match: GeneMatch
                      ) -> tuple[CanalNet, list[str], dict[str, Any]] | None:
        """The network and panel a first stage trains on (``None``: the model's own)."""
        first = self.stage == 0 and not self.cell_types
        if not first:
            if panel is not None:
                raise ValueError(f"the gene panel is chosen at the first stage; this model is "
                                 f"at stage {self.stage} with {len(self.cell_types)} cell types "
                                 f"and keeps its {len(self.genes)} genes (model.genes): drop "
                                 "panel= (--panel)")
            return None
        if panel is None or (isinstance(panel, str) and panel == "auto"):
            panel = "hvg" if self.vocabulary is not None else "pretrained"
        vocab_genes, vocab_emb = self.vocabulary_embedding()
        record: dict[str, Any] = {"stage": 1, "vocabulary_size": len(vocab_genes)}
        if isinstance(panel, str):
            if panel == "pretrained":
                record |= {"source": "pretrained", "n_genes": len(self.genes)}
                # a vocabulary is left out of the fine-tuned model, as with a new panel
                net = self.net if self.net.vocab is None else self._net_on_panel(
                    self.net.pos_emb.emb.weight[:len(self.genes)].detach())
                return net, list(self.genes), record
            if panel != "hvg":
                raise ValueError(f"panel must be 'auto', 'hvg', 'pretrained' or a list of gene "
                                 f"symbols, got {panel!r} (the CLI reads a list from a file: "
                                 "--panel genes.txt)")
            genes = pp.highly_variable_panel(parts, n_genes=config.n_panel, match=match)
            record |= {"source": "hvg", "flavor": "seurat", "n_panel": config.n_panel}
        else:
            genes = [str(g) for g in panel]
            if not genes:
                raise ValueError("panel= is an empty gene list; pass gene symbols, 'hvg' or "
                                 "'pretrained'")
            dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
            if dup:
                raise ValueError(f"panel= lists genes twice (e.g. {dup[:5]}); pass each once")
            record |= {"source": "list"}
        # gene vectors: vocabulary rows, co-expression for the others (on this stage's cells)
        lookup = {g.upper(): i for i, g in enumerate(vocab_genes)}
        rows = np.asarray([lookup.get(g.upper(), -1) for g in genes])
        known = rows >= 0
        emb = torch.zeros(len(genes), self.net.config.dim)
        emb[torch.from_numpy(known)] = vocab_emb[torch.from_numpy(rows[known])]
        if not known.all():
            from canal import pretrain

            X = concat([CellData.from_adata(a, genes, match=match) for a in parts]).X
            norm = float(vocab_emb.norm(dim=1).median())
            emb[torch.from_numpy(~known)] = torch.from_numpy(pretrain.coexpression_embedding(
                X, known, emb[torch.from_numpy(known)].numpy(), norm=norm, seed=config.seed))
        net = self._net_on_panel(emb)
        record |= {"n_genes": len(genes), "n_from_vocabulary": int(known.sum()),
                   "n_coexpression": int((~known).sum()),
                   "n_in_previous_panel": len(set(genes) & set(self.genes))}
        logger.info("stage 1 panel: %d genes (%s), %d with a vocabulary vector, %d from "
                    "co-expression", len(genes), record["source"], known.sum(), (~known).sum())
        return net, genes, record

    def _net_on_panel(self, gene_vectors: torch.Tensor) -> CanalNet:
        """A network with this one's encoder on a new panel: gene embeddings ``gene_vectors``
        (the extra token keeps its vector), a new classification head, no vocabulary."""
        old = self.net
        config = old.config.replace(n_genes=len(gene_vectors), n_vocab=0)
        net = CanalNet(config, n_classes=0).to(self.device)
        keep = {k: v for k, v in old.state_dict().items()
                if not k.startswith(("head.", "vocab.", "pos_emb."))}
        missing, unexpected = net.load_state_dict(keep, strict=False)
        if unexpected or any(not k.startswith(("head.", "pos_emb.")) for k in missing):
            raise RuntimeError(f"encoder weights do not carry over ({missing}, {unexpected})")
        with torch.no_grad():
            extra = old.pos_emb.emb.weight[old.config.n_genes:]
            net.pos_emb.emb.weight.copy_(torch.cat([gene_vectors.to(extra), extra]))
        return net

    def _reference_shares(self, parts: list, match: GeneMatch,
                          genes: Sequence[str] | None = None) -> pd.Series:
        """Gene shares of the first stage's files (a gene averaged over the files that have
        it)."""
        genes = self.genes if genes is None else genes
        stats = [pp.dataset_gene_shares(a, genes, match=match) for a in parts]
        weighted = pd.concat([s * n for s, n in stats], axis=1)
        cells = pd.concat([pd.Series(n, index=s.index) for s, n in stats], axis=1)
        return weighted.sum(axis=1) / cells.sum(axis=1)

    def _fit_stage(self, new: CellData, labels: pd.Series, names: np.ndarray, labels_key: str,
                   config: StageConfig, device) -> None:
        stage = self.stage + 1
        new_types = sorted(set(labels) - set(self.cell_types))
        distiller = None
        if config.uses_distillation:
            distiller = Distiller(config.distill_weight)
            distiller.snapshot(self.net, n_old_types=len(self.cell_types))
        self.net.head.grow(len(new_types), generator=torch.Generator().manual_seed(config.seed))
        self.cell_types += new_types
        new.labels = encode_labels(labels, self.cell_types, key=labels_key)
        replay = config.uses_replay and self.bank is not None and len(self.bank) > 0
        data, stages, cells = new, np.full(new.n_cells, stage), names
        if replay:
            old = self.bank.replay(self.cell_types)
            data = concat([new, old])
            stages = np.concatenate([stages, self.bank.obs["stage"].to_numpy()])
            cells = np.concatenate([cells, self.bank.obs["cell"].to_numpy(dtype=str)])
        logger.info("stage %d: %d new cells, %d replayed, %d new types %s", stage, new.n_cells,
                    data.n_cells - new.n_cells, len(new_types), new_types)

        result = run_stage(self.net, data, config=config, distiller=distiller,
                           device=settings.torch_device(device))

        if config.uses_replay:  # other strategies leave the bank as it was
            bank = ExampleBank(None if config.keeps_all else config.bank_size,
                               prototype=config.prototype)
            bank.update(data, np.asarray(self.cell_types)[data.labels], result.representations,
                        library=self.cell_types,
                        classifier_weight=self.net.head.classifier.weight.detach().float().cpu(),
                        stage=stages, cell_names=cells)
            self.bank = bank
        # calibrate on this stage's own held-out cells: replayed bank cells were trained on in
        # earlier stages and score as more typical than unseen cells (measured: twice the
        # false rejections on Kang's unseen donors, benchmarks/results/novelty_summary.md)
        val = result.val_index
        fresh = val[val < new.n_cells]
        cal_idx = fresh if len(fresh) >= 20 else val
        cal = self._fit_novelty(result.representations[cal_idx], result.logits[cal_idx],
                                score=config.novelty_score, fpr=config.novelty_fpr)
        self.meta["novelty"] = cal.to_dict() | {"stage": stage}
        self.stage = stage
        self.history.append({"stage": stage, "config": config.to_dict(), "n_cells": new.n_cells,
                             "n_replayed": data.n_cells - new.n_cells, "new_types": new_types,
                             "cell_types": list(self.cell_types), **result.history})

    def _fit_novelty(self, representations: torch.Tensor, logits: torch.Tensor, *,
                     score: str, fpr: float) -> novelty.NoveltyCalibration:
        """The split-conformal rule from known cells the model did not train on."""
        if len(representations) == 0:
            raise ValueError("no held-out cells to calibrate novelty on; keep val_fraction > 0 "
                             "or call model.calibrate_novelty(adata) with held-out known cells")
        predicted = np.asarray(self.cell_types)[logits.argmax(1).numpy()]
        params: dict[str, Any] = {}
        reference = self._reference()
        if reference is None and score in ("knn", "mahalanobis", "relative_mahalanobis"):
            # strategies without replay keep no bank to measure distances against
            logger.info("no example bank: novelty score %r falls back to 'energy'", score)
            score = "energy"
        if score in ("mahalanobis", "relative_mahalanobis"):
            params["mahalanobis"] = novelty.fit_mahalanobis(
                self.bank.representation, self.bank.labels, classes=self.cell_types,
                relative=score == "relative_mahalanobis")
        if score == "knn":
            params["k"] = min(10, len(reference) - 1)
        scores = novelty.novelty_scores(score, representation=representations, logits=logits,
                                        reference=reference, mahalanobis=params.get("mahalanobis"),
                                        k=params.get("k", 10), exclude_self=True)
        cal = novelty.fit_calibration(scores, predicted, score=score, fpr=fpr, params=params)
        logger.info("novelty calibrated on %d held-out cells (%s, fpr %.3g)", len(scores), score,
                    fpr)
        return cal

    def _reference(self) -> np.ndarray | None:
        """The kNN novelty score's reference: the example bank's representations."""
        if self.bank is None or self.bank.representation is None or len(self.bank) < 2:
            return None
        return self.bank.representation

    @property
    def novelty_calibration(self) -> novelty.NoveltyCalibration | None:
        """The stored calibrated novelty rule (``None`` before a stage)."""
        cal = self.meta.get("novelty")
        if not cal or cal.get("rule") != "conformal":
            return None
        return novelty.NoveltyCalibration.from_dict(cal)

    # ---------------------------------------------------------------------------------------
    # prediction and novelty calibration (see canal.annotate)
    # ---------------------------------------------------------------------------------------

    def calibrate_novelty(self, adata, *, fpr: float = 0.05, score: str | None = None,
                          batch_size: int = BATCH_SIZE, match: GeneMatch | dict | None = None
                          ) -> novelty.NoveltyCalibration:
        """Recalibrate the novelty rule on known cells the model did not train on.

        ``fit_stage`` calibrates on its validation cells; call this to calibrate on other
        held-out cells (e.g. another donor of known types, so that donor shift is in the
        calibration). Labels are not needed: each cell is grouped by its predicted type.

        Parameters
        ----------
        adata
            Held-out cells of known types (AnnData, or :class:`~canal.data.CellData`).
        fpr
            Share of known cells to call novel.
        score
            Novelty score (default: the stored rule's, else ``"knn"``).
        batch_size
            Cells per forward pass.
        match
            How AnnData input is read and matched (default: the model's).

        Returns
        -------
        The :class:`canal.novelty.NoveltyCalibration`, also stored in ``self.meta["novelty"]``
        and saved with the checkpoint; ``predict(..., novelty="calibrated")`` uses it.
        """
        if not self.cell_types:
            raise ValueError("the model has no cell types yet; calibrate after fit_stage")
        data = adata if isinstance(adata, CellData) else self.prepare(adata, match=match)
        rep, logits = self.outputs(data, batch_size=batch_size)
        old = self.novelty_calibration
        cal = self._fit_novelty(rep, logits, score=score or (old.score if old else "knn"),
                                fpr=fpr)
        self.meta["novelty"] = cal.to_dict() | {"stage": self.stage}
        return cal

    def predict(
        self,
        adata,
        *,
        key_added: str = "canal",
        novelty: Literal["calibrated", "mixup", "none"] = "calibrated",
        novelty_fpr: float | None = None,
        groupby: str | None = None,
        match: GeneMatch | dict | None = None,
        batch_size: int = BATCH_SIZE,
        precision: Literal["fp32", "bf16"] = "fp32",
        inplace: bool = True,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> pd.DataFrame | None:
        """Annotate cells with the known cell types, calling novel cells ``Unassigned``.

        Cells are streamed in batches (backed AnnData works; memory stays bounded).

        Parameters
        ----------
        adata
            Cells to annotate: raw counts or log-normalized (detected, never normalized twice),
            in memory or opened with ``backed="r"``. Genes are matched by symbol to the panel;
            panel genes the data lack are not measured and take no part in the computation.
        key_added
            Prefix of the fields written.
        novelty
            ``"calibrated"`` (default): the split-conformal rule fitted after the last stage on
            held-out known cells (:attr:`novelty_calibration`): a cell is ``Unassigned`` when
            its conformal p-value is at most ``novelty_fpr``, so about that share of cells of
            known types is rejected; each cell is scored on its own. ``"mixup"``: CANAL's
            transductive rule (scores min-max normalised over the cells given, mixup
            threshold; seeded), which rejected 15-25% of known cells in our runs (``"energy"``
            is its former name). ``"none"``: no ``Unassigned``.
        novelty_fpr
            Share of known cells to reject with ``"calibrated"`` (default: the one calibrated,
            ``StageConfig.novelty_fpr``). Re-thresholding afterwards needs no re-run:
            ``obs[f"{key_added}_novelty_p"] <= alpha``.
        groupby
            An ``adata.obs`` column of clusters: decide per cluster (a cluster is
            ``Unassigned`` when most of its cells are; known cells take their cluster's
            majority type, as CellTypist's majority voting); ``"auto"`` clusters the
            representation (Leiden on a kNN graph; transductive).
        batch_size
            Cells per forward pass; results do not depend on it.
        precision
            ``"bf16"`` autocasts the matrix products (faster on CPUs with bf16 support and on
            GPUs); ``"fp32"`` is exact.
        inplace
            Write into ``adata``; with ``False`` return a DataFrame and leave ``adata`` as is.
        match
            How ``adata`` is read and its genes matched: a :class:`canal.GeneMatch`, or a dict
            of fields to change in the model's (e.g. ``{"orthologs": True}`` for mouse cells
            and a human model). Default: the model's :attr:`match`.
        seed
            Seed of the ``"mixup"`` rule (and of ``groupby="auto"``).
        device
            Torch device; ``None`` uses ``canal.settings.device``.

        Returns
        -------
        With ``inplace=True`` nothing; sets ``adata.obs[key_added]`` (categorical: the types
        called, plus ``"Unassigned"``), ``adata.obs[f"{key_added}_confidence"]`` (float32,
        largest probability), ``adata.obs[f"{key_added}_novelty"]`` (float32 novelty score,
        higher = more novel; NaN with ``novelty="none"``),
        ``adata.obs[f"{key_added}_novelty_p"]`` (float32 conformal p-value),
        ``adata.obs[f"{key_added}_closed"]`` (most probable known type of every cell,
        ``Unassigned`` ones included), ``adata.obsm[f"X_{key_added}"]`` (float32
        representation), ``adata.obsm[f"{key_added}_probabilities"]`` (DataFrame, one column per
        known type), ``adata.uns[f"{key_added}_colors"]`` and ``adata.uns[key_added]["params"]``
        (novelty rule, score and fpr, panel genes measured and their share, gene match, stage,
        checkpoint, batch size, precision). With ``inplace=False`` a DataFrame indexed by
        ``adata.obs_names`` with the obs columns and one probability column per known type.
        """
        groups = None
        if groupby == "auto":
            groups = "auto"  # clustered from the same forward pass (see annotate)
        elif groupby is not None:
            if groupby not in adata.obs:
                raise KeyError(f"groupby column {groupby!r} not in adata.obs "
                               f"({list(adata.obs.columns)}); or pass groupby='auto'")
            groups = adata.obs[groupby].astype(str).to_numpy()
        result = annotate.annotate(
            self.net, adata, self.genes, self.cell_types, novelty=novelty,
            calibration=self.novelty_calibration, reference=self._reference(),
            fpr=novelty_fpr, groups=groups, match=GeneMatch.resolve(match, self.match),
            shares=self.gene_shares,
            batch_size=batch_size, precision=precision, seed=seed, device=device)
        if groupby is not None:
            result.params["groupby"] = groupby
        result.params.update(self.source)
        result.params["stage"] = self.stage
        result.params["panel"] = str((self.meta.get("panel") or {}).get("source", "pretrained"))
        if not inplace:
            return annotate.results_frame(result, adata.obs_names, key_added=key_added)
        annotate.write_results(adata, result, key_added=key_added)
        return None

    # ---------------------------------------------------------------------------------------
    # interpretability (see canal.explain)
    # ---------------------------------------------------------------------------------------

    def gene_importance(
        self,
        adata,
        *,
        groupby: str | None = "cell_type",
        n_top: int | None = 20,
        method: Literal["integrated_gradients", "grad_x_input"] = "integrated_gradients",
        steps: int = 8,
        batch_size: int = 16,
        key_added: str = "canal_gene_importance",
        match: GeneMatch | dict | None = None,
        device: str | torch.device | None = None,
    ) -> pd.DataFrame:
        """Which genes drive each cell type: per-type mean attribution of the type's logit.

        Each cell's own-type logit is attributed to its expressed genes relative to the same
        cell with no expression (every gene in bin 0), by integrated gradients (or gradient x
        input) on the expression-token embeddings; see :mod:`canal.explain`. Deterministic.

        Parameters
        ----------
        adata
            Cells (raw counts or log-normalized); genes are matched to the panel by symbol.
        groupby
            Column of ``adata.obs`` with the cell types to explain; cells of types the model
            does not know are left out. ``None`` (or a column that does not exist) explains
            the model's own predictions (argmax, no novelty detection).
        n_top
            Genes per type in the returned table (``None``: all).
        method
            ``"integrated_gradients"`` (``steps`` forward/backward passes per cell) or
            ``"grad_x_input"`` (one).
        steps
            Integration points of integrated gradients.
        batch_size
            Cells per forward/backward pass; results do not depend on it.
        key_added
            Key in ``adata.uns``.
        match
            How expression is read and genes matched (default: the model's).
        device
            Torch device; ``None`` uses ``canal.settings.device``.

        Returns
        -------
        A tidy DataFrame with columns ``type``, ``rank``, ``gene``, ``score`` (each type's
        ``n_top`` genes, best first). Sets ``adata.uns[key_added]``: ``scores`` (genes x types
        float32 array), ``genes``, ``types``, ``n_cells`` (cells per type) and ``params``
        (method, steps, groupby, timing, stage); read it back with
        ``canal.explain.GeneImportance.from_uns(adata.uns[key_added])``.
        """
        from canal import explain

        if not self.cell_types:
            raise ValueError("the model has no cell types yet; fine-tune it with fit_stage first")
        data = self.prepare(adata, match=match)
        if groupby is not None and groupby in adata.obs:
            labels = read_labels(adata, groupby).to_numpy()
        else:
            if groupby is not None:
                logger.warning("obs[%r] not found; explaining the model's own predictions",
                               groupby)
            _, logits = self.outputs(data, batch_size=max(batch_size, 64), device=device)
            labels = np.asarray(self.cell_types)[logits.argmax(1).numpy()]
            groupby = "prediction"
        result = explain.gene_importance(self.net, data, labels, genes=self.genes,
                                         cell_types=self.cell_types, method=method, steps=steps,
                                         batch_size=batch_size, device=device, groupby=groupby)
        result.params["stage"] = self.stage
        adata.uns[key_added] = result.to_uns()
        return result.top(n_top)
