"""The grouped low-rank term of zeroth-order (ZO) perturbed linears, fused in Triton (forward only).

A ZO step (MeZO / LoZO) scores its 2P perturbed evaluations in one forward, stacked along the batch in
G groups of M rows (batch x tokens); group g sees W + scale[g] * U_b V_aᵀ (a = v_index[g], b = u_index[g]):

    out[g] += scale[g] * (x[g] @ V[a]) @ U[b]ᵀ          x [G, M, K], V [Pv, K, r], U [Pu, N, r]

The base product x @ Wᵀ is the caller's (cuBLAS); this adds the low-rank term in place, Punica /
S-LoRA's "shrink + expand" fused: a program takes BLOCK_M rows of one group, computes h = x_tile @ V[a]
([BLOCK_M, r] fp32, in registers) over K, then sweeps a span of output columns in BLOCK_N tiles:
out_tile = round(out_tile + (scale * h) @ U_tileᵀ). h never goes to memory, every sum is fp32, out is
rounded once. Columns are split over programs only as far as filling the GPU needs (each split
recomputes h). FLOPs: 2·M·r·(K + N) per group (the K part once per split) against 2·M·K·N for the
base GEMM, i.e. r/N + r/K of it (~8% at r = 128, K = 2048, N = 8192; 0.5% at r = 8); memory: one
read of x and a read and write of out. Ranks up to MAX_RANK (128); larger ones take the reference.
"""

from __future__ import annotations

import torch

from .backend import (
    current_backend,
    import_triton,
    persistent_programs,
    triton_available,
    triton_interpreted,
    wrap_triton,
)

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = ["grouped_lowrank", "grouped_lowrank_reference"]

