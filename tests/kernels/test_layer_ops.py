"""RMSNorm, SwiGLU and RoPE kernels against a float64 reference: outputs and every gradient.

The inputs live on ``KERNEL_DEVICE`` (conftest.py): CUDA where there is a GPU, so the compiled kernels
run; else the CPU, where the kernels run in the Triton interpreter. Hence the shapes are small and odd:
37 rows, widths that are not powers of two, head_dim 24, 6 query heads over 2 key heads.
bf16 criterion: the kernel's error against float64 is no worse than the bf16 reference's (what Hugging
Face computes) plus one bf16 ulp of the largest value (the interpreter truncates fp32 -> bf16 casts
where the GPU rounds to nearest; on the GPU that ulp is spare).
"""

import pytest
import torch
from conftest import KERNEL_DEVICE
from kernel_checks import assert_no_worse_than_native, double_backward, max_abs_err, seeded_randn

from lopt_kernels import current_backend
from lopt_kernels.rms_norm import rms_norm, rms_norm_reference
from lopt_kernels.rope import apply_rope, apply_rope_reference
from lopt_kernels.swiglu import swiglu, swiglu_reference

DTYPES = [torch.float32, torch.bfloat16]
ROWS = 37
WIDTHS = [96, 136, 896]
HEAD_DIM, Q_HEADS, K_HEADS = 24, 6, 2


def _run(fn, inputs, grad_outputs, dtype=None):
    """Outputs of fn(*inputs) and the gradients of the inputs that require grad, after backward of grad_outputs.

    Works on fresh leaf copies, cast to ``dtype`` if given.
    """
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outputs) if o.requires_grad]
    torch.autograd.backward(*zip(*pairs))
    return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad]


def _assert_matches_float64(op, reference, inputs, grad_outputs):
    """op's outputs and input gradients vs the float64 reference (and, in bf16, vs the bf16 reference's error)."""
    got = _run(op, inputs, grad_outputs)
    want = _run(reference, inputs, grad_outputs, torch.float64)
    dtype = inputs[0].dtype
    native = _run(reference, inputs, grad_outputs) if dtype == torch.bfloat16 else None
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"result {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"result {i}: {m}")
        else:
            slack = 2**-7 * w.abs().max().item()
            assert_no_worse_than_native(g, native[i], w, slack=slack, error=max_abs_err, name=f"result {i}")


def _rope_tables(batch, seq_len, head_dim, dtype, hf_layout=True, seed=5, device=KERNEL_DEVICE):
    """cos/sin [batch, T, D]: LlamaRotaryEmbedding's (both halves equal) or unrelated halves (general rotate_half).

    Computed on the CPU, then moved to ``device``.
    """
    half = head_dim // 2 if hf_layout else head_dim
    angles = seeded_randn(batch, seq_len, half, dtype=torch.float64, seed=seed, device="cpu") * 3
    if hf_layout:
        angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), (angles.sin() * (1 if hf_layout else 0.7)).to(dtype)
    return cos.to(device), sin.to(device)


def test_the_kernels_are_what_runs():
    """On KERNEL_DEVICE the ops take the Triton path (compiled on CUDA, the interpreter on the CPU), so these
    tests test the kernels."""
    if current_backend(KERNEL_DEVICE) != "triton":
        pytest.skip("triton is not installed")
    x, w = seeded_randn(3, 96, requires_grad=True), seeded_randn(96, requires_grad=True)
    assert "RMSNormFunction" in rms_norm(x, w).grad_fn.name()
    assert "SwiGLUFunction" in swiglu(x, x).grad_fn.name()
    q, k = seeded_randn(1, 2, 3, 8, requires_grad=True), seeded_randn(1, 1, 3, 8, requires_grad=True)
    cos, sin = _rope_tables(1, 3, 8, torch.float32)
    assert "RoPEFunction" in apply_rope(q, k, cos, sin)[0].grad_fn.name()


# RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm_matches_float64(dtype, width):
    x = seeded_randn(ROWS, width, dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * seeded_randn(width, seed=1)).to(dtype).requires_grad_()
    dy = seeded_randn(ROWS, width, seed=2)
    _assert_matches_float64(rms_norm, rms_norm_reference, [x, weight], [dy])


