"""Reference zeroth-order steps: MeZO and LoZO as plain in-place loops over the parameters (oracles).

Each step mutates the model as the published code does (princeton-nlp/MeZO ``large_models/trainer.py``
zo_step/zo_update; optsuite/LOZO ``large_models/LOZOtrainer.py`` lowrank_zo_step/update), same random
streams, so a batched engine scoring perturbed copies over frozen weights can be checked against them.

- ``mezo_step`` / ``lozo_step``: +εz, forward, -2εz, forward, +εz, update; they return the projected
  gradient and L± (the logged loss is L+).
- ``mezo_directions`` / ``lozo_perturbation_directions`` / ``lozo_update_directions``: the z or (u, v)
  of each parameter for a seed, regenerated.
- ``decays``: weight-decay rule; ``NO_DECAY`` (default) adds "norm" to the published ``MEZO_NO_DECAY``.

Every pass calls ``torch.manual_seed(seed)`` (global generators) and draws in the parameter's dtype and
device, as published; use fp32 weights. LoZO's refresh-step quirk and the choice made: ``lozo_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch)`` -> a one-element loss tensor (the batch mean, as the trainers' compute_loss)."""

MEZO_NO_DECAY: tuple[str, ...] = ("bias", "layer_norm", "layernorm")
"""MeZO's and LoZO's published exclusion: no weight decay for a name containing any of these."""

NO_DECAY: tuple[str, ...] = ("bias", "layer_norm", "layernorm", "norm")
"""The default here: the published list plus "norm" (Llama's ``model.norm``, Qwen3's ``q_norm``/``k_norm``)."""

CONSISTENT = "consistent"
PUBLISHED = "published"


@dataclass(frozen=True)
class ZOStepResult:
    """What one reference step measured. ``loss`` is the logged loss (L+, as both trainers return)."""

    seed: int
    projected_grad: float
    loss_plus: float
    loss_minus: float
    refreshed: bool = False  # LoZO only: this step drew a new v

    @property
    def loss(self) -> float:
        return self.loss_plus


class LowRank(NamedTuple):
    """A LoZO direction of an (m, n) weight: ``u`` (m, r) fresh each step, ``v`` (n, r) kept for ν steps."""

    u: torch.Tensor
    v: torch.Tensor

    def dense(self) -> torch.Tensor:
        """u·vᵀ, computed as the published code does (``u @ v.t()``)."""
        return self.u @ self.v.t()


# ----------------------------------------------------------------------------------------------------- shared


def draw_seed() -> int:
    """A fresh per-step seed the way both trainers draw it: ``np.random.randint(1000000000)``."""
    return int(np.random.randint(1000000000))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a step touches: ``requires_grad`` ones in ``named_parameters()`` order.

    ``named_parameters()`` lists a shared (tied) tensor once, under its first name, so a tied
    ``lm_head`` is perturbed once, through the embedding.
    """
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def decays(name: str, no_decay: tuple[str, ...] = NO_DECAY) -> bool:
    """Whether weight decay applies to parameter ``name``: no substring of ``no_decay`` occurs in it.

    The published rule (``MEZO_NO_DECAY``) exempts "bias", "layer_norm" and "layernorm", which covers
    every norm of OPT (MeZO's and LoZO's models: ``self_attn_layer_norm``, ``final_layer_norm``) and
    Llama's per-layer ``input_layernorm``/``post_attention_layernorm``, but not Llama/Qwen/Mistral's
    final ``model.norm`` nor Qwen3's ``self_attn.q_norm``/``k_norm``: under it those RMSNorm gains
    would be pulled towards 0 while the other norms are not. The default ``NO_DECAY`` adds "norm", so
    every normalisation gain is exempt; on OPT it selects exactly the published set (every OPT name
    containing "norm" contains "layer_norm"), so MeZO/LoZO runs on OPT are unchanged. Pass
    ``MEZO_NO_DECAY`` to reproduce the published rule on other families.
    """
    return not any(key in name for key in no_decay)


def projected_gradient(loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> float:
    """g = (L+ - L-)/(2ε), with the published arithmetic: in the losses' dtype, then ``.item()``."""
    return ((loss_plus - loss_minus) / (2 * eps)).item()


