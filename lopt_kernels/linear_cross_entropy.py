"""Fused lm_head + cross-entropy: ``cross_entropy(hidden @ weight.T + bias, labels)`` without the [N, V] logits.

Design (vocabulary-blocked, recompute in backward, the Cut-Cross-Entropy order on cuBLAS matmuls):

- The logits are produced one block of ``[block_tokens, block_vocab]`` at a time by a cuBLAS matmul into
  one reused buffer. ``block_vocab`` is wide (at least 4096 columns, or all of V) and ``block_tokens``
  is all tokens up to 16k, so the matmuls stay large and the buffer bounded (``_plan``: 64 MiB in bf16
  at 8k tokens, 128 MiB at most). The Triton kernels take up to 4096 logits per program: one row
  swept in tiles when blocks are wide, several rows at once when they are narrow.
- Forward: a Triton kernel folds each block into a running max ``m`` and sum-exp ``s`` per token
  (online softmax, fp32) and picks out the label's logit. Per token: ``lse = m + log s`` and
  ``loss = lse - logit[label]`` (0 where ``label == ignore_index``). Only ``lse`` ([N] fp32) is
  saved for backward: nothing vocabulary-sized outlives the forward, grads included.
- Backward: the blocks are recomputed; a Triton kernel overwrites each block in place with
  ``dlogits = g * (softmax - onehot)``, where ``g`` is the upstream gradient of each token's loss
  (so ``reduction="none"`` with any grad_output, ``"mean"`` and ``"sum"`` all take the same path).
  Then ``grad_weight[v-block] = dlogits^T @ hidden`` is written straight into its rows (one matmul
  with fp32 accumulation over all tokens, like the unfused op), ``grad_hidden += dlogits @ W[v-block]``
  accumulates in an [N, h] fp32 buffer, ``grad_bias[v-block] = dlogits.sum(0)`` in fp32. Gradients
  whose input has ``requires_grad=False`` are not computed.

That is four matmuls of ``N*V*h`` (one forward, three backward) against three for the unfused op or
Liger-Kernel's chunk-over-tokens version, which computes the gradients during the forward but then
keeps a [V, h] weight gradient alive from forward to backward and re-reads and rewrites it once per
token chunk. Here the weight gradient is written once, in full fp32-accumulated precision. Memory
beyond the inputs and their gradients (by the arithmetic, not yet measured on a GPU): the block
buffer plus an [N, h] fp32 grad_hidden accumulator, only during backward (~112 MiB at 8k tokens,
h=1536, V=151936: roughly 75 MiB more than Liger's chunk at that point, but Liger also holds its
[V, h] weight gradient from the forward through to the backward).

Wrapped as ``torch.library.custom_op`` ops (``lopt_kernels::linear_cross_entropy_fwd/_bwd``) with
fake implementations and registered autograd, so ``torch.compile`` (fullgraph) traces through it; a
second-order gradient through it raises (``backend.first_order_only``). No
host syncs: the mean's divisor stays on the device and label-range errors are raised by a device
assert. The reduction over tokens happens outside the ops in plain PyTorch, shared with the reference.

An all-ignored batch gives loss 0 (not NaN) and zero gradients under every reduction. fp64 inputs
take the reference.
``linear_cross_entropy_reference`` is the plain-PyTorch version: the CPU path, the oracle, and what
runs when kernels are off.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import current_backend, first_order_only, import_triton, num_warps
from .matmul import addmm_fp32_

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "lm_head_weight", "logits_block_elements"]

REDUCTIONS = ("mean", "sum", "none")

# Block plan (see _plan). Module-level so tests can shrink them to exercise several blocks.
_BLOCK_ELEMENTS = 1 << 25  # target logits-block size: 64 MiB in bf16
_MAX_BLOCK_ELEMENTS = 1 << 26  # past this many tokens x block_vocab, tokens are blocked too
_MIN_BLOCK_VOCAB = 4096  # narrower blocks make the fp32 grad_hidden read-modify-write dominate
_VOCAB_ALIGN = 128
_KERNEL_TILE = 4096  # logits a kernel program holds at once (rows x columns)
_KERNEL_MAX_COLS = 4096  # widest tile; wider rows are swept in several tiles


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _lse_block_kernel(
    logits_ptr,
    logits_row_stride,
    n_rows,
    n_cols,
    labels_ptr,
    max_ptr,
    sumexp_ptr,
    target_ptr,
    vocab_start,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Fold BLOCK_ROWS rows of a logits block (vocab columns vocab_start + [0, n_cols)) into each
    token's running max m and sum-exp s, in fp32:
        m' = max(m, max_j x_j),   s' = s * exp(m - m') + sum_j exp(x_j - m')
    and store x[label - vocab_start] as the token's target logit when the label lies in the block.
    m starts at the most negative finite float, so a block of -inf logits leaves (m, s) as they were.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows * logits_row_stride
    cols = tl.arange(0, BLOCK_COLS)
    m = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    s = tl.load(sumexp_ptr + rows, mask=row_mask, other=0.0)
    for start in range(0, n_cols, BLOCK_COLS):
        offs = start + cols
        mask = row_mask[:, None] & (offs < n_cols)[None, :]
        x = tl.load(row_ptrs[:, None] + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    tl.store(max_ptr + rows, m, mask=row_mask)
    tl.store(sumexp_ptr + rows, s, mask=row_mask)

    local = tl.load(labels_ptr + rows, mask=row_mask, other=-1) - vocab_start
    in_block = row_mask & (local >= 0) & (local < n_cols)
    x_label = tl.load(row_ptrs + local, mask=in_block, other=0.0).to(tl.float32)
    tl.store(target_ptr + rows, x_label, mask=in_block)


@triton.jit
def _logits_grad_kernel(
    logits_ptr,
    logits_row_stride,
    n_rows,
    n_cols,
    labels_ptr,
    lse_ptr,
    grad_loss_ptr,
    grad_loss_stride,
    vocab_start,
    ignore_index,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Overwrite BLOCK_ROWS rows of a logits block with the gradient of the loss w.r.t. those logits.
    With loss_i = lse_i - x_i,label and upstream gradient g_i:
        d loss_i / d x_ij = exp(x_ij - lse_i) - [j == label_i],   dlogits_ij = g_i * that,
    and g_i = 0 where label_i == ignore_index. Math in fp32, stored in the block's dtype.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows * logits_row_stride
    cols = tl.arange(0, BLOCK_COLS)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    g = tl.load(grad_loss_ptr + rows * grad_loss_stride, mask=row_mask, other=0.0).to(tl.float32)
    g = tl.where(labels == ignore_index, 0.0, g)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    local = labels - vocab_start
    for start in range(0, n_cols, BLOCK_COLS):
        offs = start + cols
        mask = row_mask[:, None] & (offs < n_cols)[None, :]
        ptrs = row_ptrs[:, None] + offs[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        d = tl.exp(x - lse[:, None]) - tl.where(offs[None, :] == local[:, None], 1.0, 0.0)
        tl.store(ptrs, (g[:, None] * d).to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops (with fake implementations) for torch.compile


def _launch(kernel, logits: Tensor, *args) -> None:
    """One program per BLOCK_ROWS rows of ``logits``, each sweeping the row in tiles of BLOCK_COLS."""
    n_rows, n_cols = logits.shape
    block_cols = min(triton.next_power_of_2(n_cols), _KERNEL_MAX_COLS)
    block_rows = min(triton.next_power_of_2(n_rows), max(1, _KERNEL_TILE // block_cols))
    kernel[(triton.cdiv(n_rows, block_rows),)](
        logits,
        logits.stride(0),
        n_rows,
        n_cols,
        *args,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps(block_rows * block_cols),
    )


def _plan(n_tokens: int, vocab: int) -> tuple[int, int]:
    """(block_tokens, block_vocab) of the logits blocks.

    Wide vocabulary blocks keep the matmuls efficient and the per-block fp32 accumulation of
    grad_hidden (a read and a write of [N, h] fp32) small next to the block's matmul; few tokens get
    wider blocks (fewer launches). Tokens are split only when the block would pass _MAX_BLOCK_ELEMENTS.
    """
    block_vocab = max(_MIN_BLOCK_VOCAB, _BLOCK_ELEMENTS // max(n_tokens, 1))
    block_vocab = min(vocab, -(-block_vocab // _VOCAB_ALIGN) * _VOCAB_ALIGN)
    block_tokens = max(1, min(n_tokens, _MAX_BLOCK_ELEMENTS // block_vocab))
    return block_tokens, block_vocab


def logits_block_elements(n_tokens: int, vocab: int) -> int:
    """Elements of the one logits buffer the op allocates for ``n_tokens`` tokens over ``vocab``."""
    block_tokens, block_vocab = _plan(n_tokens, vocab)
    return block_tokens * block_vocab


def _logits_block(buf: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """hidden @ weight.T (+ bias) into the front of ``buf``, as a contiguous [rows, cols] view."""
    out = buf[: hidden.shape[0] * weight.shape[0]].view(hidden.shape[0], weight.shape[0])
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


# The two ops. Shapes: hidden [N, h], weight [V, h], bias [V] or None, labels [N] int64 (contiguous).


@torch.library.custom_op("lopt_kernels::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per-token loss ([N] fp32, 0 where ignored) and log-sum-exp ([N] fp32)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    valid = labels != ignore_index
    torch._assert_async(
        (~valid | ((labels >= 0) & (labels < vocab))).all(),
        "linear_cross_entropy: a label is outside [0, vocab_size) and is not ignore_index",
    )
    run_max = torch.full((n_tokens,), torch.finfo(torch.float32).min, dtype=torch.float32, device=hidden.device)
    run_sumexp = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
    target = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
    block_tokens, block_vocab = _plan(n_tokens, vocab)
    buf = hidden.new_empty(block_tokens * block_vocab)
    for v0 in range(0, vocab, block_vocab):
        v1 = min(vocab, v0 + block_vocab)
        for n0 in range(0, n_tokens, block_tokens):
            n1 = min(n_tokens, n0 + block_tokens)
            logits = _logits_block(buf, hidden[n0:n1], weight[v0:v1], None if bias is None else bias[v0:v1])
            _launch(_lse_block_kernel, logits, labels[n0:n1], run_max[n0:n1], run_sumexp[n0:n1], target[n0:n1], v0)
    lse = run_max + run_sumexp.log()
    loss = torch.where(valid, lse - target, 0.0)
    return loss, lse


@_lce_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index):
    n_tokens = hidden.shape[0]
    return hidden.new_empty(n_tokens, dtype=torch.float32), hidden.new_empty(n_tokens, dtype=torch.float32)


@torch.library.custom_op("lopt_kernels::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for hidden, weight and bias; an empty tensor stands for each one not needed."""
    n_tokens, h = hidden.shape
    vocab = weight.shape[0]
    need_bias = need_bias and bias is not None
    block_tokens, block_vocab = _plan(n_tokens, vocab)
    token_blocked = block_tokens < n_tokens
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros(n_tokens, h, **f32) if need_hidden else None
    # every row of grad_weight is written below, unless there are no tokens at all
    grad_weight = (torch.empty_like(weight) if n_tokens else torch.zeros_like(weight)) if need_weight else None
    grad_weight_block = torch.empty(block_vocab, h, **f32) if need_weight and token_blocked else None
    grad_bias = torch.zeros(vocab, **f32) if need_bias else None
    buf = hidden.new_empty(block_tokens * block_vocab)

    for v0 in range(0, vocab, block_vocab):
        v1 = min(vocab, v0 + block_vocab)
        w_block = weight[v0:v1]
        if grad_weight_block is not None:
            grad_weight_block.zero_()
        for n0 in range(0, n_tokens, block_tokens):
            n1 = min(n_tokens, n0 + block_tokens)
            h_block = hidden[n0:n1]
            dlogits = _logits_block(buf, h_block, w_block, None if bias is None else bias[v0:v1])
            g_block = grad_loss[n0:n1]
            _launch(
                _logits_grad_kernel, dlogits, labels[n0:n1], lse[n0:n1], g_block, g_block.stride(0), v0, ignore_index
            )
            if need_hidden:
                addmm_fp32_(grad_hidden[n0:n1], dlogits, w_block)
            if need_weight:
                if token_blocked:
                    addmm_fp32_(grad_weight_block[: v1 - v0], dlogits.t(), h_block)
                else:
                    torch.mm(dlogits.t(), h_block, out=grad_weight[v0:v1])
            if need_bias:
                grad_bias[v0:v1] += dlogits.sum(0, dtype=torch.float32)
        if grad_weight_block is not None:
            grad_weight[v0:v1].copy_(grad_weight_block[: v1 - v0])

    return (
        grad_hidden.to(hidden.dtype) if need_hidden else hidden.new_empty(0),
        grad_weight if need_weight else hidden.new_empty(0),
        grad_bias.to(bias.dtype) if need_bias else hidden.new_empty(0),
    )


