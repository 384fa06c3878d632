"""Swap the fused ops into one Hugging Face model instance, and back.

``patch(model)`` gives each supported submodule of *this* instance its own ``forward`` (an instance
attribute, which shadows the class's): the classes, the modeling modules' functions and every other
instance stay as they were. ``unpatch(model)`` deletes those attributes, so the class's own forward
runs again. No parameter, buffer or state_dict key is touched.

- RMSNorm (``LlamaRMSNorm`` and the Qwen2, Qwen3 and Mistral copies, Qwen3's per-head ``q_norm`` and
  ``k_norm`` included) -> ``rms_norm``.
- MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` -> ``down_proj(swiglu(gate_proj(x), up_proj(x)))``,
  only where ``act_fn`` is SiLU.
- Attention: its forward calls the modeling module's global ``apply_rotary_pos_emb``. The patched
  forward is the class's own code, run with a copy of the module's globals in which that one name is
  ``apply_rope``; so attention itself (masks, caches, sliding windows, Qwen3's norms) is the class's.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types

import torch
from torch import nn

from .rms_norm import rms_norm as fused_rms_norm
from .rope import apply_rope
from .swiglu import swiglu as fused_swiglu

__all__ = ["SUPPORTED_MODEL_TYPES", "is_patched", "patch", "unpatch"]

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_CLASS_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
# Marks the forwards this module installs, so that unpatch() removes only its own.
_MARK = "_lopt_kernels_forward"


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return fused_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


def _apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    return apply_rope(q, k, cos, sin, unsqueeze_dim)


def _apply_rotary_pos_emb_with_position_ids(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return apply_rope(q, k, cos, sin, unsqueeze_dim)  # position_ids: "deprecated and unused" there


# What stands in for the modeling module's apply_rotary_pos_emb, by its parameters (older transformers
# still took an unused position_ids).
_ROPE_STAND_INS = {
    ("q", "k", "cos", "sin", "unsqueeze_dim"): _apply_rotary_pos_emb,
    ("q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"): _apply_rotary_pos_emb_with_position_ids,
}


setattr(_rms_norm_forward, _MARK, True)
setattr(_mlp_forward, _MARK, True)


def _modeling_classes(kind: str) -> set[type]:
    """The supported families' RMSNorm, MLP or Attention classes (exact types: a subclass may compute otherwise)."""
    classes = set()
    for model_type, prefix in _CLASS_PREFIX.items():
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            continue
        cls = getattr(module, prefix + kind, None)
        if cls is not None:
            classes.add(cls)
    return classes


def _is_silu(act_fn: object) -> bool:
    from transformers.activations import ACT2FN

    return isinstance(act_fn, (nn.SiLU, type(ACT2FN["silu"])))


def _attention_forward_with_rope(cls: type):
    """The class's forward with ``apply_rotary_pos_emb`` resolved to ``apply_rope``; None if it does not call it.

    The forward may be wrapped by decorators (``functools.wraps`` chains, e.g. transformers'
    ``deprecate_kwarg``): the function that calls RoPE is found down the ``__wrapped__`` chain, rebuilt
    with the stand-in, and every wrapper above it is rebuilt around the new inner function, so the
    decorators' own behaviour (argument renames, warnings) is kept.
    """
    chain = [cls.forward]
    while callable(getattr(chain[-1], "__wrapped__", None)) and len(chain) < 16:
        chain.append(chain[-1].__wrapped__)
    calls_rope = [fn for fn in chain if hasattr(fn, "__code__") and "apply_rotary_pos_emb" in fn.__code__.co_names]
    if not calls_rope:
        return None
    inner = calls_rope[-1]
    original = inner.__globals__.get("apply_rotary_pos_emb")
    stand_in = _ROPE_STAND_INS.get(tuple(inspect.signature(original).parameters)) if callable(original) else None
    if stand_in is None:
        return None
    patched = _rebuilt(inner, {**inner.__globals__, "apply_rotary_pos_emb": stand_in}, inner.__closure__)
    for wrapper, wrapped in zip(reversed(chain[: chain.index(inner)]), reversed(chain[1 : chain.index(inner) + 1])):
        closure = _closure_with(wrapper, wrapped, patched)
        if closure is None:
            return None  # the wrapper holds its inner function some other way: leave this class unfused
        patched = _rebuilt(wrapper, wrapper.__globals__, closure, wrapped=patched)
    setattr(patched, _MARK, True)
    return patched


def _rebuilt(fn, fn_globals: dict, closure, wrapped=None):
    """A copy of function ``fn`` with other globals and closure cells (and ``__wrapped__``, if given)."""
    copy = types.FunctionType(fn.__code__, fn_globals, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if wrapped is not None:
        copy.__wrapped__ = wrapped
    return copy


def _closure_with(wrapper, old, new):
    """``wrapper``'s closure with the cell that holds ``old`` replaced by one holding ``new``; None if none does."""
    cells, found = [], False
    for cell in wrapper.__closure__ or ():
        try:
            holds_old = cell.cell_contents is old
        except ValueError:  # an empty cell
            holds_old = False
        found |= holds_old
        cells.append(types.CellType(new) if holds_old else cell)
    return tuple(cells) if found else None


def _installed_forward(module: nn.Module):
    """The forward this module carries as an instance attribute, if any (class forwards live elsewhere)."""
    return module.__dict__.get("forward")


def _ours(forward) -> bool:
    return getattr(getattr(forward, "__func__", None), _MARK, False)


def patch(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> nn.Module:
    """Swap the fused RMSNorm, SwiGLU and RoPE into ``model`` (this instance only); returns ``model``.

    Supported: Llama, Qwen2, Qwen3 and Mistral modules of transformers. Patching twice changes nothing.
    A module whose forward was already replaced on the instance (e.g. by accelerate's hooks) is left alone.
    """
    norms = _modeling_classes("RMSNorm") if rms_norm else set()
    mlps = _modeling_classes("MLP") if swiglu else set()
    attentions = _modeling_classes("Attention") if rope else set()
    attention_forwards: dict[type, object] = {}
    skipped = 0
    for module in model.modules():
        cls = type(module)
        if cls in norms:
            forward = _rms_norm_forward
        elif cls in mlps and _is_silu(getattr(module, "act_fn", None)):
            forward = _mlp_forward
        elif cls in attentions:
            if cls not in attention_forwards:
                attention_forwards[cls] = _attention_forward_with_rope(cls)
                if attention_forwards[cls] is None:
                    logger.warning(
                        "lopt_kernels.patch: %s.forward calls no apply_rotary_pos_emb of a known "
                        "signature; its RoPE is left unfused",
                        cls.__name__,
                    )
            forward = attention_forwards[cls]
            if forward is None:
                continue
        else:
            continue
        installed = _installed_forward(module)
        if installed is not None:
            skipped += not _ours(installed)
            continue
        module.forward = types.MethodType(forward, module)
    if skipped:
        logger.warning(
            "lopt_kernels.patch: %d modules already had an instance-level forward and were left as they are", skipped
        )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: every module of ``model`` runs its class's forward again; returns ``model``."""
    for module in model.modules():
        if _ours(_installed_forward(module)):
            del module.forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a forward installed by ``patch``."""
    return any(_ours(_installed_forward(module)) for module in model.modules())