def _forward(model: nn.Module, loss_fn: LossFn, batch: Any) -> torch.Tensor:
    """The loss with dropout off and no autograd (``model.eval()`` + ``torch.inference_mode()``)."""
    model.eval()
    with torch.inference_mode():
        loss = loss_fn(model, batch)
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return one value, got a tensor of shape {tuple(loss.shape)}")
    return loss.detach().reshape(())


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The Hugging Face loss of ``model(**batch)`` (``batch`` carries ``labels``)."""
    return model(**batch).loss


def _gaussian_like(p: torch.Tensor) -> torch.Tensor:
    # MeZO's draw, verbatim in its arguments: the stream depends on size, device and dtype.
    return torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)


@torch.no_grad()
def _assign(p: nn.Parameter, value: torch.Tensor) -> None:
    # The published code rebinds ``param.data``; writing in place gives the same values and keeps the storage.
    p.copy_(value)


# ------------------------------------------------------------------------------------------------------ MeZO


def _mezo_stream(params, seed: int) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    torch.manual_seed(seed)
    for name, p in params:
        yield name, p, _gaussian_like(p)


def mezo_directions(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The z of every trainable parameter for ``seed``, as each MeZO pass regenerates it.

    ``torch.manual_seed(seed)``, then ``torch.normal(0, 1, p.size())`` in ``p``'s dtype and device for
    each trainable parameter in ``named_parameters()`` order. The stream depends on the device (CPU and
    CUDA differ) and on the dtype, so compare on the device and dtype the step ran with.
    """
    return {name: z for name, _, z in _mezo_stream(trainable_parameters(model), seed)}


def mezo_perturb_(model: nn.Module, seed: int, scaling_factor: float, eps: float) -> None:
    """One MeZO pass: θ <- θ + scaling_factor·z·ε for every trainable parameter (z from ``seed``).

    The step calls it with scaling_factor +1, -2, +1; the expression is the published one
    (``param + scaling_factor * z * eps``), so the values match it bit for bit.
    """
    for _, p, z in _mezo_stream(trainable_parameters(model), seed):
        _assign(p, p.data + scaling_factor * z * eps)


def mezo_estimate(model: nn.Module, loss_fn: LossFn, batch: Any, seed: int, *, eps: float):
    """MeZO's zo_step: (g, L+, L-) at the current θ, the model restored (up to rounding) on return.

    θ += εz; L+ = loss; θ -= 2εz; L- = loss; g = (L+ - L-)/(2ε); θ += εz. In exact arithmetic g is the
    central difference of L along z, g ≈ zᵀ∇L(θ) + O(ε²). In floating point the restore is not exact:
    each of the three passes rounds, so a weight ends within about 3 roundings of
    |θ| + 2ε|z| of where it started (the tests bound it).
    """
    mezo_perturb_(model, seed, 1, eps)
    loss_plus = _forward(model, loss_fn, batch)
    mezo_perturb_(model, seed, -2, eps)
    loss_minus = _forward(model, loss_fn, batch)
    g = projected_gradient(loss_plus, loss_minus, eps)
    mezo_perturb_(model, seed, 1, eps)
    return g, loss_plus, loss_minus


def mezo_update_(model: nn.Module, seed: int, projected_grad: float, *, lr: float, weight_decay: float = 0.0,
                 no_decay: tuple[str, ...] = NO_DECAY) -> None:
    """MeZO's zo_update: θ <- θ - lr·(g·z + wd·θ), without the wd term where ``decays`` says no.

    z is regenerated from ``seed`` (the same stream as the perturbation). This is SGD on the estimate
    ĝ = g·z with L2 decay inside the same lr product (the decay uses θ after the restore).
    ``lr`` is the scheduler's current learning rate at update time (the trainer's ``_get_learning_rate()``).
    """
    for name, p, z in _mezo_stream(trainable_parameters(model), seed):
        if decays(name, no_decay):
            _assign(p, p.data - lr * (projected_grad * z + weight_decay * p.data))
        else:
            _assign(p, p.data - lr * (projected_grad * z))


def mezo_step(model: nn.Module, loss_fn: LossFn, batch: Any, seed: int, *, eps: float, lr: float,
              weight_decay: float = 0.0, no_decay: tuple[str, ...] = NO_DECAY) -> ZOStepResult:
    """One MeZO step (zo_step then zo_update) with the per-step ``seed``; mutates ``model``.

    The model is left in the training mode it had (the passes run in eval mode, no autograd).
    """
    was_training = model.training
    g, loss_plus, loss_minus = mezo_estimate(model, loss_fn, batch, seed, eps=eps)
    mezo_update_(model, seed, g, lr=lr, weight_decay=weight_decay, no_decay=no_decay)
    model.train(was_training)
    return ZOStepResult(seed, g, loss_plus.item(), loss_minus.item())


