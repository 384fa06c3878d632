"""The auxiliary decoder's reconstruction loss, fused with its backward: the lower block's gradient seed.

    x = LayerNorm(h_out; ln_weight, ln_bias, eps)          [N, h]
    z = x @ w1^T + b1                                      [N, d]   (d = h/4 in LoPT; any d works)
    a = gelu(z)   (exact, erf)
    y = a @ w2^T + b2                                      [N, h]
    loss = sum_{rows i with mask_i != 0} ||y_i - target_i||^2 / max(count(mask != 0) * h, 1)

``recon_loss_reference`` writes that in plain PyTorch: the CPU path, what runs with the kernels off,
and the test oracle. ``recon_loss`` runs the Triton path where ``current_backend`` says so.

The Triton path computes the loss and, in the same pass over the tokens, every gradient, one chunk of
tokens at a time, so neither x [N, h] nor z, a [N, d] ever exists for the whole batch: the working
set is two [chunk, h] and two [chunk, d] buffers, reused from chunk to chunk, plus fp32 accumulators
for the parameter gradients. What autograd keeps is the finished gradients; its backward only scales
them by the incoming (scalar) gradient. The chain rule, with r = y - target and m the 0/1 mask:

    dy  = 2 m r                                  (the 1/denominator is applied once at the end)
    dw2 = dy^T a,  db2 = sum_rows dy,  da = dy @ w2
    dz  = da * gelu'(z),  gelu'(z) = Phi(z) + z phi(z)
    dw1 = dz^T x,  db1 = sum_rows dz,  dx = dz @ w1
    dh  = rstd (g - mean(g) - x_hat mean(g x_hat)),  g = dx * ln_weight
    dln_weight = sum_rows dx x_hat,  dln_bias = sum_rows dx

Per chunk, the five GEMM-free steps are Triton kernels: LayerNorm forward; GELU; the residual (loss,
dy, db2); GELU backward (dz, db1); LayerNorm backward (dh, dln_weight, dln_bias). The column sums
(biases, LayerNorm parameters) go into per-program fp32 rows that persist across chunks, so they cost
no extra launches and add up deterministically. The six GEMMs per chunk (12 N h d FLOPs in all,
against a few dozen per element for the rest) run in cuBLAS, ``torch.addmm``/``torch.mm`` into the
reused buffers: a ``tl.dot`` GEMM with the elementwise steps fused into it would save those
memory-bound passes over the chunk, but only once it matches cuBLAS, which takes tuning per GPU
architecture. The weight-gradient GEMMs hand over fp32 (``out_dtype``), so no chunk's partial sum is
rounded to 16 bits before it is accumulated.

The forward does the backward's work whenever a gradient could be asked for: evaluate under
``torch.no_grad()`` (then only the loss is computed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import current_backend, double_backward_error, import_triton, num_warps, persistent_programs
from .matmul import addmm_fp32_

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = ["recon_loss", "recon_loss_reference", "tokens_per_chunk"]

# Tokens per chunk: as many as make a [chunk, h] buffer about this many elements (32 MiB in bf16).
# Fewer, larger chunks keep the GEMMs efficient and the launches few; the working set stays
# O(chunk x h) whatever the batch.
CHUNK_ELEMENTS = 1 << 24
# The widest row one program holds in registers (as fp32): 64 KiB. Wider inputs take the reference.
MAX_FUSED_COLS = 16384
_MIN_CHUNK_TOKENS = 256
# Elements of the [rows, columns] tile that one program holds at once: whole rows, as many as fit.
_TILE_ELEMENTS = 4096


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _row_tile(tile, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64), column indices and the in-bounds mask of row tile ``tile``."""
    rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    return rows, cols, (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def _layer_norm_rows(h, mask, n_cols, eps):
    """(x_hat, rstd) of the rows of h (fp32, 0 where masked); x_hat is 0 where masked."""
    mean = tl.sum(h, axis=1) / n_cols
    centered = tl.where(mask, h - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    return centered * rstd[:, None], rstd


@triton.jit
def _add_to_partial(PARTIAL, pid, cols, n_cols, value):
    """Row pid of an fp32 [programs, n_cols] buffer += value. The row belongs to this program alone."""
    ptrs = PARTIAL + tl.cast(pid, tl.int64) * n_cols + cols
    tl.store(ptrs, tl.load(ptrs, mask=cols < n_cols, other=0.0) + value, mask=cols < n_cols)


@triton.jit
def _layer_norm_fwd_kernel(
    H, X, LN_W, LN_B, n_rows, n_cols, stride_h, stride_x, eps, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr
):  # fmt: skip
    """x = x_hat * ln_weight + ln_bias, x_hat = (h - mean) * rstd, for one tile of rows, in fp32."""
    rows, cols, mask = _row_tile(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_H)
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_hat, _ = _layer_norm_rows(h, mask, n_cols, eps)
    w = tl.load(LN_W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    b = tl.load(LN_B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    x = x_hat * w[None, :] + b[None, :]
    tl.store(X + rows[:, None] * stride_x + cols[None, :], x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_fwd_kernel(Z, A, n_elements, BLOCK: tl.constexpr):
    """a = gelu(z) = z * Phi(z), elementwise (exact: Phi(z) = (1 + erf(z / sqrt 2)) / 2)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(A + offs, a.to(A.dtype.element_ty), mask=mask)


@triton.jit
def _residual_kernel(
    Y, TARGET, MASK, LOSS_PARTIAL, DB2_PARTIAL,
    n_rows, n_cols, stride_y, stride_t,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_MASK: tl.constexpr, STORE_DY: tl.constexpr, ACC_DB2: tl.constexpr,
):  # fmt: skip
    """Squared error of the kept rows into the loss; dy = 2 m (y - target) over y, in place.

    Program p takes row tiles p, p + P, ... and adds its sums (the loss, and db2 = sum_rows dy) into
    row p of LOSS_PARTIAL / DB2_PARTIAL, which carry over from chunk to chunk. Rows with mask 0 add
    nothing and get dy = 0, whatever their values.
    """
    pid = tl.program_id(0)
    loss = tl.zeros((), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows, cols, mask = _row_tile(tile, n_rows, n_cols, BLOCK_M, BLOCK_H)
        y_ptrs = Y + rows[:, None] * stride_y + cols[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(TARGET + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = y - t
        err = tl.sum(r * r, axis=1)
        dy = 2.0 * r
        if HAS_MASK:
            keep = tl.load(MASK + rows, mask=rows < n_rows, other=0) != 0
            err = tl.where(keep, err, 0.0)
            dy = tl.where(keep[:, None], dy, 0.0)
        loss += tl.sum(err, axis=0)
        if STORE_DY:
            tl.store(y_ptrs, dy.to(Y.dtype.element_ty), mask=mask)
        if ACC_DB2:
            db2 += tl.sum(dy, axis=0)
    tl.store(LOSS_PARTIAL + pid, tl.load(LOSS_PARTIAL + pid) + loss)
    if ACC_DB2:
        _add_to_partial(DB2_PARTIAL, pid, tl.arange(0, BLOCK_H), n_cols, db2)


@triton.jit
def _gelu_bwd_kernel(
    DA, Z, DB1_PARTIAL, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DB1: tl.constexpr
):  # fmt: skip
    """dz = da * gelu'(z) over da, in place; gelu'(z) = Phi(z) + z * phi(z), phi the normal density.

    Program p takes row tiles p, p + P, ... and adds db1 = sum_rows dz into row p of DB1_PARTIAL.
    DA and Z are contiguous [n_rows, n_cols].
    """
    pid = tl.program_id(0)
    db1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows, cols, mask = _row_tile(tile, n_rows, n_cols, BLOCK_M, BLOCK_D)
        offs = rows[:, None] * n_cols + cols[None, :]
        da = tl.load(DA + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = da * (cdf + z * pdf)
        tl.store(DA + offs, dz.to(DA.dtype.element_ty), mask=mask)
        if ACC_DB1:
            db1 += tl.sum(dz, axis=0)
    if ACC_DB1:
        _add_to_partial(DB1_PARTIAL, pid, tl.arange(0, BLOCK_D), n_cols, db1)


@triton.jit
def _layer_norm_bwd_kernel(
    DX, H, LN_W, DH, SCALE, DLNW_PARTIAL, DLNB_PARTIAL,
    n_rows, n_cols, stride_dx, stride_h, stride_dh, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    STORE_DH: tl.constexpr, ACC_DLNW: tl.constexpr, ACC_DLNB: tl.constexpr,
):  # fmt: skip
    """LayerNorm backward from dx (the gradient at its output), recomputing x_hat and rstd from h.

        g = dx * ln_weight
        dh = SCALE * rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (means over the row)
        dln_weight = sum_rows dx * x_hat,  dln_bias = sum_rows dx

    Program p takes row tiles p, p + P, ... and adds its column sums into row p of the partials.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(LN_W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    scale = tl.load(SCALE)
    dlnw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    dlnb = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0)):
        rows, cols, mask = _row_tile(tile, n_rows, n_cols, BLOCK_M, BLOCK_H)
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(DX + rows[:, None] * stride_dx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x_hat, rstd = _layer_norm_rows(h, mask, n_cols, eps)
        if STORE_DH:
            g = dx * w[None, :]
            mean_g = tl.sum(g, axis=1) / n_cols
            mean_gx = tl.sum(g * x_hat, axis=1) / n_cols
            dh = (g - mean_g[:, None] - x_hat * mean_gx[:, None]) * (rstd * scale)[:, None]
            tl.store(DH + rows[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        if ACC_DLNW:
            dlnw += tl.sum(dx * x_hat, axis=0)
        if ACC_DLNB:
            dlnb += tl.sum(dx, axis=0)
    if ACC_DLNW:
        _add_to_partial(DLNW_PARTIAL, pid, tl.arange(0, BLOCK_H), n_cols, dlnw)
    if ACC_DLNB:
        _add_to_partial(DLNB_PARTIAL, pid, tl.arange(0, BLOCK_H), n_cols, dlnb)


# ----------------------------------------------------------------------------------------------------
# Launcher


def tokens_per_chunk(hidden: int) -> int:
    """Tokens per chunk of the fused op for rows of ``hidden`` columns."""
    return max(_MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // hidden)


# Order of the gradient flags and of the gradients the fused op returns.
_GRAD_INPUTS = ("h_out", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2")


def _fused_forward_backward(
    h_out: torch.Tensor,
    target: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    mask: torch.Tensor | None,
    eps: float,
    needs_grad: list[bool],
    chunk_tokens: int,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(loss, dh_out, dln_weight, dln_bias, dw1, db1, dw2, db2), the gradients of the loss itself.

    A gradient whose flag in ``needs_grad`` (ordered as ``_GRAD_INPUTS``) is off comes back empty and
    costs nothing. dh_out has h_out's dtype; the parameter gradients are fp32.
    """
    need_dh, need_lnw, need_lnb, need_w1, need_b1, need_w2, need_b2 = needs_grad
    need_dx = need_dh or need_lnw or need_lnb
    need_dz = need_dx or need_w1 or need_b1
    need_dy = need_dz or need_w2 or need_b2

    n_cols = h_out.shape[-1]
    d = w1.shape[0]
    h2 = h_out.reshape(-1, n_cols)
    t2 = target.reshape(-1, n_cols)
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    n_rows = h2.shape[0]
    device, dtype = h_out.device, h_out.dtype
    f32 = dict(device=device, dtype=torch.float32)

    if mask is None:
        keep = None
        denominator = torch.full((), float(max(n_rows * n_cols, 1)), dtype=torch.float64, device=device)
    else:
        keep = (mask.reshape(-1) != 0).to(torch.uint8)
        denominator = (keep.sum() * n_cols).clamp_min(1).to(torch.float64)
    inv_denominator = (1.0 / denominator).float()

    # The GEMMs run in the activations' dtype (a no-op cast when the decoder has it too).
    w1c, b1c, w2c, b2c = (p.to(dtype) for p in (w1, b1, w2, b2))
    chunk = max(1, min(chunk_tokens, n_rows))
    x_buf = torch.empty((chunk, n_cols), device=device, dtype=dtype)
    y_buf = torch.empty((chunk, n_cols), device=device, dtype=dtype)  # y, then dy, then dx
    z_buf = torch.empty((chunk, d), device=device, dtype=dtype)
    a_buf = torch.empty((chunk, d), device=device, dtype=dtype)  # a, then da, then dz

    block_h, block_d = triton.next_power_of_2(n_cols), triton.next_power_of_2(d)
    rows_h, rows_d = max(1, _TILE_ELEMENTS // block_h), max(1, _TILE_ELEMENTS // block_d)
    # A program holds rows x block values of each tensor it touches: the warps follow that tile, not one row
    # (4 warps on a 2 x 2048 tile spilled registers under Triton 3.6).
    warps_h, warps_d = num_warps(rows_h * block_h), num_warps(rows_d * block_d)
    n_programs = persistent_programs(device, triton.cdiv(chunk, rows_h))
    loss_partial = torch.zeros((n_programs,), **f32)
    # Stands in for the buffers no one asked for: any valid pointer, never touched (flag off).
    unused = loss_partial
    dh = torch.empty((n_rows if need_dh else 0, n_cols), device=device, dtype=dtype)
    dlnw_partial = torch.zeros((n_programs, n_cols), **f32) if need_lnw else unused
    dlnb_partial = torch.zeros((n_programs, n_cols), **f32) if need_lnb else unused
    db1_partial = torch.zeros((n_programs, d), **f32) if need_b1 else unused
    db2_partial = torch.zeros((n_programs, n_cols), **f32) if need_b2 else unused
    dw1 = torch.zeros((d, n_cols), **f32) if need_w1 else None
    dw2 = torch.zeros((n_cols, d), **f32) if need_w2 else None

    for start in range(0, n_rows, chunk):
        n = min(chunk, n_rows - start)
        h_c, t_c = h2[start : start + n], t2[start : start + n]
        x, y, z, a = x_buf[:n], y_buf[:n], z_buf[:n], a_buf[:n]

        _layer_norm_fwd_kernel[(triton.cdiv(n, rows_h),)](
            h_c, x, ln_weight, ln_bias, n, n_cols, h_c.stride(0), x.stride(0), eps,
            BLOCK_M=rows_h, BLOCK_H=block_h, num_warps=warps_h,
        )  # fmt: skip
        torch.addmm(b1c, x, w1c.t(), out=z)
        _gelu_fwd_kernel[(triton.cdiv(n * d, 1024),)](z, a, n * d, BLOCK=1024)
        torch.addmm(b2c, a, w2c.t(), out=y)
        _residual_kernel[(n_programs,)](
            y, t_c, keep[start : start + n] if keep is not None else y, loss_partial, db2_partial,
            n, n_cols, y.stride(0), t_c.stride(0),
            BLOCK_M=rows_h, BLOCK_H=block_h, HAS_MASK=keep is not None, STORE_DY=need_dy, ACC_DB2=need_b2,
            num_warps=warps_h,
        )  # fmt: skip
        if not need_dy:
            continue
        dy = y
        if need_w2:
            addmm_fp32_(dw2, dy.t(), a)
        if not need_dz:
            continue
        da = torch.mm(dy, w2c, out=a)  # a is spent
        _gelu_bwd_kernel[(n_programs,)](
            da, z, db1_partial, n, d, BLOCK_M=rows_d, BLOCK_D=block_d, ACC_DB1=need_b1, num_warps=warps_d
        )  # fmt: skip
        dz = da
        if need_w1:
            addmm_fp32_(dw1, dz.t(), x)
        if not need_dx:
            continue
        dx = torch.mm(dz, w1c, out=y)  # dy is spent
        dh_c = dh[start : start + n] if need_dh else dx
        _layer_norm_bwd_kernel[(n_programs,)](
            dx, h_c, ln_weight, dh_c, inv_denominator, dlnw_partial, dlnb_partial,
            n, n_cols, dx.stride(0), h_c.stride(0), dh_c.stride(0), eps,
            BLOCK_M=rows_h, BLOCK_H=block_h, STORE_DH=need_dh, ACC_DLNW=need_lnw, ACC_DLNB=need_lnb,
            num_warps=warps_h,
        )  # fmt: skip

    loss = loss_partial.sum() * inv_denominator
    param_grads = (
        dlnw_partial.sum(0) if need_lnw else None,
        dlnb_partial.sum(0) if need_lnb else None,
        dw1,
        db1_partial.sum(0) if need_b1 else None,
        dw2,
        db2_partial.sum(0) if need_b2 else None,
    )
    return (
        loss,
        dh.view(h_out.shape) if need_dh else dh.view(0),
        *(torch.empty((0,), **f32) if g is None else g * inv_denominator for g in param_grads),
    )


# ----------------------------------------------------------------------------------------------------
# Registration


# An opaque op to torch.compile: it traces through recon_loss without a graph break, and the chunk
# loop and its in-place buffer reuse run as written.
_recon_loss_fwd_bwd = torch.library.custom_op("lopt_kernels::recon_loss_fwd_bwd", mutates_args=())(
    _fused_forward_backward
)


@_recon_loss_fwd_bwd.register_fake
def _(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask, eps, needs_grad, chunk_tokens):
    def grad(t, need, dtype):
        return t.new_empty(t.shape if need else (0,), dtype=dtype)

    params = (ln_weight, ln_bias, w1, b1, w2, b2)
    return (
        h_out.new_empty((), dtype=torch.float32),
        grad(h_out, needs_grad[0], h_out.dtype),
        *(grad(p, need, torch.float32) for p, need in zip(params, needs_grad[1:])),
    )


# ----------------------------------------------------------------------------------------------------
# Autograd


def _setup_context(ctx, inputs, output):
    ctx.needs_grad = inputs[10]
    ctx.param_dtypes = tuple(p.dtype for p in inputs[2:8])
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    """The gradients are already computed: scale them by the incoming scalar gradient.

    Out of place, so that a second backward through a retained graph sees the same gradients; that
    holds one more [N, h] tensor (the scaled dh) until autograd frees the saved one.
    Refuses create_graph=True: the gradients are finished values and the inputs are not saved, so there
    is nothing a second-order gradient could be taken through.
    """
    if torch.is_grad_enabled() and any(ctx.needs_input_grad):
        raise double_backward_error("recon_loss")
    dh, *param_grads = ctx.saved_tensors
    need_dh, *need_params = ctx.needs_grad
    grads = [
        (g * grad_loss).to(dtype) if need else None
        for g, need, dtype in zip(param_grads, need_params, ctx.param_dtypes)
    ]
    return (dh * grad_loss if need_dh else None), None, *grads, None, None, None, None


_recon_loss_fwd_bwd.register_autograd(_backward, setup_context=_setup_context)


def _recon_loss_triton(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask, eps, chunk_tokens):
    """The fused op, asked for the gradients that autograd could want and no others."""
    grad_enabled = torch.is_grad_enabled()
    inputs = dict(h_out=h_out, ln_weight=ln_weight, ln_bias=ln_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    needs_grad = [grad_enabled and inputs[name].requires_grad for name in _GRAD_INPUTS]
    return _recon_loss_fwd_bwd(
        h_out, target.detach(), ln_weight.contiguous(), ln_bias.contiguous(), w1, b1, w2, b2,
        None if mask is None else mask.detach(), float(eps), needs_grad, int(chunk_tokens),
    )[0]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Reference


def _check_inputs(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask) -> None:
    n_cols, d = h_out.shape[-1], w1.shape[0]
    expected = {
        "target": (target, h_out.shape),
        "ln_weight": (ln_weight, (n_cols,)),
        "ln_bias": (ln_bias, (n_cols,)),
        "w1": (w1, (d, n_cols)),
        "b1": (b1, (d,)),
        "w2": (w2, (n_cols, d)),
        "b2": (b2, (n_cols,)),
    }
    if mask is not None:
        expected["mask"] = (mask, h_out.shape[:-1])
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"recon_loss: {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                f"for h_out of shape {tuple(h_out.shape)} and w1 of shape {tuple(w1.shape)}"
            )


def recon_loss_reference(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask=None, eps=1e-5) -> torch.Tensor:
    """``recon_loss`` in plain PyTorch autograd. The squared error is taken in fp32 (float64 stays
    float64, so this doubles as the test oracle)."""
    _check_inputs(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask)
    n_cols = h_out.shape[-1]
    x = F.layer_norm(h_out, (n_cols,), ln_weight, ln_bias, eps)
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    sq_err = (y.to(torch.promote_types(y.dtype, torch.float32)) - target.detach()).square().sum(-1)
    if mask is None:
        return sq_err.sum() / max(sq_err.numel() * n_cols, 1)
    keep = mask != 0
    return torch.where(keep, sq_err, 0.0).sum() / (keep.sum() * n_cols).clamp_min(1)


# ----------------------------------------------------------------------------------------------------
# Public op


def recon_loss(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask=None, eps=1e-5) -> torch.Tensor:
    """Mean squared error of the auxiliary decoder's reconstruction of ``target`` from ``h_out``.

    LayerNorm(h_out) -> Linear(w1, b1) -> GELU (erf) -> Linear(w2, b2), compared with ``target`` and
    averaged over the hidden units and the positions where ``mask`` ([...], any dtype) is nonzero;
    all positions when it is None, 0 when none is. h_out, target: [..., h]; weights in nn.Linear
    layout (w1 [d, h], w2 [h, d]). ``target`` gets no gradient. Returns an fp32 scalar.

    On the Triton backend the forward also computes the gradients, chunk by chunk (module docstring);
    float64, empty and wider than ``MAX_FUSED_COLS`` inputs take the reference.
    """
    n_cols = h_out.shape[-1]
    fused = h_out.dtype != torch.float64 and h_out.numel() > 0 and n_cols <= MAX_FUSED_COLS
    if not fused or current_backend(h_out.device) != "triton":
        return recon_loss_reference(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask, eps)
    _check_inputs(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask)
    return _recon_loss_triton(h_out, target, ln_weight, ln_bias, w1, b1, w2, b2, mask, eps, tokens_per_chunk(n_cols))
