"""Zeroth-order perturbations generated inside a matmul (lopt_kernels.zo_matmul).

The noise: ``zo_noise`` (PyTorch) against the formula written out again in a Triton kernel here (with
``tl.randint4x``, interpreted on the CPU, compiled on CUDA) and against the module's own generator, bit
for bit; its moments on 1e6 values; its exact symmetry. The matmul: against x @ (W +- eps Z)^T in float64
(fp32 tight, 16-bit by the criterion of kernel_checks), the perturbed weight bit for bit (one-hot rows
of x read single weights out), edges masked on odd shapes with several tiles. The update: the kernel
equals the reference bit for bit (both sum fl(c_p z_p) in fp32 in order and subtract once).
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from kernel_checks import assert_no_worse_than_native, rel_err, seeded_randn

import lopt_kernels.zo_matmul as zm
from lopt_kernels.backend import current_backend, import_triton
from lopt_kernels.zo_matmul import (
    apply_directions_,
    apply_directions_reference_,
    perturbed_linear,
    perturbed_linear_reference,
    zo_noise,
    zo_noise_like,
)

triton, tl = import_triton()

needs_triton = pytest.mark.skipif(
    current_backend(KERNEL_DEVICE) != "triton",
    reason="the kernels run on CUDA, or on the CPU through the interpreter (TRITON_INTERPRET=1)",
)

BASE = 2**33 + 7  # past 2^32: the counters' high word is nonzero
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@triton.jit
def _oracle_kernel(seed, OFFSETS, OUT, n, BLOCK: tl.constexpr):
    """The distribution as specified, written out with Triton's own Philox."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    r0, r1, r2, r3 = tl.randint4x(seed, tl.load(OFFSETS + i, mask=mask, other=0))
    s = (r0 >> 10) + (r1 >> 10) + (r2 >> 10) + (r3 >> 10)
    z = (s.to(tl.int32, bitcast=True) - 8388606).to(tl.float32) * 4.129530850605079e-07
    tl.store(OUT + i, z, mask=mask)


def _oracle(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    _oracle_kernel[(triton.cdiv(offsets.numel(), 1024),)](seed, offsets, out, offsets.numel(), BLOCK=1024)
    return out


def _fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _truth(x, weight, seeds, eps, base):
    """x @ (W +- eps Z_p)^T in float64, the perturbed weight unrounded."""
    ys = []
    for p, seed in enumerate(seeds):
        z = zo_noise_like(seed, weight.shape, base, device=weight.device).double()
        w = weight.double()
        ys += [x[2 * p].double() @ (w + eps * z).T, x[2 * p + 1].double() @ (w - eps * z).T]
    return torch.stack(ys)


# ----------------------------------------------------------------------------------------------------
# The noise


def test_constants():
    assert zm.Z_SCALE == _fp32(math.sqrt(3)) / 2**22 == 4.129530850605079e-07
    assert zm.Z_SHIFT == 8388606 == 2 * (2**22 - 1)  # four times the mean of a 22-bit word


@needs_triton
@pytest.mark.parametrize("seed", [0, 1, -1, 2**40 + 3, 2**64 - 1])
def test_zo_noise_matches_triton(seed):
    g = torch.Generator().manual_seed(5)
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**62, -1, -(2**63)])
    offsets = torch.cat([edges, BASE + torch.arange(300), torch.randint(-(2**63), 2**63 - 1, (700,), generator=g)])
    offsets = offsets.to(KERNEL_DEVICE)
    z = zo_noise(seed, offsets)
    assert z.dtype == torch.float32 and z.shape == offsets.shape
    assert torch.equal(z, _oracle(seed, offsets))
    assert torch.equal(z, zm._zo_noise_triton(seed, offsets))  # the generator the matmul and update use


def test_zo_noise_like_is_the_counters():
    z = zo_noise_like(9, (7, 13), base=BASE)
    assert torch.equal(z, zo_noise(9, BASE + torch.arange(91).view(7, 13)))
    assert torch.equal(zo_noise(9, torch.arange(50, dtype=torch.int32)), zo_noise(9, torch.arange(50)))


def test_zo_noise_chunks(monkeypatch):
    whole = zo_noise_like(3, (10, 30), base=BASE)
    flat = zo_noise(3, BASE + torch.arange(300))
    monkeypatch.setattr(zm, "NOISE_CHUNK_ELEMENTS", 64)
    assert torch.equal(zo_noise_like(3, (10, 30), base=BASE), whole)
    assert torch.equal(zo_noise(3, BASE + torch.arange(300)), flat)


