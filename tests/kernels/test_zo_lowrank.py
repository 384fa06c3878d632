"""The grouped low-rank term of ZO perturbed linears (lopt_kernels.zo_lowrank): kernel and reference.

Both against a float64 computation from the same (rounded) inputs, on odd shapes (G=3, M=5, K=37, N=29;
r = 1 and 3; shared and distinct factors; negative scales; with and without ``out``): fp32 tightly,
bf16 and fp16 by the 16-bit criterion of kernel_checks. Then several row and column tiles with ragged
edges, column spans split over programs, strided views, a zero scale (``out`` untouched bit for bit),
the fallbacks and the argument errors. The kernel runs on CUDA, or interpreted on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE
from kernel_checks import assert_no_worse_than_native, rel_err, seeded_randn

import lopt_kernels.zo_lowrank as zl
from lopt_kernels.backend import current_backend
from lopt_kernels.zo_lowrank import grouped_lowrank, grouped_lowrank_reference

needs_triton = pytest.mark.skipif(
    current_backend(KERNEL_DEVICE) != "triton",
    reason="the kernel runs on CUDA, or on the CPU through the interpreter (TRITON_INTERPRET=1)",
)

G, M, K, N = 3, 5, 37, 29
SCALES = (0.7, -1.3, -0.25)
FUNCTIONS = {"kernel": grouped_lowrank, "reference": grouped_lowrank_reference}


def make_inputs(g=G, m=M, k=K, n=N, r=3, dtype=torch.float32, factor_dtype=None, shared_v=True, scales=SCALES,
                seed=0, device=KERNEL_DEVICE):  # fmt: skip
    """x, V, U, v_index, u_index, scale, out. Shared: every group reads V[0] (LoZO's V for a run of steps)."""
    factor_dtype = factor_dtype or dtype
    x = seeded_randn(g, m, k, seed=seed, dtype=dtype, device=device)
    V = seeded_randn(2, k, r, seed=seed + 1, dtype=factor_dtype, device=device)
    U = seeded_randn(g, n, r, seed=seed + 2, dtype=factor_dtype, device=device)
    v_index = torch.zeros(g, dtype=torch.int64) if shared_v else torch.arange(g) % 2
    u_index = torch.arange(g).flip(0)
    scale = torch.tensor(scales, dtype=torch.float32)
    out = seeded_randn(g, m, n, seed=seed + 3, dtype=dtype, device=device) * 4
    return x, V, U, v_index.to(device), u_index.to(device), scale.to(device), out


def oracle(x, V, U, v_index, u_index, scale, out=None):
    """The term (plus out) in float64, written out independently of the module."""
    h = torch.einsum("gmk,gkr->gmr", x.double(), V.double()[v_index])
    term = scale.double()[:, None, None] * torch.einsum("gmr,gnr->gmn", h, U.double()[u_index])
    return term if out is None else out.double() + term


def native(x, V, U, v_index, u_index, scale, out=None):
    """Plain PyTorch in x's dtype (each product rounded): what the 16-bit criterion measures against."""
    term = scale.to(x.dtype)[:, None, None] * ((x @ V.to(x.dtype)[v_index]) @ U.to(x.dtype)[u_index].transpose(1, 2))
    return term if out is None else out + term


def run(fn, inputs, with_out):
    """fn on the inputs (a copy of out, or none); checks what comes back."""
    x, *rest, out = inputs
    given = out.clone() if with_out else None
    got = fn(x, *rest, given)
    if with_out:
        assert got is given
    assert got.shape == (x.shape[0], x.shape[1], rest[1].shape[1])
    assert got.dtype == (out.dtype if with_out else x.dtype)
    return got


@needs_triton
@pytest.mark.parametrize("with_out", [True, False], ids=["out", "no-out"])
@pytest.mark.parametrize("shared_v", [True, False], ids=["shared-V", "distinct-V"])
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("fn", FUNCTIONS, ids=str)
def test_fp32_matches_float64(fn, r, shared_v, with_out):
    inputs = make_inputs(r=r, shared_v=shared_v)
    got = run(FUNCTIONS[fn], inputs, with_out)
    want = oracle(*inputs[:-1], inputs[-1] if with_out else None)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got[1], want[1]) < 1e-5  # a negative scale


