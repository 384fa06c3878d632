"""``--shard``: data parallel with the weights, gradients and optimizer state split across the ranks (FSDP2).

``torchrun --nproc-per-node N -m lopt train --shard ...`` runs the data-parallel step of ``lopt.parallel.world``
(rank r runs micro-batches r, r+N, ... with the step's global token counts) on a model that PyTorch's
``fully_shard`` has cut into units (``shard_model``), each holding 1/N of its parameters on every rank.

Why FSDP2: a unit's gradients are reduce-scattered at the end of its own backward, which fits LoPT's several
backward passes per step as they are: each lower block's local backward reduces that block's gradients at
its boundary (so ``--early-lower-step`` steps the block there, sharded), and the task backward reduces the
upper block's. Every collective must be entered by every rank, so each rank runs the same number of
micro-batches per step (a rank short of one runs a copy with zero weight: its gradients are zeros).

Checkpoints stay whole and one-process shaped (``full_state``: each tensor gathered in turn, rank 0 keeps
it), so a sharded run resumes on any number of ranks, sharded or not, and vice versa (``shard_of``,
``shard_optimizer_state``: a rank's slice of a saved tensor). Usage and limits: docs/distributed.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lopt.errors import UsageError
from lopt.settings import TRAIN, refuse


def shard_model(engine: nn.Module, world, device: torch.device) -> None:
    """Split ``engine``'s causal LM across ``world``'s ranks in place: afterwards its parameters are DTensors
    holding this rank's shard (build optimizers after this).

    Units: one per decoder layer, one for the input embedding, and one for the final norm and the head
    together; the LoPT decoders (tiny) stay whole on every rank and their gradients are summed
    (``World.sum_grads``). A unit gathers its full weights for its forward and again for its backward, and
    frees them after. The norm and head unit stays gathered from the norm's forward to the end of its
    backward: the fused loss reads the head's weight directly, between the two. The reduction is a plain
    sum (FSDP's default divides by N): every rank weights its micro-batches by the whole step's token
    counts, so the sum is the one-process gradient. The units are called one by one (the engine runs
    layers, not the model's forward), so FSDP's one root (the causal LM) is initialised here rather than by
    its first forward."""
    hf_model = engine.model
    decoder = hf_model.model
    tied = hf_model.lm_head.weight is decoder.embed_tokens.weight
    refuse(dict(shard=True, num_blocks=engine.num_blocks, tied_head=tied), TRAIN)  # lopt train --shard calls this
    mesh = init_device_mesh(device.type, (world.size,))
    units = [decoder.embed_tokens, *decoder.layers]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    head = [decoder.norm, hf_model.lm_head]
    fully_shard(head, mesh=mesh, reshard_after_forward=False)  # gathered from the norm until the loss's backward
    fully_shard(hf_model, mesh=mesh)  # the root: owns no parameters of its own, holds the units' shared state
    for unit in [*units, decoder.norm, hf_model]:
        unit.set_gradient_divide_factor(1.0)  # a sum: the micro-batches carry the step's global weights
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    hf_model._get_fsdp_state()._lazy_init()  # what the root's first forward would do; ours never runs it


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: its shard, or the tensor itself where it is whole on every rank."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole of ``tensor`` (a collective where it is sharded: every rank must call it).

    ``like``: the sharded parameter whose layout a plain ``tensor`` shares (a local optimizer state of it)."""
    if like is not None and isinstance(like, DTensor) and not isinstance(tensor, DTensor):
        if tensor.shape != like.to_local().shape:
            return tensor  # a scalar state (a step count), the same on every rank
        tensor = DTensor.from_local(tensor, like.device_mesh, like.placements, shape=like.shape,
                                    stride=like.stride(), run_check=False)
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_of(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``whole``, laid out as the sharded ``like`` (on its device, in ``whole``'s dtype)."""
    if not isinstance(like, DTensor) or whole.shape != like.shape:
        return whole
    whole = whole.to(like.device)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local().clone()


def full_state(module: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` with every tensor whole, on the host where ``keep`` (rank 0), else None.
    One tensor is gathered at a time, so a rank holds at most one whole tensor beyond its shards."""
    state = {}
    for name, tensor in module.state_dict().items():
        whole = full(tensor)
        if keep:
            state[name] = whole.detach().cpu() if is_sharded(tensor) else whole
        del whole
    return state if keep else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
    """``optimizer.state_dict()`` with each state tensor of a sharded parameter made whole (one-process shaped)."""
    saved = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in saved["param_groups"] for i in group["params"]]
    for index, param in zip(indices, params):
        state = saved["state"].get(index)
        if state is None or not is_sharded(param):
            continue
        state = saved["state"][index] = dict(state)  # state_dict() hands out the live per-parameter dicts
        for key, value in list(state.items()):
            if torch.is_tensor(value):
                whole = full(value, like=param)
                state[key] = whole.cpu() if keep else None
    return saved if keep else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A whole (one-process) optimizer state dict for ``optimizer`` over sharded parameters: this rank's slices."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = [i for group in saved["param_groups"] for i in group["params"]]
    if len(indices) != len(params):
        raise UsageError(f"the checkpoint's optimizer holds {len(indices)} parameters where this model trains "
                         f"{len(params)}: it was written for another model or --num-blocks")
    state = {}
    for index, param in zip(indices, params):
        if index in saved["state"]:
            state[index] = {key: shard_of(value, param) if torch.is_tensor(value) else value
                            for key, value in saved["state"][index].items()}
    return dict(saved, state=state)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, world) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over parameters of which some are sharded: the norm of the whole
    gradient (the shards' squares summed over the ranks, the whole tensors' counted once), then the clip."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [local(g) for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    device = local(grads[0]).device
    squares = torch.zeros(2, device=device, dtype=torch.float32)
    for i, part in enumerate((sharded, whole)):
        if part:
            squares[i] = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in part]).sum()
    squares[0] = world.sum(squares[0:1].clone(), "summing the gradient norm")[0]
    norm = squares.sum().sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local(g).mul_(scale.to(g.dtype))
    return norm
