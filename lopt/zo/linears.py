"""The linears a ZO run trains, and their forwards over the 2P stacked evaluations.

Trained: the ``nn.Linear`` modules of the decoder layers at or above ``first_layer`` (their weights only),
in ``named_modules`` order; embeddings, norms, biases and lm_head stay frozen, as in zo-vllm. ``select``
narrows them (PEFT LoRA: the adapters' ``lora_A`` / ``lora_B`` linears; the wrapped base linear stays
frozen). Linear l's fullrank counters start at ``base`` = the numel of the trained linears before it, so
one seed per direction covers the model.

During a scored forward each trained linear's ``forward`` is replaced (an instance attribute, removed on
exit; ``installed``) by one that sees its input as G groups of M rows, G = 2P evaluations stacked along
the batch (group 2p: +εZ_p, 2p+1: −εZ_p), and never writes the weight:
- low rank: y = c·x·Wᵀ, then ``grouped_lowrank`` adds (x·V_g)·U_gᵀ per group, then the bias;
- fullrank: y = ``perturbed_linear``(x, W, seeds, ε, base) + bias (Z_p regenerated in the GEMM).
``LinearOps`` picks the Triton ops or their PyTorch references (``kernels``).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lopt_kernels.zo_lowrank import grouped_lowrank, grouped_lowrank_reference
from lopt_kernels.zo_matmul import (
    apply_directions_,
    apply_directions_reference_,
    perturbed_linear,
    perturbed_linear_reference,
)


@dataclass(frozen=True)
class TrainedLinear:
    name: str  # the weight's parameter name in the model ("model.layers.3.mlp.up_proj.weight")
    module: nn.Linear
    base: int  # first fullrank counter

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


class LinearOps(NamedTuple):
    grouped_lowrank: object
    perturbed_linear: object
    apply_directions_: object


def linear_ops(kernels: bool) -> LinearOps:
    """The Triton ops (which run the kernels where ``current_backend`` says so) or their references."""
    if kernels:
        return LinearOps(grouped_lowrank, perturbed_linear, apply_directions_)
    return LinearOps(grouped_lowrank_reference, perturbed_linear_reference, apply_directions_reference_)


def trained_linears(model: nn.Module, first_layer: int, select=None) -> list[TrainedLinear]:
    """The ``nn.Linear`` modules of ``model.model.layers[first_layer:]``, with their counter bases.
    ``select(name, module)``: keep only the linears it accepts (``name``: the module's in ``model``,
    ``"model.layers.3.self_attn.q_proj"``); None keeps every one."""
    layers = model.model.layers
    if not 0 <= first_layer < len(layers):
        raise ValueError(f"first_layer must be in [0, {len(layers)}), got {first_layer}")
    out, base = [], 0
    for i in range(first_layer, len(layers)):
        for name, module in layers[i].named_modules():
            if isinstance(module, nn.Linear) and (select is None or select(f"model.layers.{i}.{name}", module)):
                out.append(TrainedLinear(f"model.layers.{i}.{name}.weight", module, base))
                base += module.weight.numel()
    if not out:
        raise ValueError("no nn.Linear in the trained layers" + ("" if select is None else " that select accepts"))
    return out


@contextlib.contextmanager
def installed(linears: list[TrainedLinear], forward):
    """Within the block, linear l's forward is ``forward(l, x)``; an instance forward set before is put back."""
    saved = [lin.module.__dict__.get("forward") for lin in linears]
    for l, lin in enumerate(linears):
        lin.module.forward = functools.partial(forward, l)
    try:
        yield
    finally:
        for lin, previous in zip(linears, saved):
            if previous is None:
                del lin.module.forward
            else:
                lin.module.forward = previous


def lowrank_forward(module: nn.Linear, x, groups: int, v, u, v_index, u_index, scale, base_scale: float, op):
    """c·x·Wᵀ + Σ_g (x_g·V[v_index[g]])·U[u_index[g]]ᵀ·scale[g] + b over ``groups`` stacked groups."""
    y = F.linear(x, module.weight)
    if base_scale != 1.0:
        y.mul_(base_scale)
    op(x.reshape(groups, -1, x.shape[-1]), v, u, v_index, u_index, scale, out=y.view(groups, -1, y.shape[-1]))
    if module.bias is not None:
        y.add_(module.bias)
    return y


def fullrank_forward(module: nn.Linear, x, seeds, eps: float, base: int, op):
    """x_{2p}·(W + εZ_p)ᵀ, x_{2p+1}·(W − εZ_p)ᵀ (+ b), Z_p regenerated from ``seeds[p]`` at ``base``."""
    groups = 2 * len(seeds)
    y = op(x.reshape(groups, -1, x.shape[-1]), module.weight, seeds, eps, base).view(*x.shape[:-1], -1)
    if module.bias is not None:
        y = y + module.bias
    return y