def test_rms_norm_per_head_on_a_strided_input():
    """Qwen3's q_norm/k_norm: RMSNorm over head_dim of [B, T, H, D]; here through a transposed (non-contiguous) view."""
    x = seeded_randn(2, Q_HEADS, 5, HEAD_DIM, requires_grad=True)
    weight = (1 + 0.1 * seeded_randn(HEAD_DIM, seed=1)).requires_grad_()
    dy = seeded_randn(2, 5, Q_HEADS, HEAD_DIM, seed=2)
    _assert_matches_float64(
        lambda x, w: rms_norm(x.transpose(1, 2), w),
        lambda x, w: rms_norm_reference(x.transpose(1, 2), w),
        [x, weight],
        [dy],
    )


def test_rms_norm_bf16_input_with_fp32_weight_promotes_like_hf():
    x = seeded_randn(ROWS, 136, dtype=torch.bfloat16, requires_grad=True)
    weight = (1 + 0.1 * seeded_randn(136, seed=1)).requires_grad_()
    y = rms_norm(x, weight)
    assert y.dtype == rms_norm_reference(x, weight).dtype == torch.float32
    _assert_matches_float64(rms_norm, rms_norm_reference, [x, weight], [seeded_randn(ROWS, 136, seed=2)])


def test_rms_norm_frozen_weight_and_no_grad():
    x = seeded_randn(ROWS, 136, requires_grad=True)
    weight = 1 + 0.1 * seeded_randn(136, seed=1)  # requires_grad=False
    _assert_matches_float64(rms_norm, rms_norm_reference, [x, weight], [seeded_randn(ROWS, 136, seed=2)])
    x.grad = None
    y = rms_norm(x, weight)
    y.sum().backward()
    assert x.grad is not None and weight.grad is None
    with torch.no_grad():
        y = rms_norm(x, weight)
    assert y.grad_fn is None
    torch.testing.assert_close(y, rms_norm_reference(x, weight).detach())


def test_rms_norm_leaves_its_inputs_alone():
    x = seeded_randn(ROWS, 136, requires_grad=True)
    weight = (1 + 0.1 * seeded_randn(136, seed=1)).requires_grad_()
    dy = seeded_randn(ROWS, 136, seed=2)
    before = [t.detach().clone() for t in (x, weight, dy)]
    rms_norm(x, weight).backward(dy)
    for t, b in zip((x, weight, dy), before):
        assert torch.equal(t.detach(), b)


def test_rms_norm_rejects_a_mismatched_weight():
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(torch.randn(3, 8), torch.ones(7))


# SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_swiglu_matches_float64(dtype, width):
    gate = seeded_randn(ROWS, width, dtype=dtype, requires_grad=True)
    up = seeded_randn(ROWS, width, dtype=dtype, seed=1, requires_grad=True)
    _assert_matches_float64(swiglu, swiglu_reference, [gate, up], [seeded_randn(ROWS, width, seed=2)])


def test_swiglu_on_chunks_of_a_fused_projection():
    """gate and up as halves of one [.., 2I] projection: row-strided views, read in place."""
    gate_up = seeded_randn(3, ROWS, 2 * 136, requires_grad=True)
    dy = seeded_randn(3, ROWS, 136, seed=2)
    _assert_matches_float64(
        lambda t: swiglu(*t.chunk(2, dim=-1)), lambda t: swiglu_reference(*t.chunk(2, dim=-1)), [gate_up], [dy]
    )


def test_swiglu_one_frozen_input_and_no_grad():
    gate = seeded_randn(ROWS, 136, requires_grad=True)
    up = seeded_randn(ROWS, 136, seed=1)
    _assert_matches_float64(swiglu, swiglu_reference, [gate, up], [seeded_randn(ROWS, 136, seed=2)])
    with torch.no_grad():
        out = swiglu(gate, up)
    assert out.grad_fn is None
    torch.testing.assert_close(out, swiglu_reference(gate, up).detach())


def test_swiglu_leaves_its_inputs_alone():
    gate = seeded_randn(ROWS, 136, requires_grad=True)
    up = seeded_randn(ROWS, 136, seed=1, requires_grad=True)
    dy = seeded_randn(ROWS, 136, seed=2)
    before = [t.detach().clone() for t in (gate, up, dy)]
    swiglu(gate, up).backward(dy)
    for t, b in zip((gate, up, dy), before):
        assert torch.equal(t.detach(), b)


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))


