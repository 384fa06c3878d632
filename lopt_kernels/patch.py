"""Swap the fused ops into one Hugging Face model instance, and back.

``patch(model)`` changes *this* instance only: the classes, the modeling modules' functions and every
other instance stay as they were; ``unpatch(model)`` undoes it; no parameter, buffer or state_dict key is
touched. ``fused_ops(model)`` counts what runs fused, per op.

- RMSNorm (``LlamaRMSNorm`` and the Qwen2, Qwen3 and Mistral copies, Qwen3's ``q_norm``/``k_norm``
  included) -> ``rms_norm``; MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU ->
  ``down_proj(swiglu(gate_proj(x), up_proj(x)))``. Both as an instance ``forward``, which shadows the
  class's (what ``kernels.kernelize`` itself does to a layer).
- RoPE, by what the installed transformers offers:
  * transformers >= 5.25 routes each attention's ``apply_rotary_pos_emb`` through the kernel hub (a
    per-instance wrapper layer named ``rotary_pos_emb``): ``apply_rope`` is plugged into this instance's
    wrapper with ``kernels.kernelize`` and a local mapping, the ecosystem's own mechanism, which also
    checks that our forward's signature matches the one it replaces;
  * older transformers call a plain module-level function: the attention's forward is rebuilt from the
    class's own code with that one global name resolved to ``apply_rope`` (decorators kept).
A supported module left unfused is named in one warning, with the transformers version. transformers
>= 5.25 also kernelizes a loaded model by itself (``use_kernels``, on by default) and again at every
``train()``/``eval()``, which would put its own choice back over ours: ``patch`` turns that off for this
model, and ``unpatch`` turns it on again.
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

__all__ = ["FUSED_OPS", "SUPPORTED_MODEL_TYPES", "fused_ops", "is_patched", "patch", "unpatch"]

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
FUSED_OPS = ("rms_norm", "swiglu", "rope")
_CLASS_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
# Marks the forwards this module installs with the op they run, so unpatch() removes only its own.
_MARK = "_lopt_kernels_op"
# The kernel hub's name for the RoPE function (transformers' ``@use_kernel_forward_from_hub``).
_HUB_ROPE = "rotary_pos_emb"
# Set on a model whose own kernelization patch() turned off, so that unpatch() turns it on again.
_KERNELIZED_BY_TRANSFORMERS = "_lopt_kernels_restore_use_kernels"


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


class FusedRoPE(nn.Module):
    """The kernel-hub layer for ``rotary_pos_emb``: stateless, with the signature of transformers' function."""

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return apply_rope(q, k, cos, sin, unsqueeze_dim)


class _LocalRepository:
    """A kernel-hub repository whose layer is already in memory (``FusedRoPE``): nothing is downloaded."""

    layer_name = "FusedRoPE"

    def load(self) -> type[nn.Module]:
        return FusedRoPE

    def __str__(self) -> str:
        return "lopt_kernels.patch.FusedRoPE"


_LOCAL_REPOSITORY = _LocalRepository()

setattr(_rms_norm_forward, _MARK, "rms_norm")
setattr(_mlp_forward, _MARK, "swiglu")
setattr(FusedRoPE.forward, _MARK, "rope")


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


# ------------------------------------------------------------------------------------ RoPE: the kernel hub


def _hub_rope_layers(attention: nn.Module) -> list[nn.Module]:
    """This attention's own kernel-hub RoPE layers (``kernels.use_kernelized_func`` keeps them per instance,
    where ``kernels.kernelize`` looks for them); empty where transformers calls a plain function."""
    layers = attention.__dict__.get("_kernel_funcs", {})
    return [layer for layer in layers.values() if getattr(type(layer), "kernel_layer_name", None) == _HUB_ROPE]


def _kernelize_rope(attention: nn.Module, layer: nn.Module) -> str | None:
    """Plug ``FusedRoPE`` into one hub layer of this attention; None when done, else why not."""
    try:
        from kernels import Mode, kernelize, use_kernel_mapping
    except ImportError as error:
        return f"the kernel hub's package is missing ({error})"
    device = "cuda" if any(p.is_cuda for p in attention.parameters()) else "cpu"  # only picks the mapping row
    try:
        with use_kernel_mapping({_HUB_ROPE: {device: _LOCAL_REPOSITORY}}, inherit_mapping=False):
            kernelize(layer, mode=Mode.TRAINING, device=device, use_fallback=False)
    except (TypeError, ValueError) as error:  # e.g. the hub layer's signature changed
        return f"kernels.kernelize refused it: {error}"
    return None


# ----------------------------------------------------------------------- RoPE: rebuilding older forwards


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
    is_function = inspect.isfunction(original)
    stand_in = _ROPE_STAND_INS.get(tuple(inspect.signature(original).parameters)) if is_function else None
    if stand_in is None:
        return None
    patched = _rebuilt(inner, {**inner.__globals__, "apply_rotary_pos_emb": stand_in}, inner.__closure__)
    for wrapper, wrapped in zip(reversed(chain[: chain.index(inner)]), reversed(chain[1 : chain.index(inner) + 1])):
        closure = _closure_with(wrapper, wrapped, patched)
        if closure is None:
            return None  # the wrapper holds its inner function some other way: leave this class unfused
        patched = _rebuilt(wrapper, wrapper.__globals__, closure, wrapped=patched)
    setattr(patched, _MARK, "rope")
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


