"""One AdamW step on one parameter, fused in Triton: what ``torch.optim.AdamW`` computes, in one pass.

With g the gradient (first rounded to the moments' dtype), w the weight (the fp32 master copy where
there is one, else the parameter in fp32), t the step (1 on the first call), every value in fp32:

    w = w * (1 - lr * weight_decay)                            (decoupled weight decay)
    m = lerp(m, g, 1 - beta1)                                  -> exp_avg, in its dtype
    v = v * beta2 + (1 - beta2) * g * g                        -> exp_avg_sq, in its dtype
    denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    w = w - (lr / (1 - beta1^t)) * m / denom

That is ``torch.optim.AdamW``'s single-tensor arithmetic, in its order. Moments stored in bf16 are
rounded to nearest where PyTorch rounds them (``v * beta2`` too, before the sum), and the update uses
the rounded values. The master copy keeps ``w``; the parameter takes it rounded to nearest, except a
bf16 parameter without a master copy (bf16 moments), which is rounded stochastically: 16 uniform random
bits are added to the 16 low bits of w's fp32 pattern (those bf16 drops), which are then cleared, so
the parameter rounds up with probability equal to the dropped fraction and small updates survive in
expectation.

The same step as PyTorch ops (``adamw_step_reference``) is about ten elementwise kernels, each one a
full pass over the tensors, with fp32 temporaries the size of the tensor (bounded there by updating
large tensors in slices). The kernel reads each input once, writes each output once, and makes no
temporaries. Each program updates ``BLOCK`` consecutive values.
"""

from __future__ import annotations

import torch

from .backend import current_backend, import_triton

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = ["adamw_step", "adamw_step_reference"]

# Values per program on the GPU (8 per thread).
BLOCK = 1024
NUM_WARPS = 4
# The interpreter (CPU tests) pays more per program than per value: up to this many values per program.
INTERPRETER_BLOCK = 8192