# RoPE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rope_matches_float64(dtype, cos_batch):
    """GQA shapes, head_dim 24; cos/sin shared by the batch (batch 1) or per sequence, as LlamaRotaryEmbedding gives."""
    batch, seq_len = 2, 13
    q = seeded_randn(batch, Q_HEADS, seq_len, HEAD_DIM, dtype=dtype, requires_grad=True)
    k = seeded_randn(batch, K_HEADS, seq_len, HEAD_DIM, dtype=dtype, seed=1, requires_grad=True)
    cos, sin = _rope_tables(cos_batch, seq_len, HEAD_DIM, dtype)
    dq, dk = seeded_randn(*q.shape, seed=2), seeded_randn(*k.shape, seed=3)
    _assert_matches_float64(apply_rope, apply_rope_reference, [q, k, cos, sin], [dq, dk])


def test_rope_with_unequal_halves_of_cos_sin():
    """The general rotate_half formula (the backward is the transposed map, not merely the rotation by -sin)."""
    q = seeded_randn(1, Q_HEADS, ROWS, HEAD_DIM, requires_grad=True)
    k = seeded_randn(1, K_HEADS, ROWS, HEAD_DIM, seed=1, requires_grad=True)
    cos, sin = _rope_tables(1, ROWS, HEAD_DIM, torch.float32, hf_layout=False)
    dq, dk = seeded_randn(*q.shape, seed=2), seeded_randn(*k.shape, seed=3)
    _assert_matches_float64(apply_rope, apply_rope_reference, [q, k, cos, sin], [dq, dk])


def test_rope_on_projection_views_and_unsqueeze_dim_2():
    """As attention calls it: [B, T, H, D] projections viewed as [B, H, T, D]; and unsqueeze_dim=2 on [B, T, H, D]."""
    q = seeded_randn(2, 7, Q_HEADS, HEAD_DIM, requires_grad=True)
    k = seeded_randn(2, 7, K_HEADS, HEAD_DIM, seed=1, requires_grad=True)
    cos, sin = _rope_tables(1, 7, HEAD_DIM, torch.float32)
    dq, dk = seeded_randn(2, Q_HEADS, 7, HEAD_DIM, seed=2), seeded_randn(2, K_HEADS, 7, HEAD_DIM, seed=3)

    def transposed(op):
        return lambda q, k, cos, sin: op(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    _assert_matches_float64(transposed(apply_rope), transposed(apply_rope_reference), [q, k, cos, sin], [dq, dk])
    q_out, k_out = apply_rope(q, k, cos, sin, unsqueeze_dim=2)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-5, atol=1e-5)


def test_rope_no_grad_and_frozen_key():
    q = seeded_randn(1, Q_HEADS, 5, HEAD_DIM, requires_grad=True)
    k = seeded_randn(1, K_HEADS, 5, HEAD_DIM, seed=1)
    cos, sin = _rope_tables(1, 5, HEAD_DIM, torch.float32)
    grads = [seeded_randn(*q.shape), seeded_randn(*k.shape)]
    _assert_matches_float64(apply_rope, apply_rope_reference, [q, k, cos, sin], grads)
    with torch.no_grad():
        q_out, k_out = apply_rope(q, k, cos, sin)
    assert q_out.grad_fn is None and k_out.grad_fn is None


def test_rope_gives_cos_sin_gradients_when_they_require_grad():
    """The kernel has none for cos/sin, so such calls take the reference rather than drop them."""
    q = seeded_randn(1, Q_HEADS, 5, HEAD_DIM, requires_grad=True)
    k = seeded_randn(1, K_HEADS, 5, HEAD_DIM, seed=1, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in _rope_tables(1, 5, HEAD_DIM, torch.float32))
    dq, dk = seeded_randn(*q.shape, seed=2), seeded_randn(*k.shape, seed=3)
    _assert_matches_float64(apply_rope, apply_rope_reference, [q, k, cos, sin], [dq, dk])


