"""lopt: Local-Learning Post-Training (LoPT) with a boundary-scheduled training step.

The engine and the trainer (and with them torch and transformers) load on first use, so ``lopt --help``
and a bad path's error come back at once.
"""

from lopt.config import TrainConfig

_LAZY = {"AuxDecoder": ".engine.model", "LoPTModel": ".engine.model", "StepOutput": ".engine.model",
         "train": ".training.trainer", "apply": ".engine.integration", "remove": ".engine.integration",
         "LoPTCallback": ".engine.integration"}
__all__ = ["AuxDecoder", "LoPTCallback", "LoPTModel", "StepOutput", "TrainConfig", "apply", "remove", "train"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
