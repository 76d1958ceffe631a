"""canal: continual, universal cell-type annotation of single-cell RNA-seq data."""

from __future__ import annotations

__version__ = "0.1.0"

from canal import distributed, metrics, pl, pp
from canal._settings import settings
from canal.model import Annotator
from canal.nn import ModelConfig
from canal.pp import GeneMatch
from canal.pretrain import PretrainConfig
from canal.train import StageConfig

__all__ = ["Annotator", "GeneMatch", "ModelConfig", "PretrainConfig", "StageConfig",
           "__version__", "distributed", "metrics", "pl", "pp", "settings"]
