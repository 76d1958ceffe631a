"""Continual-learning policies: the example bank (replay) and the distiller."""

from canal.continual.bank import ExampleBank
from canal.continual.distill import Distiller

__all__ = ["Distiller", "ExampleBank"]