def test_zo_noise_moments():
    """Mean 0 and variance 1 (1 - 2^-44) on 1e6 values: 0.005 is ~5 standard errors of either."""
    n = 10**6
    for seed, base in [(1234, 0), (-7, BASE)]:
        z = zo_noise_like(seed, (n,), base=base).double()
        assert abs(z.mean().item()) < 0.005
        assert abs(z.var().item() - 1) < 0.005
        assert abs((z**3).mean().item()) < 0.02  # skewness 0
        assert abs((z**4).mean().item() - 2.7) < 0.03  # Irwin-Hall of 4: kurtosis 3 - 6/(5*4)
        assert z.abs().max().item() <= 2 * math.sqrt(3)


def test_zo_noise_is_exactly_symmetric():
    """Complementing the four words maps S to 2^24 - 4 - S, and z to -z exactly."""
    g = torch.Generator().manual_seed(2)
    words = [torch.randint(0, 2**32, (10000,), generator=g) for _ in range(4)]
    words[0][:4] = torch.tensor([0, 2**32 - 1, 2**31, 1023])
    z = zm._z_from_words(words)
    assert torch.equal(zm._z_from_words([w ^ 0xFFFFFFFF for w in words]), -z)
    lowest = zm._z_from_words([torch.zeros(1, dtype=torch.int64)] * 4).item()
    highest = zm._z_from_words([torch.full((1,), 2**32 - 1)] * 4).item()
    assert lowest == _fp32(-zm.Z_SHIFT * zm.Z_SCALE) == -highest


# ----------------------------------------------------------------------------------------------------
# perturbed_linear


def _inputs(p, m, k, n, dtype, w_dtype=None, seed=0):
    x = seeded_randn(2 * p, m, k, seed=seed, dtype=dtype)
    w = seeded_randn(n, k, seed=seed + 1, dtype=w_dtype or dtype) * 0.5
    seeds = torch.tensor([11 + 1000 * i for i in range(p)], dtype=torch.int64, device=KERNEL_DEVICE)
    return x, w, seeds


@needs_triton
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_linear_against_float64(p, dtype):
    x, w, seeds = _inputs(p, 5, 37, 29, dtype, seed=p)
    eps = 0.05
    y = perturbed_linear(x, w, seeds, eps, base=BASE)
    assert y.shape == (2 * p, 5, 29) and y.dtype == dtype
    truth = _truth(x, w, seeds.tolist(), eps, BASE)
    ref = perturbed_linear_reference(x, w, seeds, eps, base=BASE)
    if dtype == torch.float32:
        assert rel_err(y, truth) < 2e-6
        assert rel_err(ref, truth) < 2e-6
    else:
        # Both round the perturbed weight to bf16 (the model's weight); the output error is that of bf16.
        assert_no_worse_than_native(y, ref, truth, slack=1e-3, name=f"bf16 P={p}")
        assert (y.float() - ref.float()).abs().max().item() <= 2 ** -7 * ref.float().abs().max().item()


@needs_triton
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.float16, None), (torch.bfloat16, torch.float32)])
def test_perturbed_weight_bit_for_bit(dtype, w_dtype):
    """One-hot rows read the perturbed weight out: cast(W +- fl(eps z)) exactly, every (n, k), both signs."""
    p, k, n = 2, 37, 29
    x = torch.eye(k, dtype=dtype, device=KERNEL_DEVICE).expand(2 * p, k, k).contiguous()
    w = seeded_randn(n, k, seed=4, dtype=w_dtype or dtype)
    seeds = [5, -(2**62)]
    eps = 0.0731
    y = perturbed_linear(x, w, seeds, eps, base=BASE)
    for i, seed in enumerate(seeds):
        z = zo_noise_like(seed, (n, k), BASE, device=KERNEL_DEVICE)
        t = z * eps  # PyTorch's fp32 product with an fp32 scalar: one rounding
        assert torch.equal(y[2 * i], (w.float() + t).to(dtype).T)
        assert torch.equal(y[2 * i + 1], (w.float() - t).to(dtype).T)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_linear_several_tiles(dtype):
    """Rows past one BLOCK_M, columns past one BLOCK_N, K past one BLOCK_K: every edge masked."""
    x, w, seeds = _inputs(2, 150, 40, 130, dtype, seed=8)
    y = perturbed_linear(x, w, seeds, 0.02, base=BASE)
    truth = _truth(x, w, seeds.tolist(), 0.02, BASE)
    if dtype == torch.float32:
        assert rel_err(y, truth) < 2e-6
    else:
        assert_no_worse_than_native(y, perturbed_linear_reference(x, w, seeds, 0.02, base=BASE), truth,
                                    slack=1e-3, name="bf16 tiles")