def test_rope_leaves_its_inputs_alone():
    q = seeded_randn(1, Q_HEADS, 5, HEAD_DIM, requires_grad=True)
    k = seeded_randn(1, K_HEADS, 5, HEAD_DIM, seed=1, requires_grad=True)
    cos, sin = _rope_tables(1, 5, HEAD_DIM, torch.float32)
    dq, dk = seeded_randn(*q.shape, seed=2), seeded_randn(*k.shape, seed=3)
    inputs = (q, k, cos, sin, dq, dk)
    before = [t.detach().clone() for t in inputs]
    torch.autograd.backward(apply_rope(q, k, cos, sin), [dq, dk])
    for t, b in zip(inputs, before):
        assert torch.equal(t.detach(), b)


# Double backward: each op computes the second-order gradient exactly or refuses it with an error naming
# it; a silent wrong answer fails. The references (the CPU path) differentiate twice as any PyTorch code.


def _double_backward_cases():
    x, w = seeded_randn(ROWS, 136, requires_grad=True), (1 + 0.1 * seeded_randn(136, seed=1)).requires_grad_()
    gate, up = seeded_randn(ROWS, 136, seed=2, requires_grad=True), seeded_randn(ROWS, 136, seed=3, requires_grad=True)
    q = seeded_randn(2, Q_HEADS, 5, HEAD_DIM, seed=4, requires_grad=True)
    k = seeded_randn(2, K_HEADS, 5, HEAD_DIM, seed=5, requires_grad=True)
    cos, sin = _rope_tables(1, 5, HEAD_DIM, torch.float32, hf_layout=False)
    return {
        "rms_norm": (rms_norm, rms_norm_reference, [x, w]),
        "swiglu": (swiglu, swiglu_reference, [gate, up]),
        "apply_rope": (apply_rope, apply_rope_reference, [q, k, cos, sin]),
    }


@pytest.mark.parametrize("op,expected", [("rms_norm", "raised"), ("swiglu", "raised"), ("apply_rope", "matched")])
def test_double_backward_is_exact_or_refused(op, expected):
    """RMSNorm's and SwiGLU's backward kernels are not differentiable: they refuse. RoPE is linear in q and k,
    so its backward is the same kernel transposed, and that differentiates exactly."""
    if current_backend(KERNEL_DEVICE) != "triton":
        pytest.skip("the kernels do not run here (LOPT_KERNELS_BACKEND=torch or no triton)")
    fn, reference, inputs = _double_backward_cases()[op]
    assert double_backward(op, fn, reference, inputs) == expected


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "apply_rope"])
def test_reference_backend_double_backward(op, monkeypatch):
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")
    fn, reference, inputs = _double_backward_cases()[op]
    assert double_backward(op, fn, reference, inputs) == "matched"


def test_first_order_under_create_graph_is_unchanged():
    """create_graph=True alone (no second-order gradient taken) still gives the kernels' first-order gradients."""
    x, w = seeded_randn(ROWS, 136, requires_grad=True), (1 + 0.1 * seeded_randn(136, seed=1)).requires_grad_()
    dy = seeded_randn(ROWS, 136, seed=2)
    plain = torch.autograd.grad(rms_norm(x, w), (x, w), dy)
    graphed = torch.autograd.grad(rms_norm(x, w), (x, w), dy, create_graph=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())


# torch.compile: the kernels go through torch.library.triton_op, which the interpreter cannot trace.


@pytest.mark.gpu
def test_ops_compile_fullgraph():
    device = "cuda"
    x = seeded_randn(ROWS, 136).to(device).requires_grad_()
    w = (1 + 0.1 * seeded_randn(136, seed=1)).to(device).requires_grad_()
    q = seeded_randn(2, Q_HEADS, 13, HEAD_DIM).to(device).requires_grad_()
    k = seeded_randn(2, K_HEADS, 13, HEAD_DIM, seed=1).to(device).requires_grad_()
    cos, sin = (t.to(device) for t in _rope_tables(1, 13, HEAD_DIM, torch.float32))

    def loss(x, w, q, k):
        h = rms_norm(x, w)
        q_out, k_out = apply_rope(q, k, cos, sin)
        return swiglu(h, h * 0.5).square().sum() + q_out.square().sum() + (k_out * 1.5).sum()

    leaves = (x, w, q, k)
    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