# ------------------------------------------------------------------------------------------------------ LoZO


def is_refresh_step(step: int, interval: int) -> bool:
    """LoZO draws a new v on steps 0, ν, 2ν, ... (``step % step_interval == 0``, step counted from 0)."""
    return step % interval == 0


def _lozo_stream(params, seed: int, step: int, v: dict[str, torch.Tensor], *, rank: int, interval: int,
                 draw_v: bool) -> Iterator[tuple[str, nn.Parameter, LowRank | torch.Tensor]]:
    """LoZO's draws for one pass: per 2-D parameter [v (n, r) if ``draw_v``] then u (m, r); else z."""
    torch.manual_seed(seed)
    for name, p in params:
        if p.ndim >= 2:
            if p.ndim > 2:
                raise ValueError(f"LoZO's u·vᵀ needs a matrix; {name} has shape {tuple(p.shape)}")
            if draw_v:
                v_mat = torch.randn(p.size(1), rank, device=p.device, dtype=p.dtype)
            elif name in v:
                v_mat = v[name]
            else:
                raise KeyError(f"no kept v for {name} at step {step} (not a refresh step of ν={interval})")
            u = torch.randn(p.size(0), rank, device=p.device, dtype=p.dtype)
            yield name, p, LowRank(u, v_mat)
        else:
            yield name, p, _gaussian_like(p)


def _check_stream_mode(refresh_stream: str) -> None:
    if refresh_stream not in (CONSISTENT, PUBLISHED):
        raise ValueError(f"refresh_stream must be {CONSISTENT!r} or {PUBLISHED!r}, got {refresh_stream!r}")


def lozo_perturbation_directions(model: nn.Module, seed: int, step: int, v: dict[str, torch.Tensor], *,
                                 rank: int, interval: int) -> dict[str, LowRank | torch.Tensor]:
    """The directions LoZO's ± passes use at ``step``: ``LowRank(u, v)`` per 2-D parameter, z otherwise.

    On a refresh step the v's are drawn here (``v`` may be empty and is not modified); on other steps
    they are taken from ``v`` (the kept store, as ``lozo_step`` leaves it).
    """
    draw_v = is_refresh_step(step, interval)
    stream = _lozo_stream(trainable_parameters(model), seed, step, v, rank=rank, interval=interval, draw_v=draw_v)
    return {name: d for name, _, d in stream}


def lozo_update_directions(model: nn.Module, seed: int, step: int, v: dict[str, torch.Tensor], *, rank: int,
                           interval: int, refresh_stream: str = CONSISTENT) -> dict[str, LowRank | torch.Tensor]:
    """The directions LoZO's update applies at ``step`` (``v``: the store after this step's passes).

    Equal to ``lozo_perturbation_directions`` except on refresh steps with ``refresh_stream="published"``
    (see ``lozo_step``).
    """
    _check_stream_mode(refresh_stream)
    draw_v = is_refresh_step(step, interval) and refresh_stream == CONSISTENT
    stream = _lozo_stream(trainable_parameters(model), seed, step, v, rank=rank, interval=interval, draw_v=draw_v)
    return {name: d for name, _, d in stream}


def _direction_tensor(d: LowRank | torch.Tensor) -> torch.Tensor:
    return d.dense() if isinstance(d, LowRank) else d


def lozo_perturb_(model: nn.Module, seed: int, step: int, v: dict[str, torch.Tensor], scaling_factor: float,
                  eps: float, *, rank: int, interval: int) -> None:
    """One LoZO pass: θ <- θ + scaling_factor·(u·vᵀ)·ε per matrix, θ + scaling_factor·z·ε otherwise.

    On a refresh step it draws the v's and stores them in ``v`` (every pass redraws the same ones:
    same seed, same stream positions), as the published lowrank_zo_perturb_parameters does.
    """
    draw_v = is_refresh_step(step, interval)
    for name, p, d in _lozo_stream(trainable_parameters(model), seed, step, v, rank=rank, interval=interval,
                                   draw_v=draw_v):
        if isinstance(d, LowRank):
            v[name] = d.v
        _assign(p, p.data + scaling_factor * _direction_tensor(d) * eps)


