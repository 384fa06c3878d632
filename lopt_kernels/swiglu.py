"""SwiGLU, ``silu(gate) * up``: the gated activation of the Llama/Qwen/Mistral MLP, fused in Triton.

Hugging Face computes ``act_fn(gate_proj(x)) * up_proj(x)`` in two kernels and keeps ``silu(gate)`` for
the backward. Here one kernel computes it in fp32 (one rounding), and the backward recomputes the
sigmoid from the saved ``gate`` and ``up``: nothing else is kept. The backward kernel is not differentiable:
a second-order gradient raises (``backend.first_order_only``); ``swiglu_reference`` has one.
"""

from __future__ import annotations

import torch

from .backend import current_backend, first_order_only, import_triton, num_warps, register_op, wrap_triton

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = ["swiglu", "swiglu_reference"]

# One program takes a tile of BLOCK_R rows by BLOCK_C columns, about this many elements: many rows of a
# narrow input, a piece of one row of a wide one.
_TILE_ELEMENTS = 4096
# Columns one tile spans at most; a wider row is split across programs.
_MAX_BLOCK_COLS = 1024


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _swiglu_fwd_kernel(
    GATE,
    UP,
    OUT,
    n_rows,
    n_cols,
    stride_gate,
    stride_up,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out = silu(gate) * up = gate * sigmoid(gate) * up, on one BLOCK_R x BLOCK_C tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    gate = tl.load(GATE + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT,
    GATE,
    UP,
    DGATE,
    DUP,
    n_rows,
    n_cols,
    stride_dout,
    stride_gate,
    stride_up,
    stride_dgate,
    stride_dup,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward of out = silu(gate) * up on one BLOCK_R x BLOCK_C tile, with s = sigmoid(gate) recomputed.

    d silu / d gate = s + gate * s * (1 - s), so
        d_up   = d_out * gate * s
        d_gate = d_out * up * s * (1 + gate * (1 - s))
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dout = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    d_up = dout * gate * s
    d_gate = dout * up * s * (1.0 + gate * (1.0 - s))
    tl.store(DGATE + rows[:, None] * stride_dgate + cols[None, :], d_gate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + rows[:, None] * stride_dup + cols[None, :], d_up.to(DUP.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers


def _tiling(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, BLOCK_R, BLOCK_C, num_warps) for a [n_rows, n_cols] input."""
    block_c = min(triton.next_power_of_2(n_cols), _MAX_BLOCK_COLS)
    block_r = max(1, _TILE_ELEMENTS // block_c)  # not from n_rows: the constexprs stay fixed as it varies
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    return grid, block_r, block_c, num_warps(block_r * block_c)


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [rows, cols], unit stride along cols."""
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    grid, block_r, block_c, warps = _tiling(n_rows, n_cols)
    wrap_triton(_swiglu_fwd_kernel)[grid](
        gate, up, out, n_rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return out


def _swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, gate, up: [rows, cols], unit stride along cols. Returns (d_gate, d_up)."""
    n_rows, n_cols = gate.shape
    d_gate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    d_up = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    grid, block_r, block_c, warps = _tiling(n_rows, n_cols)
    wrap_triton(_swiglu_bwd_kernel)[grid](
        dout, gate, up, d_gate, d_up, n_rows, n_cols,
        dout.stride(0), gate.stride(0), up.stride(0), d_gate.stride(0), d_up.stride(0),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return d_gate, d_up


# ----------------------------------------------------------------------------------------------------
# Registration


# For torch.compile (backend.register_op): the registered ops while it traces, the launchers in eager.
_swiglu_fwd_op = register_op("swiglu_fwd", _swiglu_fwd)
_swiglu_bwd_op = register_op("swiglu_bwd", _swiglu_bwd)


# ----------------------------------------------------------------------------------------------------
# Autograd


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, cols] with unit stride along cols: a view where the layout allows (a fused projection's chunk)."""
    t2d = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate2d, up2d = _rows(gate), _rows(up)
        out = _swiglu_fwd_op(gate2d, up2d)
        ctx.save_for_backward(gate2d, up2d)
        return out.view(gate.shape)

    @staticmethod
    @first_order_only("swiglu")
    def backward(ctx, dout):
        gate2d, up2d = ctx.saved_tensors
        d_gate, d_up = _swiglu_bwd_op(_rows(dout), gate2d, up2d)
        return d_gate.view(dout.shape), d_up.view(dout.shape)


# ----------------------------------------------------------------------------------------------------
# Reference


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in plain PyTorch, as Hugging Face's MLP computes it."""
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------------------------------
# Public op


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate`` and ``up`` of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
            "must match in shape and dtype"
        )
    # The kernels compute in fp32: float64 (and empty or 0-d input) take the reference.
    fused = gate.dtype != torch.float64 and gate.numel() > 0 and gate.dim() > 0
    if not fused or current_backend(gate.device) != "triton":
        return swiglu_reference(gate, up)
    return _SwiGLUFunction.apply(gate, up)