@needs_triton
@pytest.mark.parametrize("factors", ["same", "fp32"], ids=["factors-16bit", "factors-fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fn", FUNCTIONS, ids=str)
def test_16bit_no_worse_than_native(fn, dtype, factors):
    """Sums in fp32, one rounding: no worse than plain PyTorch in the same dtype (which rounds each step)."""
    inputs = make_inputs(r=3, dtype=dtype, factor_dtype=torch.float32 if factors == "fp32" else dtype, shared_v=False)
    unit = torch.finfo(dtype).eps
    for with_out in (True, False):
        got = run(FUNCTIONS[fn], inputs, with_out)
        out = inputs[-1] if with_out else None
        want = oracle(*inputs[:-1], out)
        assert_no_worse_than_native(got, native(*inputs[:-1], out), want, slack=0.25 * unit, name=f"{fn} {with_out}")
        # One rounding of the fp32 result: within half a unit in the last place, a little more where the
        # fp32 sums of the two paths differ in their last bits.
        assert (got.double() - want).abs().le(want.abs() * unit * 0.51 + 1e-6).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_several_tiles_and_column_splits(dtype, monkeypatch):
    """M = 70: a full and a ragged tile of 64 rows. N = 100 in column spans of 64 over 2 programs (two
    tiles of 32 each in fp32, one of 64 in bf16), the last span ragged; r = 20 pads to 32."""
    monkeypatch.setattr(zl, "_INTERPRETER_PROGRAMS", 8)
    inputs = make_inputs(g=2, m=70, k=37, n=100, r=20, dtype=dtype, scales=(0.5, -2.0))
    assert zl._plan(2, 70, 100, 32, torch.device("cpu"))[1:] == (2, 64)
    got = run(grouped_lowrank, inputs, with_out=True)
    want = oracle(*inputs)
    if dtype == torch.float32:
        assert rel_err(got, want) < 1e-5
    else:
        assert_no_worse_than_native(got, native(*inputs), want, slack=0.25 * torch.finfo(dtype).eps)


@needs_triton
def test_strided_views():
    """x a slice of wider rows, V and U columns of wider factors, out a slice of a wider buffer."""
    x, V, U, v_index, u_index, scale, out = make_inputs(r=3)
    x_wide = torch.zeros(G, M, K + 5, device=KERNEL_DEVICE)
    x_wide[..., :K] = x
    V_wide = torch.zeros(2, K, 7, device=KERNEL_DEVICE)
    V_wide[..., 2:5] = V
    U_t = U.transpose(1, 2).contiguous().transpose(1, 2)  # stride 1 along n: the launcher copies it
    buffer = torch.zeros(G, M, N + 3, device=KERNEL_DEVICE)
    buffer[..., :N] = out
    got = grouped_lowrank(x_wide[..., :K], V_wide[..., 2:5], U_t, v_index, u_index, scale, buffer[..., :N])
    assert rel_err(got, oracle(x, V, U, v_index, u_index, scale, out)) < 1e-5
    assert (buffer[..., N:] == 0).all()


@pytest.mark.parametrize("fn", FUNCTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_scale_leaves_out_bit_for_bit(fn, dtype):
    """Groups 0 and 2 have scale 0: their out is untouched, signed zeros and all, even where x is inf."""
    if fn == "kernel" and current_backend(KERNEL_DEVICE) != "triton":
        pytest.skip("the kernel needs Triton")
    x, V, U, v_index, u_index, _, out = make_inputs(r=3, dtype=dtype)
    x[0, 1, 2] = float("inf")
    out[0, 0, :5] = -0.0
    out[2, 1, :5] = -0.0
    before = out.clone()
    scale = torch.tensor([0.0, -0.5, -0.0], device=KERNEL_DEVICE)
    got = FUNCTIONS[fn](x, V, U, v_index, u_index, scale, out)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got[0].view(bits), before[0].view(bits))
    assert torch.equal(got[2].view(bits), before[2].view(bits))
    assert not torch.equal(got[1], before[1])
    term = FUNCTIONS[fn](x.nan_to_num(posinf=1.0), V, U, v_index, u_index, scale)
    assert (term[0] == 0).all() and (term[2] == 0).all()


def test_fallbacks_take_the_reference(monkeypatch):
    """r > MAX_RANK, float64 and an out without unit stride along N run the reference (on any device)."""

    def no_kernel(*args):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(zl, "_grouped_lowrank_op", no_kernel)
    inputs = make_inputs(m=3, k=9, n=6, r=zl.MAX_RANK + 1)
    assert rel_err(run(grouped_lowrank, inputs, with_out=True), oracle(*inputs)) < 1e-5
    x, V, U, v_index, u_index, scale, out = make_inputs(m=3, k=9, n=6, r=2)
    got = grouped_lowrank(x.double(), V.double(), U.double(), v_index, u_index, scale)
    assert got.dtype == torch.float64
    assert rel_err(got, oracle(x, V, U, v_index, u_index, scale)) < 1e-12
    out_t = out.transpose(1, 2).contiguous().transpose(1, 2)
    grouped_lowrank(x, V, U, v_index, u_index, scale, out_t)
    assert rel_err(out_t, oracle(x, V, U, v_index, u_index, scale, out)) < 1e-5


@needs_triton
def test_empty_and_rank_zero():
    x, V, U, v_index, u_index, scale, out = make_inputs(m=0)
    assert grouped_lowrank(x, V, U, v_index, u_index, scale).shape == (G, 0, N)
    x, V, U, v_index, u_index, scale, out = make_inputs(r=0)
    before = out.clone()
    assert torch.equal(grouped_lowrank(x, V, U, v_index, u_index, scale, out), before)
    assert (grouped_lowrank(x, V, U, v_index, u_index, scale) == 0).all()


@needs_triton
@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="a device-side assert would end the CUDA context")
def test_index_out_of_range_is_caught():
    x, V, U, v_index, u_index, scale, out = make_inputs()
    with pytest.raises(RuntimeError, match="out of range"):
        grouped_lowrank(x, V, U, torch.tensor([0, 2, 0]), u_index, scale, out)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(x=a["x"][0]), "3-D"),
        (lambda a: a.update(x=a["x"].to(torch.int32)), "floating dtype"),
        (lambda a: a.update(V=a["V"].half()), "V has dtype"),
        (lambda a: a.update(U=a["U"].double()), "U has dtype"),
        (lambda a: a.update(V=a["V"][:, :-1]), "do not fit"),
        (lambda a: a.update(U=a["U"][..., :-1]), "do not fit"),
        (lambda a: a.update(v_index=a["v_index"][:2]), "v_index"),
        (lambda a: a.update(u_index=a["u_index"].float()), "u_index"),
        (lambda a: a.update(scale=a["scale"].double()), "scale"),
        (lambda a: a.update(out=a["out"][..., :-1]), "out is"),
    ],
)
def test_bad_arguments(change, message):
    names = ("x", "V", "U", "v_index", "u_index", "scale", "out")
    args = dict(zip(names, make_inputs(device="cpu")))
    change(args)
    for fn in FUNCTIONS.values():
        with pytest.raises(ValueError, match=message):
            fn(*args.values())


@pytest.mark.gpu
@pytest.mark.parametrize("r", [8, 128])
def test_llama_shapes_on_gpu(r):
    """Llama-3.2-1B's widths in bf16 (gate/up: K = 2048, N = 8192), 2 directions x +-eps, LoZO's shared V."""
    inputs = make_inputs(g=4, m=256, k=2048, n=8192, r=r, dtype=torch.bfloat16, scales=(1e-3, -1e-3, 1e-3, -1e-3))
    got = run(grouped_lowrank, inputs, with_out=True)
    want = oracle(*inputs)
    assert_no_worse_than_native(got, native(*inputs), want, slack=0.25 * torch.finfo(torch.bfloat16).eps)