def test_reference_is_the_per_direction_loop():
    """The reference against the plain recipe: perturb an fp32 copy of W, round to the model dtype, F.linear."""
    for dtype in DTYPES:
        x, w, _ = _inputs(3, 5, 37, 29, dtype, seed=3)
        x, w = x.cpu(), w.cpu()
        seeds = [3, 2**63 + 5, -9]  # 2^63 + 5 is the key of -(2^63) + 5
        eps = 1e-3
        y = perturbed_linear_reference(x, w, seeds, eps, base=BASE)
        for p, seed in enumerate(seeds):
            z = zo_noise_like(seed, w.shape, BASE)
            assert torch.equal(y[2 * p], F.linear(x[2 * p], (w.float() + eps * z).to(dtype)))
            assert torch.equal(y[2 * p + 1], F.linear(x[2 * p + 1], (w.float() - eps * z).to(dtype)))
    wrapped = perturbed_linear_reference(x, w, [3, -(2**63) + 5, -9], eps, base=BASE)
    assert torch.equal(y, wrapped)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_eps_is_the_plain_linear(dtype):
    x, w, seeds = _inputs(2, 5, 37, 29, dtype, seed=6)
    x[1::2] = x[::2]  # each direction's two evaluations on the same rows
    y = perturbed_linear(x, w, seeds, 0.0, base=BASE)
    truth = x.double() @ w.double().T
    native = F.linear(x, w)
    if dtype == torch.float32:
        assert rel_err(y, truth) < 2e-6
    else:
        assert_no_worse_than_native(y, native, truth, slack=1e-3, name="eps=0")
    assert torch.equal(y[::2], y[1::2])
    assert not torch.equal(perturbed_linear(x, w, seeds, 0.1, base=BASE), y)


def test_cpu_path_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")
    x, w, _ = _inputs(1, 3, 8, 4, torch.float32)
    assert torch.equal(perturbed_linear(x, w, [4], 0.1, base=5), perturbed_linear_reference(x, w, [4], 0.1, base=5))
    master = torch.randn(4, 8, device=KERNEL_DEVICE)
    expected = master.clone()
    apply_directions_reference_(expected, [1, 2], [0.5, -0.25], base=3)
    apply_directions_(master, [1, 2], [0.5, -0.25], base=3)
    assert torch.equal(master, expected)


# ----------------------------------------------------------------------------------------------------
# apply_directions_


@needs_triton
@pytest.mark.parametrize("shape,base", [((29, 37), BASE), ((3000,), 0)])
def test_apply_directions_matches_reference(shape, base):
    master = seeded_randn(*shape, seed=2)
    seeds = torch.tensor([7, -3, 2**40 + 1], device=KERNEL_DEVICE)
    coeffs = torch.tensor([1e-3, -2.5e-4, 7e-4], device=KERNEL_DEVICE)
    got, expected = master.clone(), master.clone()
    apply_directions_(got, seeds, coeffs, base=base)
    apply_directions_reference_(expected, seeds.tolist(), coeffs.tolist(), base=base)
    assert torch.equal(got, expected)
    exact = master.double() - sum(c * zo_noise_like(s, shape, base, device=KERNEL_DEVICE).double()
                                  for s, c in zip(seeds.tolist(), coeffs.tolist()))
    assert (got.double() - exact).abs().max().item() <= 2e-7 * master.abs().max().item()


@needs_triton
def test_apply_directions_non_contiguous_and_empty():
    master = seeded_randn(8, 6, seed=3)
    view = master.T  # not contiguous: the reference, with view's row-major counters
    expected = view.clone()
    apply_directions_reference_(expected, [4], [0.1], base=10)
    apply_directions_(view, [4], [0.1], base=10)
    assert torch.equal(view, expected)
    apply_directions_(torch.empty(0, 5, device=KERNEL_DEVICE), [1], [1.0])


# ----------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs():
    x, w, _ = _inputs(1, 3, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="2P"):
        perturbed_linear(x[:1], w, [1], 0.1)
    with pytest.raises(ValueError, match="K"):
        perturbed_linear(x, w[:, :5], [1], 0.1)
    with pytest.raises(ValueError, match="integer"):
        perturbed_linear(x, w, torch.tensor([1.5]), 0.1)
    with pytest.raises(ValueError, match="integer"):
        perturbed_linear(x, w, [1.0], 0.1)
    with pytest.raises(ValueError, match="base"):
        perturbed_linear(x, w, [1], 0.1, base=-1)
    with pytest.raises(ValueError, match="seeds"):
        perturbed_linear(x, w, [1, 2], 0.1)
    with pytest.raises(ValueError, match="dtype"):
        perturbed_linear(x, w.bfloat16(), [1], 0.1)
    with pytest.raises(ValueError, match="fp32"):
        apply_directions_(w.double(), [1], [0.1])
    with pytest.raises(ValueError, match="coefficients"):
        apply_directions_(w.clone(), [1, 2], [0.1])
    with pytest.raises(ValueError, match="base"):
        apply_directions_(w.clone(), [1], [0.1], base=-3)
    with pytest.raises(ValueError, match="integer"):
        zo_noise(1, torch.zeros(3))
    with pytest.raises(ValueError, match="integer"):
        zo_noise(1.5, torch.zeros(3, dtype=torch.int64))