# ------------------------------------------------------------------------------------------ the public API


def _installed_forward(module: nn.Module):
    """The forward this module carries as an instance attribute, if any (class forwards live elsewhere)."""
    return module.__dict__.get("forward")


def _op_of(forward) -> str | None:
    """The op a forward installed by this module runs; None for any other forward."""
    return getattr(getattr(forward, "__func__", None), _MARK, None)


class _Patcher:
    """One ``patch()`` call: installs forwards, remembers what it left unfused and why."""

    def __init__(self, rms_norm: bool, swiglu: bool, rope: bool):
        self.norms = _modeling_classes("RMSNorm") if rms_norm else set()
        self.mlps = _modeling_classes("MLP") if swiglu else set()
        self.attentions = _modeling_classes("Attention") if rope else set()
        self.rebuilt_forwards: dict[type, object] = {}
        self.unfused: dict[str, str] = {}  # "LlamaAttention (rope)" -> why
        self.kept = 0  # modules whose forward someone else replaced on the instance

    def module(self, module: nn.Module):
        cls = type(module)
        if cls in self.norms:
            self._install(module, _rms_norm_forward)
        elif cls in self.mlps and _is_silu(getattr(module, "act_fn", None)):
            self._install(module, _mlp_forward)
        elif cls in self.attentions:
            self._rope(module)

    def _install(self, module: nn.Module, forward):
        installed = _installed_forward(module)
        if installed is None:
            module.forward = types.MethodType(forward, module)
        elif _op_of(installed) is None:
            self.kept += 1

    def _rope(self, attention: nn.Module):
        cls = type(attention)
        hub_layers = _hub_rope_layers(attention)
        for layer in hub_layers:
            installed = _installed_forward(layer)
            if installed is not None:
                self.kept += _op_of(installed) is None
                continue
            why = _kernelize_rope(attention, layer)
            if why is not None:
                self.unfused[f"{cls.__name__} (rope)"] = why
        if hub_layers:
            return
        if cls not in self.rebuilt_forwards:
            self.rebuilt_forwards[cls] = _attention_forward_with_rope(cls)
        if self.rebuilt_forwards[cls] is None:
            self.unfused[f"{cls.__name__} (rope)"] = "its forward calls no apply_rotary_pos_emb of a known signature"
            return
        self._install(attention, self.rebuilt_forwards[cls])

    def report(self):
        if self.unfused:
            import transformers

            reasons = "; ".join(f"{where}: {why}" for where, why in self.unfused.items())
            logger.warning("lopt_kernels.patch: with transformers %s these run unfused (training is still correct): %s",
                           transformers.__version__, reasons)
        if self.kept:
            logger.warning("lopt_kernels.patch: %d modules already had an instance-level forward and were left as "
                           "they are", self.kept)


def patch(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> nn.Module:
    """Swap the fused RMSNorm, SwiGLU and RoPE into ``model`` (this instance only); returns ``model``.

    Supported: Llama, Qwen2, Qwen3 and Mistral modules of transformers. Patching twice changes nothing.
    A module whose forward was already replaced on the instance (e.g. by accelerate's hooks, or a kernel
    from the hub) is left alone. ``fused_ops(model)`` tells what runs fused.
    """
    patcher = _Patcher(rms_norm, swiglu, rope)
    for module in model.modules():  # first: turning it off resets every kernel-hub layer's forward
        if getattr(module, "use_kernels", False) is True:
            module.use_kernels = False
            setattr(module, _KERNELIZED_BY_TRANSFORMERS, True)
    for module in model.modules():
        patcher.module(module)
    patcher.report()
    return model


def _patched_layers(model: nn.Module):
    """Every (layer, op) of ``model`` that runs a forward installed by ``patch``, hub RoPE layers included."""
    for module in model.modules():
        for layer in (module, *_hub_rope_layers(module)):
            op = _op_of(_installed_forward(layer))
            if op is not None:
                yield layer, op


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: every module of ``model`` runs its class's forward again; returns ``model``."""
    for layer, _ in list(_patched_layers(model)):
        del layer.forward
        layer.__dict__.pop("_kernel_repo", None)  # kernels.kernelize's note of where the forward came from
    for module in model.modules():
        if module.__dict__.pop(_KERNELIZED_BY_TRANSFORMERS, False):
            module.use_kernels = True
    return model


def fused_ops(model: nn.Module) -> dict[str, int]:
    """How many modules of ``model`` run each fused op (``FUSED_OPS``' names; 0 where none does)."""
    counts = dict.fromkeys(FUSED_OPS, 0)
    for _, op in _patched_layers(model):
        counts[op] += 1
    return counts


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a forward installed by ``patch``."""
    return any(True for _ in _patched_layers(model))
