"""The fused AdamW step (lopt_kernels.adamw) and its PyTorch reference, against float64 and torch.optim.AdamW.

On the CPU the kernel runs in the Triton interpreter (conftest.py). Each step is checked against the
float64 formula applied to the state the implementation had before it, so rounding never compounds.
Bounds: a few fp32 units of the terms for fp32 values; one unit of the storage dtype for each rounding
to bf16 or fp16 (the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: both are
within one unit). Shapes: 1000 values and 37 x 29 (not multiples of the block), its transpose (not
contiguous: the reference runs), 97 x 101 (two programs of the interpreter's block, the second short).
"""

import math

import pytest
import torch

import lopt_kernels.adamw
from lopt_kernels import adamw_step, adamw_step_reference, current_backend

EPS32 = torch.finfo(torch.float32).eps
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)
IMPLS = {"adamw_step": adamw_step, "reference": adamw_step_reference}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# name: (parameter dtype, moments' dtype, fp32 master)
CASES = {
    "fp32": (torch.float32, torch.float32, False),
    "bf16-master": (torch.bfloat16, torch.float32, True),
    "fp16-master": (torch.float16, torch.float32, True),
    "bf16-state": (torch.bfloat16, torch.bfloat16, False),  # stochastic rounding
    "fp32-bf16-state": (torch.float32, torch.bfloat16, False),
}
SHAPES = {"1000": (1000,), "37x29": (37, 29), "37x29-transposed": (29, 37), "97x101": (97, 101)}