# Values the reference updates at a time: bounds its fp32 temporaries (4M values: ~80 MB) instead of
# letting them cost ~20 bytes per value of the largest tensor (a 128k-vocab embedding).
STEP_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _adamw_step_kernel(
    PARAM,
    GRAD,
    EXP_AVG,
    EXP_AVG_SQ,
    MASTER,
    n_elements,
    decay,
    lerp_weight,
    beta2,
    one_minus_beta2,
    bias_correction2_sqrt,
    eps,
    step_size,
    SEED,
    HAS_MASTER: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The step (module docstring) on BLOCK consecutive values of every tensor."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    m_ty = EXP_AVG.dtype.element_ty  # one per line: the compiler rejects a tuple of dtypes
    v_ty = EXP_AVG_SQ.dtype.element_ty
    g = tl.load(GRAD + offsets, mask=mask, other=0.0).to(m_ty).to(tl.float32)
    m = tl.load(EXP_AVG + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(EXP_AVG_SQ + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_MASTER:
        w = tl.load(MASTER + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.load(PARAM + offsets, mask=mask, other=0.0).to(tl.float32)

    w = w * decay
    # torch.lerp's two forms: the one that starts from the nearer end.
    m = tl.where(lerp_weight < 0.5, m + lerp_weight * (g - m), g - (g - m) * (1.0 - lerp_weight))
    m = m.to(m_ty)
    v = (v * beta2).to(v_ty).to(tl.float32)  # PyTorch rounds the product (mul_)
    v = (v + one_minus_beta2 * g * g).to(v_ty)
    tl.store(EXP_AVG + offsets, m, mask=mask)
    tl.store(EXP_AVG_SQ + offsets, v, mask=mask)

    # The IEEE square root and divisions: tl.sqrt and "/" are approximate on NVIDIA GPUs.
    denom = tl.div_rn(tl.sqrt_rn(v.to(tl.float32)), bias_correction2_sqrt) + eps
    w = w - tl.div_rn(step_size * m.to(tl.float32), denom)

    if HAS_MASTER:
        tl.store(MASTER + offsets, w, mask=mask)
    if STOCHASTIC_ROUND:
        noise = tl.randint(tl.load(SEED), offsets) & 0xFFFF
        bits = w.to(tl.uint32, bitcast=True)
        w = ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)  # exact in bf16 from here
    tl.store(PARAM + offsets, w.to(PARAM.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher (no autograd: an in-place optimizer step)


def _adamw_step_triton(param, grad, exp_avg, exp_avg_sq, master, *, lr, beta1, beta2, eps, weight_decay, step,
                       generator):
    """Launch the kernel on contiguous tensors of the same shape (the scalars become fp32 kernel arguments)."""
    stochastic_round = master is None and param.dtype == torch.bfloat16
    # A fresh seed per call, drawn on the parameter's device (no host sync) from torch's generator, so
    # manual_seed and a saved RNG state reproduce it; the kernel reads it from memory, so a new value
    # compiles nothing new (an integer argument would be specialised on its value).
    seed = torch.randint(1 << 31, (1,), generator=generator, device=param.device) if stochastic_round else param
    n_elements = param.numel()
    block = BLOCK if param.device.type == "cuda" else min(INTERPRETER_BLOCK, triton.next_power_of_2(n_elements))
    _adamw_step_kernel[(triton.cdiv(n_elements, block),)](
        param, grad, exp_avg, exp_avg_sq, master if master is not None else param, n_elements,
        float(1 - lr * weight_decay), float(1 - beta1), float(beta2), float(1 - beta2),
        float((1 - beta2**step) ** 0.5), float(eps), float(lr / (1 - beta1**step)), seed,
        HAS_MASTER=master is not None, STOCHASTIC_ROUND=stochastic_round, BLOCK=block, num_warps=NUM_WARPS,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Reference


def adamw_step_reference(param, grad, exp_avg, exp_avg_sq, master, *, lr, beta1, beta2, eps, weight_decay, step,
                         generator=None) -> None:
    """The step (module docstring) as PyTorch ops, in place: the CPU path and the test oracle.

    Contiguous tensors are updated ``STEP_CHUNK_ELEMENTS`` values at a time, which bounds the fp32
    temporaries. The stochastic rounding's random bits come from ``generator`` (default: the global one
    of the parameter's device).
    """
    for part in _slices((param, grad, exp_avg, exp_avg_sq, master)):
        _reference_update(*part, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                          generator=generator)


def _reference_update(p, grad, exp_avg, exp_avg_sq, master, *, lr, beta1, beta2, eps, weight_decay, step,
                      generator):
    grad = grad.to(exp_avg.dtype)
    # The same arithmetic, in the same order, as torch.optim.AdamW's single-tensor path.
    weight = master if master is not None else (p if p.dtype == torch.float32 else p.float())
    weight.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.float().sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    weight.addcdiv_(exp_avg.float(), denom, value=-step_size)
    if weight is not p:
        p.copy_(weight if master is not None else _stochastic_round(weight, p.dtype, generator))


def _slices(tensors):
    """The same slice of every tensor (``None`` stays ``None``), ``STEP_CHUNK_ELEMENTS`` values at a time."""
    present = [t for t in tensors if t is not None]
    if not all(t.is_contiguous() for t in present):
        yield tensors
        return
    flat = [None if t is None else t.view(-1) for t in tensors]
    for start in range(0, present[0].numel(), STEP_CHUNK_ELEMENTS):
        yield [None if t is None else t[start : start + STEP_CHUNK_ELEMENTS] for t in flat]


def _stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator=None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the discarded fraction (unbiased)."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Public op


def adamw_step(param, grad, exp_avg, exp_avg_sq, master, *, lr, beta1, beta2, eps, weight_decay, step,
               generator=None) -> None:
    """One AdamW step on ``param``, in place (module docstring): ``exp_avg``, ``exp_avg_sq`` and ``master``
    (an fp32 copy of a lower-precision parameter, or None) are updated too.

    ``step`` counts from 1. A bf16 parameter without a master rounds stochastically, with random bits from
    ``generator`` (default: the global generator of the parameter's device; on the Triton path one draw
    from it seeds the kernel).
    Runs the Triton kernel where ``current_backend`` says so and every tensor is contiguous; else, and for
    float64 parameters (the kernel computes in fp32), ``adamw_step_reference``.
    """
    tensors = [t for t in (param, grad, exp_avg, exp_avg_sq, master) if t is not None]
    if any(t.shape != param.shape for t in tensors):
        raise ValueError(f"adamw_step: shapes differ: {[tuple(t.shape) for t in tensors]}")
    if param.numel() == 0:
        return
    fused = param.dtype != torch.float64 and all(t.is_contiguous() for t in tensors)
    step_fn = _adamw_step_triton if fused and current_backend(param.device) == "triton" else adamw_step_reference
    step_fn(param, grad, exp_avg, exp_avg_sq, master, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, generator=generator)
