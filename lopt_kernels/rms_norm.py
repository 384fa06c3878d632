"""RMSNorm as Llama, Qwen2, Qwen3 and Mistral compute it, fused in Triton.

Hugging Face's ``LlamaRMSNorm.forward`` (the Qwen and Mistral ones are the same code)::

    h = x.to(float32)
    h = h * rsqrt(mean(h ** 2, -1) + eps)
    y = weight * h.to(x.dtype)          # dtype: promote(weight.dtype, x.dtype)

The kernels keep that order of casts: the normalised row is rounded to the input dtype before the
weight multiplies it. The forward saves ``x`` and one fp32 ``rstd`` per row; the backward recomputes
the normalised row from them. The backward kernel is not differentiable: a second-order gradient
raises (``backend.first_order_only``); ``rms_norm_reference`` has one.
"""

from __future__ import annotations

import torch

from .backend import (
    current_backend,
    first_order_only,
    import_triton,
    num_warps,
    persistent_programs,
    register_op,
    wrap_triton,
)

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = ["rms_norm", "rms_norm_reference"]

# The widest row one program holds in registers (as fp32): 64 KiB.
MAX_FUSED_COLS = 16384
# A program takes as many rows at once (up to _MAX_BLOCK_ROWS) as fill about this many elements: narrow
# rows (per-head norms, small models) share programs.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_ROWS = 64


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = w * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), for BLOCK_M rows at once."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # Rounded to the input dtype before the weight multiplies it, as Hugging Face does.
    x_hat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    y = w[None, :] * x_hat
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    n_rows,
    n_cols,
    rows_per_program,
    stride_dy,
    stride_x,
    stride_dx,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """Backward of y = w * x_hat, x_hat = x * rstd, over one contiguous span of rows.

    With g = dy * w (the gradient reaching x_hat; the cast to the input dtype passes it through):
        dx = rstd * (g - x_hat * mean(g * x_hat))     (the mean over the row)
        dw = sum over rows of dy * cast(x_hat)
    Each program sums its rows' dw in fp32 into its own row of DW_PARTIAL; the launcher adds them up.
    """
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        mean_g_x_hat = tl.sum(g * x_hat, axis=1) / n_cols
        dx = rstd[:, None] * (g - x_hat * mean_g_x_hat[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * x_hat.to(X.dtype.element_ty).to(tl.float32), axis=0)

    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers


def _block_rows(block_n: int) -> int:
    """BLOCK_M, from the width alone: the constexprs stay fixed as the number of rows varies."""
    return max(1, min(_TILE_ELEMENTS // block_n, _MAX_BLOCK_ROWS))


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [rows, cols], unit stride along cols. Returns (y, rstd)."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(n_cols)
    block_m = _block_rows(block_n)
    wrap_triton(_rms_norm_fwd_kernel)[(triton.cdiv(n_rows, block_m),)](
        x, weight, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m * block_n),
    )  # fmt: skip
    return y, rstd


def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x: [rows, cols], unit stride along cols. Returns (dx, dw); dw is empty unless compute_dw."""
    n_rows, n_cols = x.shape
    block_n = triton.next_power_of_2(n_cols)
    block_m = _block_rows(block_n)
    n_programs = persistent_programs(x.device, triton.cdiv(n_rows, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_programs), block_m) * block_m
    n_programs = triton.cdiv(n_rows, rows_per_program) if n_rows else 1
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    dw_partial = torch.empty((n_programs if compute_dw else 0, n_cols), dtype=torch.float32, device=x.device)
    wrap_triton(_rms_norm_bwd_kernel)[(n_programs,)](
        dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols, rows_per_program,
        dy.stride(0), x.stride(0), dx.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, COMPUTE_DW=compute_dw, num_warps=num_warps(block_m * block_n),
    )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else weight.new_empty((0,))
    return dx, dw


# ----------------------------------------------------------------------------------------------------
# Registration


# For torch.compile (backend.register_op): the registered ops while it traces, the launchers in eager.
_rms_norm_fwd_op = register_op("rms_norm_fwd", _rms_norm_fwd)
_rms_norm_bwd_op = register_op("rms_norm_bwd", _rms_norm_bwd)


# ----------------------------------------------------------------------------------------------------
# Autograd


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, rstd = _rms_norm_fwd_op(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(shape)

    @staticmethod
    @first_order_only("rms_norm")
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape)
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = _rms_norm_bwd_op(dy2d, x2d, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(dy.shape), (dw if ctx.needs_input_grad[1] else None), None


# ----------------------------------------------------------------------------------------------------
# Reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's RMSNorm in plain PyTorch (float64 stays float64, so it doubles as the test oracle)."""
    input_dtype = x.dtype
    h = x.to(torch.promote_types(input_dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


# ----------------------------------------------------------------------------------------------------
# Public op


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x``, scaled by ``weight`` ([x.shape[-1]]), as Llama/Qwen compute it."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected {tuple(x.shape[-1:])}")
    # The kernels compute in fp32: float64 (and rows too wide for one program, and empty input) take the reference.
    fused = x.shape[-1] <= MAX_FUSED_COLS and x.dtype != torch.float64 and x.numel() > 0
    if not fused or current_backend(x.device) != "triton":
        return rms_norm_reference(x, weight, eps)
    return _RMSNormFunction.apply(x, weight.contiguous(), float(eps))
