"""lopt: Local-Learning Post-Training (LoPT) with a boundary-scheduled training step."""

from .config import TrainConfig
from .model import AuxDecoder, LoPTModel, StepOutput
from .train import train

__all__ = ["AuxDecoder", "LoPTModel", "StepOutput", "TrainConfig", "train"]
