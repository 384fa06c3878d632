"""lopt: Local-Learning Post-Training (LoPT) with a boundary-scheduled training step."""

from .model import AuxDecoder, LoPTModel

__all__ = ["AuxDecoder", "LoPTModel"]