def lozo_update_(model: nn.Module, seed: int, step: int, v: dict[str, torch.Tensor], projected_grad: float, *,
                 rank: int, interval: int, lr: float, weight_decay: float = 0.0,
                 no_decay: tuple[str, ...] = NO_DECAY, refresh_stream: str = CONSISTENT) -> None:
    """LoZO's update: θ <- θ - lr·(g·u·vᵀ + wd·θ) per 2-D parameter, θ - lr·(g·z + wd·θ) otherwise.

    The wd term is dropped where ``decays`` says no (the same name rule for matrices and vectors).
    No 1/r or other scaling of u·vᵀ: the published code has none (a rank factor, if any, lives in lr).
    """
    directions = lozo_update_directions(model, seed, step, v, rank=rank, interval=interval,
                                        refresh_stream=refresh_stream)
    for name, p in trainable_parameters(model):
        direction = _direction_tensor(directions[name])
        if decays(name, no_decay):
            _assign(p, p.data - lr * (projected_grad * direction + weight_decay * p.data))
        else:
            _assign(p, p.data - lr * (projected_grad * direction))


def lozo_step(model: nn.Module, loss_fn: LossFn, batch: Any, seed: int, step: int, v: dict[str, torch.Tensor], *,
              rank: int = 2, interval: int = 50, eps: float, lr: float, weight_decay: float = 0.0,
              no_decay: tuple[str, ...] = NO_DECAY, refresh_stream: str = CONSISTENT) -> ZOStepResult:
    """One LoZO step at 0-based ``step`` (lowrank_zo_step then lowrank_zo_update); mutates ``model`` and ``v``.

    What the published LOZOtrainer does (rank r = ``rank_r``, default 2; ν = ``step_interval``,
    default 50; its first step is step 0):
    - every trainable parameter with ndim >= 2 (embeddings and lm_head included) is perturbed by
      ε·u·vᵀ, v = randn(n, r) kept in ``v[name]`` and redrawn on steps with step % ν == 0, u = randn(m, r)
      fresh every step; every other parameter (biases, norms) by ε·z, z = normal(0, 1, p.size()) fresh
      every step, as in MeZO. Per pass: ``manual_seed(seed)``, then in ``named_parameters()`` order
      [v if refresh] u per matrix, z per vector.
    - passes +1, -2, +1 (two forwards, eval mode, no autograd), g = (L+ - L-)/(2ε), logged loss L+;
    - update θ -= lr·(g·u·vᵀ + wd·θ) (z for vectors), no decay for names with bias/layer_norm/layernorm;
      no 1/r factor anywhere.

    The refresh-step stream quirk: the published update reseeds and draws only u (and z), never v,
    while on a refresh step the perturbation passes drew v before u for every matrix. So on refresh
    steps the update's u comes from the stream positions where the perturbation drew v, and every
    later draw is shifted: each matrix's u and every vector's z after the first matrix differ from
    those the loss difference g was measured along. The refresh step's update is then g·u'·vᵀ with u'
    independent of g: a zero-mean random step in the new subspace, not a descent step (1 step in ν).

    Behaviour chosen: ``refresh_stream="consistent"`` (the default) updates along exactly the direction
    the step measured (the update replays the perturbation's stream, drawing and discarding v on
    refresh steps), which is LoZO's algorithm as written (ĝ built from the same U_t V_k as the
    difference) and what zo-vllm's controller does. ``refresh_stream="published"`` reproduces the
    official trainer's parameters bit for bit, quirk included. The two differ only on refresh steps.
    """
    _check_stream_mode(refresh_stream)
    if not is_refresh_step(step, interval):  # fail before touching a weight
        missing = [n for n, p in trainable_parameters(model) if p.ndim >= 2 and n not in v]
        if missing:
            raise KeyError(f"no kept v for {missing[0]} (and {len(missing) - 1} more) at step {step}, "
                           f"which is not a refresh step of ν={interval}")
    was_training = model.training
    kw = dict(rank=rank, interval=interval)
    lozo_perturb_(model, seed, step, v, 1, eps, **kw)
    loss_plus = _forward(model, loss_fn, batch)
    lozo_perturb_(model, seed, step, v, -2, eps, **kw)
    loss_minus = _forward(model, loss_fn, batch)
    g = projected_gradient(loss_plus, loss_minus, eps)
    lozo_perturb_(model, seed, step, v, 1, eps, **kw)
    lozo_update_(model, seed, step, v, g, lr=lr, weight_decay=weight_decay, no_decay=no_decay,
                 refresh_stream=refresh_stream, **kw)
    model.train(was_training)
    return ZOStepResult(seed, g, loss_plus.item(), loss_minus.item(), refreshed=is_refresh_step(step, interval))
