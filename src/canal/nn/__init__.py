"""Torch-only building blocks: the Performer encoder, gene embedding and heads."""

from canal.nn.net import CanalNet, CellOutput, ClassifierHead, ModelConfig
from canal.nn.performer import Performer
from canal.nn.scbert import load_scbert_state_dict

__all__ = ["CanalNet", "CellOutput", "ClassifierHead", "ModelConfig", "Performer",
           "load_scbert_state_dict"]
