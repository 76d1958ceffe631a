"""canal: continual, universal cell-type annotation of single-cell RNA-seq data."""

from __future__ import annotations

__version__ = "0.1.0"

from canal import distributed, pp  # noqa: E402
from canal._settings import settings  # noqa: E402
from canal.model import Annotator  # noqa: E402
from canal.nn import ModelConfig  # noqa: E402

__all__ = ["Annotator", "ModelConfig", "__version__", "distributed", "pp", "settings"]
