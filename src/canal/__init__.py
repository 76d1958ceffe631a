"""canal: continual, universal cell-type annotation of single-cell RNA-seq data."""

from __future__ import annotations

__version__ = "0.1.0"

from canal import distributed, metrics, pl, pp  # noqa: E402
from canal._settings import settings  # noqa: E402
from canal.model import Annotator  # noqa: E402
from canal.nn import ModelConfig  # noqa: E402
from canal.pp import GeneMatch  # noqa: E402
from canal.pretrain import PretrainConfig  # noqa: E402
from canal.train import StageConfig  # noqa: E402

__all__ = ["Annotator", "GeneMatch", "ModelConfig", "PretrainConfig", "StageConfig",
           "__version__", "distributed", "metrics", "pl", "pp", "settings"]
