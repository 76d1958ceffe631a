"""Package-wide settings: compute device, progress bars, verbosity, data directory.

Only the ``canal`` logger is ever configured here; the root logger is left alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("canal")

_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG}


@dataclass
class _Settings:
    """Mutable settings object, exposed as ``canal.settings``.

    Attributes
    ----------
    device
        ``"auto"`` (CUDA when available, else CPU) or any ``torch.device`` string.
    progress
        Show tqdm progress bars.
    keep_heap
        While canal's forward and training loops run, ask glibc's malloc to keep freed memory
        (see :func:`canal.runtime.keep_heap`); ``CANAL_KEEP_HEAP=0`` turns it off.
    num_threads
        Torch intra-op threads (set at once with ``torch.set_num_threads``); reads torch's
        current value.
    """

    device: str = "auto"
    progress: bool = True
    keep_heap: bool = os.environ.get("CANAL_KEEP_HEAP", "1") != "0"
    _verbosity: str = "warning"

    @property
    def num_threads(self) -> int:
        return torch.get_num_threads()

    @num_threads.setter
    def num_threads(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"num_threads must be a positive integer, got {n!r}")
        torch.set_num_threads(int(n))

    @property
    def verbosity(self) -> str:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, level: str) -> None:
        if level not in _LEVELS:
            raise ValueError(f"verbosity must be one of {sorted(_LEVELS)}, got {level!r}")
        self._verbosity = level
        logger.setLevel(_LEVELS[level])
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("canal: %(message)s"))
            logger.addHandler(handler)

    def torch_device(self, device: str | torch.device | None = None) -> torch.device:
        """Resolve ``device`` (or the global setting) to a ``torch.device``."""
        choice = str(device) if device is not None else self.device
        if choice == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(choice)


settings = _Settings()


def data_dir() -> Path:
    """The shared data directory: ``$CANAL_DATA``, else ``../shared/data`` beside the project.

    The project root is found from the current directory and, for a source checkout or editable
    install, from this file's location.
    """
    env = os.environ.get("CANAL_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data", Path.cwd() / "shared" / "data"]
    candidates += [p / ".." / "shared" / "data" for p in here.parents[:4]]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return (Path.cwd() / ".." / "shared" / "data").resolve()