# The widest rank the kernel holds in registers (h is [BLOCK_M, r] fp32); larger ranks take the reference.
MAX_RANK = 128
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Tiles (checked by tests/kernels/test_kernel_compile.py: no spills on sm_90, even without the alignment a GPU
# run's strides usually give). Rows: 64, one wgmma tile. Columns per tile: 64 with the bf16 expand (8
# warps), 32 with the tf32x3 one (its operand splits cost registers and shared memory). K per step: 64
# with 16-bit operands at r <= 32, else 32.
_BLOCK_M = 64
# Programs to aim for per SM when splitting columns (each split recomputes h); the interpreter: this many in all.
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 1
# The interpreter keeps bf16 as raw uint16 and its dot is numpy's: there the 16-bit dots run on fp32 copies
# (the same products, exact in fp32). A global constexpr, so the compiled kernels never see it.
_INTERPRETED = tl.constexpr(triton_interpreted()) if tl is not None else False


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _dot_16bit(a, b, acc):
    """acc + a @ b for 16-bit a and b, with fp32 sums."""
    if _INTERPRETED:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _cast_rtne(v, dtype: tl.constexpr):
    """fp32 ``v`` in ``dtype``, rounded to nearest even, as ``.to`` rounds on the GPU (the interpreter's
    fp32 -> bf16 cast truncates: there the rounding is done on the bits first, exact for finite values)."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        v = ((bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _grouped_lowrank_kernel(
    X, V, U, V_INDEX, U_INDEX, SCALE, OUT,
    M, N, K, R, m_tiles, n_splits, cols_per_program,
    stride_xg, stride_xm, stride_vp, stride_vk, stride_up, stride_un, stride_og, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    SHRINK_16BIT: tl.constexpr, EXPAND_SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """out[g, rows, span] (+)= (scale[g] * x[g, rows] @ V[a]) @ U[b, span]ᵀ for one (group, row tile,
    column span); the last dimension of every tensor has unit stride.

    SHRINK_16BIT: x and V share a 16-bit dtype (a native dot, fp32 sums); else both go to fp32 and the
    dot runs as tf32x3 (about fp32's accuracy on tensor cores). EXPAND_SPLIT: U is bf16 and h is split
    into bf16 high and low parts (two native dots, h kept to ~16 bits), else fp32 with tf32x3.
    ACCUMULATE: add to out (a zero scale then leaves the group's out untouched); else store the term.
    """
    pid = tl.program_id(0)
    split = pid % n_splits
    m_tile = (pid // n_splits) % m_tiles
    g = pid // (n_splits * m_tiles)
    scale = tl.load(SCALE + g)
    if ACCUMULATE:
        if scale == 0.0:
            return

    # Scalar 64-bit pointers to the tiles; int32 offsets within them (the launcher checks that they fit).
    row0 = m_tile * BLOCK_M
    x_tile = X + g.to(tl.int64) * stride_xg + row0.to(tl.int64) * stride_xm
    out_tile = OUT + g.to(tl.int64) * stride_og + row0.to(tl.int64) * stride_om
    v_mat = V + tl.load(V_INDEX + g).to(tl.int64) * stride_vp
    u_mat = U + tl.load(U_INDEX + g).to(tl.int64) * stride_up
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M - row0
    rk = tl.arange(0, R_PAD)
    r_mask = rk < R

    # Shrink: h = x_tile @ V[a], fp32.
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_tile + (rows[:, None] * stride_xm + k[None, :]), mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)  # fmt: skip
        v = tl.load(v_mat + (k[:, None] * stride_vk + rk[None, :]), mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if SHRINK_16BIT:
            h = _dot_16bit(x, v, h)
        else:
            h = tl.dot(x.to(tl.float32), v.to(tl.float32), h, input_precision="tf32x3")
    h = h * scale

    # Expand: out_tile (+)= h @ U_tileᵀ over this program's span of columns.
    if EXPAND_SPLIT:
        h_hi = _cast_rtne(h, tl.bfloat16)
        h_lo = _cast_rtne(h - h_hi.to(tl.float32), tl.bfloat16)
    col_start = split * cols_per_program
    col_end = tl.minimum(col_start + cols_per_program, N)
    for n0 in range(col_start, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < col_end
        u = tl.load(u_mat + (cols[:, None] * stride_un + rk[None, :]), mask=col_mask[:, None] & r_mask[None, :],
                    other=0.0)  # fmt: skip
        u_t = tl.trans(u)
        if EXPAND_SPLIT:
            acc = _dot_16bit(h_hi, u_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
            acc = _dot_16bit(h_lo, u_t, acc)
        else:
            acc = tl.dot(h, u_t.to(tl.float32), input_precision="tf32x3")
        mask = row_mask[:, None] & col_mask[None, :]
        out_ptrs = out_tile + (rows[:, None] * stride_om + cols[None, :])
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, _cast_rtne(acc, OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers


def _plan(groups: int, m: int, n: int, block_n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, n_splits, cols_per_program). BLOCK_M: 16 for M <= 16, else 64 (32 spills at r = 128 in fp32)."""
    block_m = 16 if m <= 16 else _BLOCK_M
    col_tiles = triton.cdiv(n, block_n)
    cuda = device.type == "cuda"
    target = persistent_programs(device, 1 << 30, _PROGRAMS_PER_SM) if cuda else _INTERPRETER_PROGRAMS
    n_splits = max(1, min(col_tiles, triton.cdiv(target, groups * triton.cdiv(m, block_m))))
    cols_per_program = triton.cdiv(col_tiles, n_splits) * block_n
    return block_m, triton.cdiv(n, cols_per_program), cols_per_program


def _grouped_lowrank_launch(
    x: torch.Tensor, V: torch.Tensor, U: torch.Tensor, v_index: torch.Tensor, u_index: torch.Tensor,
    scale: torch.Tensor, out: torch.Tensor, accumulate: bool,
) -> None:  # fmt: skip
    """The kernel on checked arguments (unit stride along the last dimension of x, V, U and out)."""
    groups, m, k = x.shape
    n, r = U.shape[1], U.shape[2]
    r_pad = max(16, triton.next_power_of_2(r))
    shrink_16bit = x.dtype != torch.float32 and V.dtype == x.dtype
    expand_split = x.dtype == torch.bfloat16 and U.dtype == torch.bfloat16
    block_n = min(64 if expand_split else 32, max(16, triton.next_power_of_2(n)))
    block_m, n_splits, cols_per_program = _plan(groups, m, n, block_n, x.device)
    m_tiles = triton.cdiv(m, block_m)
    wrap_triton(_grouped_lowrank_kernel)[(groups * m_tiles * n_splits,)](
        x, V, U, v_index, u_index, scale, out, m, n, k, r, m_tiles, n_splits, cols_per_program,
        x.stride(0), x.stride(1), V.stride(0), V.stride(1), U.stride(0), U.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64 if shrink_16bit and r_pad <= 32 else 32, R_PAD=r_pad,
        SHRINK_16BIT=shrink_16bit, EXPAND_SPLIT=expand_split, ACCUMULATE=accumulate,
        num_warps=8 if expand_split or r_pad > 32 else 4,
    )  # fmt: skip


def _register_inplace(name: str, launcher):
    """``backend.register_op`` for a launcher that writes its ``out`` argument: the op (which declares
    that) while torch.compile traces, the launcher in eager."""
    if not triton_available() or not hasattr(torch.library, "triton_op"):
        return launcher
    op = torch.library.triton_op(f"lopt_kernels::{name}", mutates_args=("out",))(launcher)

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else launcher(*args)

    return call


_grouped_lowrank_op = _register_inplace("grouped_lowrank", _grouped_lowrank_launch)


# ----------------------------------------------------------------------------------------------------
# Reference


def _check_args(x, V, U, v_index, u_index, scale, out) -> None:
    name = "grouped_lowrank"
    if x.dim() != 3 or V.dim() != 3 or U.dim() != 3:
        raise ValueError(f"{name}: x, V, U must be 3-D, got {x.dim()}-D, {V.dim()}-D, {U.dim()}-D")
    groups, _, k = x.shape
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: x has dtype {x.dtype}, expected a floating dtype")
    for label, t in (("V", V), ("U", U)):
        if t.dtype not in (torch.float32, x.dtype):
            raise ValueError(f"{name}: {label} has dtype {t.dtype}, expected float32 or x's {x.dtype}")
    if V.shape[1] != k or U.shape[2] != V.shape[2]:
        raise ValueError(f"{name}: V {tuple(V.shape)} and U {tuple(U.shape)} do not fit x {tuple(x.shape)}: "
                         f"expected V (Pv, {k}, r) and U (Pu, N, r)")  # fmt: skip
    for label, t in (("v_index", v_index), ("u_index", u_index)):
        if t.shape != (groups,) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: {label} is {t.dtype} {tuple(t.shape)}, expected int64 or int32 ({groups},)")
    if scale.shape != (groups,) or scale.dtype != torch.float32:
        raise ValueError(f"{name}: scale is {scale.dtype} {tuple(scale.shape)}, expected float32 ({groups},)")
    if out is not None:
        expected = (groups, x.shape[1], U.shape[1])
        if out.shape != expected or out.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: out is {out.dtype} {tuple(out.shape)}, expected a float {expected}")
    tensors = (x, V, U, v_index, u_index, scale) + (() if out is None else (out,))
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{name}: tensors on different devices: {[str(t.device) for t in tensors]}")


def grouped_lowrank_reference(x, V, U, v_index, u_index, scale, out=None) -> torch.Tensor:
    """The op (module docstring) in plain PyTorch: the CPU path and the test oracle.

    Computes in fp32 (float64 stays float64) and rounds once; groups with a zero scale leave ``out``
    untouched. Holds [G, K, r], [G, N, r] copies of the factors, and [G, M, N] of the term unless ``out``
    is in the compute dtype and no scale is zero (then it adds in place).
    """
    _check_args(x, V, U, v_index, u_index, scale, out)
    compute = torch.promote_types(x.dtype, torch.float32)
    h = torch.bmm(x.to(compute), V.to(compute)[v_index]) * scale.to(compute)[:, None, None]
    u = U.to(compute)[u_index].transpose(1, 2)
    if out is not None and out.dtype == compute and bool((scale != 0).all()):
        return out.baddbmm_(h, u)  # in place: no [G, M, N] temporaries (the CPU path of every ZO forward)
    term = torch.bmm(h, u)
    if out is None:
        return term.to(x.dtype)
    total = (out.to(compute) + term).to(out.dtype)
    out.copy_(torch.where((scale == 0)[:, None, None], out, total))
    return out


# ----------------------------------------------------------------------------------------------------
# Public op


def _fits_int32(t: torch.Tensor, rows: int) -> bool:
    """Whether the kernel's int32 offsets within a tile of ``rows`` rows of a [.., rows, cols] tensor fit."""
    return rows * abs(t.stride(1)) + t.shape[2] < 2**31


def grouped_lowrank(x, V, U, v_index, u_index, scale, out=None) -> torch.Tensor:
    """``out[g] += scale[g] * (x[g] @ V[v_index[g]]) @ U[u_index[g]].T`` for every group g, in place.

    x [G, M, K] (fp32, bf16 or fp16); V [Pv, K, r] and U [Pu, N, r] in fp32 or x's dtype; v_index,
    u_index [G] int64 (in range: checked on the device); scale [G] fp32; out [G, M, N]. Sums in fp32,
    one rounding to out's dtype; a zero scale leaves its group of ``out`` bit for bit. Returns ``out``,
    or with ``out=None`` a new tensor of x's dtype holding the term alone.
    Runs the Triton kernel where ``current_backend`` says so; float64, r > MAX_RANK (128), an ``out``
    without unit stride along its last dimension and row strides past int32 take the reference.
    """
    _check_args(x, V, U, v_index, u_index, scale, out)
    groups, m, k = x.shape
    n, r = U.shape[1], U.shape[2]
    fused = (
        r <= MAX_RANK
        and x.dtype != torch.float64
        and (out is None or (out.dtype != torch.float64 and out.stride(-1) == 1 and _fits_int32(out, _BLOCK_M)))
        and _fits_int32(x, _BLOCK_M) and _fits_int32(V, k) and _fits_int32(U, n)
        and current_backend(x.device) == "triton"
    )  # fmt: skip
    if not fused:
        return grouped_lowrank_reference(x, V, U, v_index, u_index, scale, out)
    accumulate = out is not None
    if out is None:
        out = x.new_empty((groups, m, n))
    if out.numel() == 0 or ((k == 0 or r == 0) and accumulate):
        return out
    if k == 0 or r == 0:
        return out.zero_()
    in_range = ((v_index >= 0) & (v_index < V.shape[0]) & (u_index >= 0) & (u_index < U.shape[0])).all()
    torch._assert_async(in_range, "grouped_lowrank: a v_index or u_index is out of range")
    x, V, U = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, V, U))
    _grouped_lowrank_op(x, V, U, v_index, u_index, scale, out, accumulate)
    return out
