"""Rotary position embedding as Hugging Face's ``apply_rotary_pos_emb`` applies it, fused in Triton.

With x = [x1, x2] split at half the head dim and cos = [c1, c2], sin = [s1, s2] likewise
(``rotate_half(x) = [-x2, x1]``)::

    y = x * cos + rotate_half(x) * sin  =  [x1 * c1 - x2 * s1,  x2 * c2 + x1 * s2]

The kernel sees x [B, H, T, D] as B * H * T rows of D and rotates a tile of many rows per program
(BLOCK_R rows by the half width BLOCK_D, about ``_TILE_ELEMENTS`` elements of each half), finding each
row's (batch, position) for its cos/sin row; the rows are ordered so that neighbouring rows of a tile are
neighbours in memory, whichever of heads or positions is the inner dimension. q and k take one launch each
(so their head counts may differ, as in grouped-query attention). The map is linear in x, so the backward
is the same kernel with the transposed rotation; nothing but cos and sin is saved. The backward's backward
is the rotation again, so gradients of every order are exact.
"""

from __future__ import annotations

import torch

from .backend import current_backend, import_triton, num_warps, register_op, wrap_triton

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = ["apply_rope", "apply_rope_reference"]

# Elements of each half of x (x1, and as many of x2) one program rotates: BLOCK_R rows of BLOCK_D.
_TILE_ELEMENTS = 4096


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _rope_kernel(
    X,
    COS,
    SIN,
    OUT,
    n_rows,
    n_outer,
    n_inner,
    half,
    stride_x_b,
    stride_x_outer,
    stride_x_inner,
    stride_out_b,
    stride_out_outer,
    stride_out_inner,
    stride_cos_b,
    stride_cos_outer,
    stride_cos_inner,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Rotates BLOCK_R rows of x [B, H, T, D], row r = (b, outer, inner) with (outer, inner) = (H, T) or (T, H).

    Forward:  out = [x1 * c1 - x2 * s1,  x2 * c2 + x1 * s2].
    Backward: out = cos * x + rotate_half(x) * sin is A x with A = diag(cos) + diag(sin) R, where
    R = [[0, -I], [I, 0]]; so dx = A^T dout = cos * dout + R^T (sin * dout), R^T = [[0, I], [-I, 0]]:
        dx1 = dout1 * c1 + dout2 * s2,   dx2 = dout2 * c2 - dout1 * s1,
    which is the forward with (s1, s2) replaced by (-s2, -s1): the rotation by -sin.
    The head's stride into cos/sin is 0, so each row reads the cos/sin row of its (batch, position).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    inner = rows % n_inner
    outer = (rows // n_inner) % n_outer
    b = rows // n_inner // n_outer
    d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (d < half)[None, :]

    cs_ptr = (b * stride_cos_b + outer * stride_cos_outer + inner * stride_cos_inner)[:, None] + d[None, :]
    cos1 = tl.load(COS + cs_ptr, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + cs_ptr + half, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + cs_ptr, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + cs_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        sin1, sin2 = -sin2, -sin1

    x_ptr = X + (b * stride_x_b + outer * stride_x_outer + inner * stride_x_inner)[:, None] + d[None, :]
    out_ptr = OUT + (b * stride_out_b + outer * stride_out_outer + inner * stride_out_inner)[:, None] + d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
    tl.store(out_ptr, out1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_ptr + half, out2.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    batch, n_heads, seq_len, head_dim = x.shape
    # Keeps the input's layout (e.g. [B, T, H, D] memory under a [B, H, T, D] view), as eager PyTorch does.
    out = torch.empty_like(x)
    # Rows run over (batch, outer, inner), the inner dimension the one of smaller stride in x: heads for a
    # [B, T, H, D] projection seen as [B, H, T, D], positions for [B, H, T, D] memory. cos/sin have no head dim.
    if x.stride(1) < x.stride(2):
        dims, cos_strides = (2, 1), (cos.stride(1), 0)  # (outer, inner) = (T, H)
    else:
        dims, cos_strides = (1, 2), (0, cos.stride(1))  # (outer, inner) = (H, T)
    n_rows = batch * n_heads * seq_len
    block_d = triton.next_power_of_2(head_dim // 2)
    block_r = max(1, _TILE_ELEMENTS // block_d)  # not from n_rows: the constexprs stay fixed as B or T vary
    wrap_triton(_rope_kernel)[(triton.cdiv(n_rows, block_r),)](
        x, cos, sin, out, n_rows, x.shape[dims[0]], x.shape[dims[1]], head_dim // 2,
        x.stride(0), x.stride(dims[0]), x.stride(dims[1]),
        out.stride(0), out.stride(dims[0]), out.stride(dims[1]),
        cos.stride(0), *cos_strides,
        BLOCK_R=block_r, BLOCK_D=block_d, BACKWARD=backward, num_warps=num_warps(block_r * block_d),
    )  # fmt: skip
    return out


def _rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [B, T, D] (the same strides; batch stride may be 0).

    All unit stride along D.
    """
    return _rotate(q, cos, sin, backward), _rotate(k, cos, sin, backward)


# ----------------------------------------------------------------------------------------------------
# Registration


# For torch.compile (backend.register_op): the registered op while it traces, the launcher in eager.
_rope_op = register_op("rope", _rope)


# ----------------------------------------------------------------------------------------------------
# Autograd


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _RoPEFunction(torch.autograd.Function):
    """The rotation of (q, k), or with ``transposed`` its transpose: each is the other's backward.

    The map is linear in q and k, so under create_graph=True the backward is this Function again
    (transposed), and gradients of every order are exact.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, transposed):
        ctx.save_for_backward(cos, sin)
        ctx.transposed = transposed
        return _rope_op(_unit_stride_last(q), _unit_stride_last(k), cos, sin, transposed)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled():
            dq, dk = _RoPEFunction.apply(dq_out, dk_out, cos, sin, not ctx.transposed)
        else:
            dq, dk = _rope_op(_unit_stride_last(dq_out), _unit_stride_last(dk_out), cos, sin, not ctx.transposed)
        return dq, dk, None, None, None


# ----------------------------------------------------------------------------------------------------
# Reference


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` in plain PyTorch."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ----------------------------------------------------------------------------------------------------
# Public op


def _fusable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel covers these [B, H, T, D] inputs; anything else takes the reference."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    batch, _, seq_len, head_dim = q.shape
    return (
        k.shape[0] == batch
        and k.shape[2:] == q.shape[2:]
        and cos.shape[0] in (1, batch)
        and cos.shape[1:] == (seq_len, head_dim)
        and head_dim % 2 == 0
        and q.numel() > 0
        and k.numel() > 0
        and q.dtype == k.dtype == cos.dtype == sin.dtype != torch.float64
        and not (cos.requires_grad or sin.requires_grad)  # the kernel gives no gradient for cos/sin
    )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` [B, Hq, T, D] and ``k`` [B, Hk, T, D] by ``cos``/``sin`` [B or 1, T, D].

    ``unsqueeze_dim`` as in Hugging Face: 1 for [B, H, T, D] inputs, 2 for [B, T, H, D].
    The number of query and key heads may differ (grouped-query attention).
    """
    if unsqueeze_dim == 2 and q.dim() == 4 and k.dim() == 4:  # [B, T, H, D]: the kernel on [B, H, T, D] views
        q_out, k_out = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    if unsqueeze_dim != 1 or not _fusable(q, k, cos, sin) or current_backend(q.device) != "triton":
        return apply_rope_reference(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _RoPEFunction.apply(q, k, cos, sin, False)