def _randn(shape, seed, device, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(scale).to(device)


def _state(case, shape, device, seed=0):
    """(param, exp_avg, exp_avg_sq, master): random parameter and moments, as an optimizer mid-run has."""
    param_dtype, state_dtype, has_master = CASES[case]
    p = _randn(shape, seed, device)
    m = _randn(shape, seed + 1, device, 0.1).to(state_dtype)
    v = _randn(shape, seed + 2, device, 0.1).square_().to(state_dtype)
    master = p.clone() if has_master else None
    return p.to(param_dtype), m, v, master


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at |x| (float64), subnormals included."""
    info = torch.finfo(dtype)
    return torch.ldexp(torch.full_like(x, info.eps), torch.frexp(x)[1] - 1).clamp_min(info.eps * info.tiny)


def _check_step(before, after, g, *, state_dtype, step, weight_decay):
    """``after`` (param, m, v, master) against float64 from ``before`` and the stored moments."""
    p0, m0, v0, master0 = (None if t is None else t.double() for t in before)
    p, m, v, master = after
    lr, beta1, beta2, eps = HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"]
    g = g.double()
    m64 = m0 + (1 - beta1) * (g - m0)
    v64 = v0 * beta2 + (1 - beta2) * g * g
    # One unit of the moments' dtype (relative) per rounding: of the gradient to it, of m; of the
    # gradient, of v * beta2, of the sum.
    unit = 0.0 if state_dtype == torch.float32 else torch.finfo(state_dtype).eps
    m_tol = unit * (m64.abs() + (1 - beta1) * g.abs()) + 4 * EPS32 * (m0.abs() + g.abs())
    v_tol = unit * (2.01 * v64 + 2.01 * (1 - beta2) * g * g) + 4 * EPS32 * v64
    assert ((m.double() - m64).abs() <= m_tol).all()
    assert ((v.double() - v64).abs() <= v_tol).all()

    # The update uses the stored moments.
    w0 = master0 if master0 is not None else p0
    update = lr / (1 - beta1**step) * m.double() / (v.double().sqrt() / math.sqrt(1 - beta2**step) + eps)
    w64 = w0 * (1 - lr * weight_decay) - update
    tol = 4 * EPS32 * w0.abs() + 8 * EPS32 * update.abs()
    if master is not None:
        assert ((master.double() - w64).abs() <= tol).all()
        # rounded to a neighbour of the master copy (to nearest on the GPU and in PyTorch)
        assert ((p.double() - master.double()).abs() < _ulp(master.double(), p.dtype)).all()
    elif p.dtype == torch.float32:
        assert ((p.double() - w64).abs() <= tol).all()
    else:  # stochastic rounding: a neighbour of the fp32 result
        assert ((p.double() - w64).abs() < _ulp(w64, p.dtype) + tol).all()


def test_cpu_runs_the_kernel():
    if not torch.cuda.is_available():
        assert current_backend("cpu") == "triton", "the CPU tests must exercise the Triton kernel (interpreter)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_each_step_matches_float64(impl, case, shape, weight_decay, device):
    state_dtype = CASES[case][1]
    p, m, v, master = _state(case, SHAPES[shape], device)
    if shape.endswith("transposed"):
        p, m, v, master = (None if t is None else t.t() for t in (p, m, v, master))
    torch.manual_seed(0)
    for step in range(1, 5):
        g = _randn(p.shape, 10 + step, device).to(p.dtype)
        if not p.is_contiguous():
            g = g.t().contiguous().t()  # laid out as the parameter is
        before = [None if t is None else t.clone() for t in (p, m, v, master)]
        IMPLS[impl](p, g, m, v, master, **HYPER, weight_decay=weight_decay, step=step)
        _check_step(before, (p, m, v, master), g, state_dtype=state_dtype, step=step, weight_decay=weight_decay)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=lambda b: f"beta1={b}")  # torch.lerp's two forms
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", ["1000", "37x29"])
@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_fp32_matches_torch_adamw(impl, shape, weight_decay, beta1, device):
    """From zero moments, six steps: fp32 parameters follow torch.optim.AdamW to roundoff."""
    hyper = dict(HYPER, beta1=beta1)
    ours = _randn(SHAPES[shape], 0, device)
    theirs = torch.nn.Parameter(ours.clone())
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    opt = torch.optim.AdamW([theirs], lr=hyper["lr"], betas=(beta1, hyper["beta2"]), eps=hyper["eps"],
                            weight_decay=weight_decay, foreach=False)
    for step in range(1, 7):
        g = _randn(ours.shape, 10 + step, device)
        theirs.grad = g.clone()
        opt.step()
        IMPLS[impl](ours, g, m, v, None, **hyper, weight_decay=weight_decay, step=step)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_stochastic_rounding_gives_a_neighbour_of_the_fp32_result(impl, device):
    """The same step with an fp32 master copy gives the exact fp32 result w (the same arithmetic); without
    one, the bf16 parameter is w truncated to bf16 or the next bf16 value away from zero, and exactly w
    where w is a bf16 value. Both occur."""
    p, m, v, _ = _state("bf16-state", (37, 29), device)
    g = _randn(p.shape, 3, device).to(torch.bfloat16)
    twin = [t.clone() for t in (p, m, v)] + [p.float()]
    torch.manual_seed(0)
    IMPLS[impl](p, g, m, v, None, **HYPER, weight_decay=0.1, step=3)
    IMPLS[impl](*twin[:1], g, *twin[1:], **HYPER, weight_decay=0.1, step=3)
    assert torch.equal(m, twin[1]) and torch.equal(v, twin[2])
    w = twin[3]
    below = (w.view(torch.int32) & -65536).view(torch.float32)  # toward zero
    above = (below.view(torch.int32) + 65536).view(torch.float32)  # the next bf16 magnitude
    got = p.float()
    exact = below == w
    assert torch.equal(got[exact], w[exact])
    assert ((got == below) | (got == above))[~exact].all()
    assert (got == below)[~exact].any() and (got == above)[~exact].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_stochastic_rounding_is_unbiased(impl, device):
    """w = 1 - 0.3 units of bf16 below 1.0 (weight decay alone: zero gradient and moments) in 12288 values
    (two programs in the interpreter), over 3 calls: a mean of w, where rounding to nearest would be 0.3
    units off; 1.0 seven times in ten. The random bits differ from value to value and from call to call."""
    unit = 2.0**-8  # the bf16 spacing just below 1.0
    lr, weight_decay = 1e-2, 0.3 * unit / 1e-2
    w = torch.tensor(1 - lr * weight_decay, dtype=torch.float32).item()  # what the kernel multiplies by
    torch.manual_seed(0)
    results = []
    for _ in range(3):
        p = torch.ones(12288, dtype=torch.bfloat16, device=device)
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        IMPLS[impl](p, torch.zeros_like(p), m, v, None, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8,
                    weight_decay=weight_decay, step=1)
        results.append(p.double())
    got = torch.cat(results)
    assert set(got.unique().tolist()) == {1.0, 1.0 - unit}
    assert abs(got.mean().item() - w) < 0.02 * unit  # the standard error is 0.0024 units
    assert (got == 1.0).double().mean().item() == pytest.approx(0.7, abs=0.02)
    assert len({tuple(stretch.tolist()) for stretch in got.split(1024)}) == 36  # no stretch repeats another


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS, ids=str)
def test_stochastic_rounding_follows_the_seed(impl, device):
    def run(**generator):
        p, m, v, _ = _state("bf16-state", (1000,), device)
        g = _randn(p.shape, 3, device).bfloat16()
        IMPLS[impl](p, g, m, v, None, **HYPER, weight_decay=0.1, step=1, **generator)
        return p

    torch.manual_seed(5)
    first = run()
    torch.manual_seed(5)
    assert torch.equal(run(), first)
    assert torch.equal(run(generator=torch.Generator(device).manual_seed(7)),
                       run(generator=torch.Generator(device).manual_seed(7)))


def test_reference_slices_large_tensors(monkeypatch):
    """Updated 8 values at a time (37 x 29: 135 slices, the last one short): the same numbers."""
    whole = _state("bf16-master", (37, 29), "cpu")
    sliced = [t.clone() for t in whole]
    g = _randn((37, 29), 3, "cpu").bfloat16()
    adamw_step_reference(*whole[:1], g, *whole[1:], **HYPER, weight_decay=0.1, step=2)
    monkeypatch.setattr(lopt_kernels.adamw, "STEP_CHUNK_ELEMENTS", 8)
    adamw_step_reference(*sliced[:1], g, *sliced[1:], **HYPER, weight_decay=0.1, step=2)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


def test_float64_parameters_take_the_reference():
    p, m, v = _randn(100, 0, "cpu").double(), torch.zeros(100), torch.zeros(100)
    q, mq, vq = p.clone(), m.clone(), v.clone()
    g = _randn(100, 1, "cpu").double()
    adamw_step(p, g, m, v, None, **HYPER, weight_decay=0.1, step=1)
    adamw_step_reference(q, g, mq, vq, None, **HYPER, weight_decay=0.1, step=1)
    assert torch.equal(p, q) and torch.equal(m, mq) and torch.equal(v, vq)


def test_shapes_must_match():
    p = torch.zeros(10)
    with pytest.raises(ValueError, match="shapes differ"):
        adamw_step(p, torch.zeros(11), torch.zeros(10), torch.zeros(10), None, **HYPER, weight_decay=0.0, step=1)


@pytest.mark.gpu
def test_gpu_rounds_to_nearest_as_pytorch_does():
    """On the GPU the kernel's bf16 stores round to nearest: the master copy's parameter and the bf16
    moments are those of the PyTorch ops (up to fused multiply-adds flipping a rare tie)."""
    p, m, v, master = _state("bf16-master", (4096, 37), "cuda")
    g = _randn(p.shape, 3, "cuda").bfloat16()
    adamw_step(p, g, m, v, master, **HYPER, weight_decay=0.1, step=2)
    assert torch.equal(p, master.bfloat16())
    p, m, v, _ = _state("fp32-bf16-state", (4096, 37), "cuda")
    ref = [t.clone() for t in (p, m, v)]
    g = _randn(p.shape, 3, "cuda")
    adamw_step(p, g, m, v, None, **HYPER, weight_decay=0.1, step=2)
    adamw_step_reference(ref[0], g, ref[1], ref[2], None, **HYPER, weight_decay=0.1, step=2)
    assert (m != ref[1]).double().mean().item() < 1e-3 and (v != ref[2]).double().mean().item() < 1e-3