@_lce_bwd.register_fake
def _(grad_loss, hidden, weight, bias, labels, lse, ignore_index, need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0),
    )


# ----------------------------------------------------------------------------------------------------
# Autograd


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.ignore_index = ignore_index


@first_order_only("linear_cross_entropy")
def _backward(ctx, grad_loss, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = _lce_bwd(
        grad_loss, hidden, weight, bias, labels, lse, ctx.ignore_index, need_hidden, need_weight, need_bias
    )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None,
        None,
    )


_lce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Reference and public op


def _check_args(hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str, bias: Tensor | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match: "
            "expected hidden [..., h] and weight [V, h] (nn.Linear layout)"
        )
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has an empty vocabulary (an unmaterialised parameter?)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} (shift the labels before the call)"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be integer class indices, got {labels.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")


def _reduce(losses: Tensor, labels: Tensor, ignore_index: int, reduction: str, shape: torch.Size) -> Tensor:
    """losses: [N] per-token losses, 0 where ignored. Mean over non-ignored tokens; 0 if all are ignored."""
    if reduction == "none":
        return losses.view(shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: Tensor | None = None,
) -> Tensor:
    """``cross_entropy(F.linear(hidden, weight, bias), labels)`` in plain PyTorch, logits upcast to fp32.

    Materialises the [N, V] logits. Same contract as :func:`linear_cross_entropy`.
    """
    _check_args(hidden, weight, labels, reduction, bias)
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat_labels = labels.reshape(-1).long()
    losses = F.cross_entropy(
        logits.reshape(-1, weight.shape[0]), flat_labels, ignore_index=ignore_index, reduction="none"
    )
    return _reduce(losses, flat_labels, ignore_index, reduction, labels.shape)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without materialising the logits.

    hidden: [..., h]; weight: [V, h] (nn.Linear layout); labels: hidden's leading shape, integer class
    indices already shifted by the caller; bias: optional [V].
    reduction: "mean" over non-ignored tokens (0 when every token is ignored), "sum", or "none"
    (hidden's leading shape, 0 at ignored positions). The loss is fp32 (fp64 for fp64 inputs).
    For gradient accumulation normalised by the total token count, use "sum" and divide.
    Under autocast the inputs are cast to the autocast dtype, as F.linear would.
    Runs the Triton kernels or the PyTorch reference, per ``current_backend(hidden.device)``.
    """
    _check_args(hidden, weight, labels, reduction, bias)
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if not autocast and (weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype)):
        raise ValueError(
            f"linear_cross_entropy: hidden is {hidden.dtype} but weight/bias are "
            f"{weight.dtype}/{None if bias is None else bias.dtype}: cast them to one dtype (or use autocast)"
        )
    if current_backend(hidden.device) != "triton" or hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction, bias)

    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    flat_labels = labels.reshape(-1).long().contiguous()
    losses, _ = _lce_fwd(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_labels, ignore_index)
    return _reduce(losses, flat_labels, ignore_index, reduction, labels.shape)


_ADAPTER_ATTRS = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_magnitude_vector", "adapter_layer")


def lm_head_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a plain ``nn.Linear`` lm_head, for :func:`linear_cross_entropy`.

    Raises ValueError for anything else (a LoRA/adapter wrapper, a quantised or otherwise subclassed
    linear), whose output the raw weight would not reproduce, so an adapter is never silently skipped.
    """
    adapter = [name for name in _ADAPTER_ATTRS if hasattr(module, name)]
    if adapter:
        raise ValueError(
            f"lm_head is a {type(module).__name__} carrying an adapter ({', '.join(adapter)}): the fused loss "
            "needs a plain nn.Linear; merge the adapter into the weight or turn the fused loss off"
        )
    if _own_class(module) is not nn.Linear:
        raise ValueError(
            f"lm_head is a {type(module).__name__}, not a plain nn.Linear: the fused loss cannot use its "
            "weight directly; turn the fused loss off for this model"
        )
    if type(module.weight).__name__ == "DTensor":
        raise ValueError("lm_head's weight is sharded (a DTensor): the fused loss needs it gathered, as its "
                         "FSDP unit does only inside its own forward")
    return module.weight, module.bias


def _own_class(module: nn.Module) -> type:
    """The module's class, seen through FSDP2: ``fully_shard`` swaps in a subclass of ``FSDPModule`` and the
    class that adds only hooks (which gather the weights before the forward and scatter the gradients)."""
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing was sharded
    if fsdp is not None and len(cls.__bases__) == 2 and cls.__bases__[0] is fsdp.FSDPModule:
        return cls.__bases__[1]
    return cls
