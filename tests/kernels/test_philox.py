"""Triton's Philox random numbers (lopt_kernels.philox) against Triton itself.

The oracle is ``philox_triton``: a kernel that calls ``tl.randint4x`` / ``tl.rand`` / ``tl.randn`` /
``tl.randn4x`` (interpreted on the CPU, compiled on CUDA). The words and the uniforms must be equal bit
for bit. The normals cannot be (Triton's log/cos/sqrt are not correctly rounded; the reference rounds
them once from float64): in the interpreter they are within ``INTERPRETER_ULPS`` fp32 ulps, and the
formula itself is checked exactly by redoing it with NumPy's fp32 ops, which is what the interpreter
runs. On the GPU (``gpu`` tests) they are within ``GPU_ATOL``.

Seeds: Triton takes an integer kernel argument in [-2^63, 2^64) (int32, int64 or uint64) and uses it
mod 2^64, so -1 and 2^64 - 1 are one key; the edges of that range are among the seeds below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICE

import lopt_kernels.philox as philox
from lopt_kernels.backend import import_triton
from lopt_kernels.philox import (
    philox_rand,
    philox_randint,
    philox_randint4x,
    philox_randn,
    philox_randn4x,
    philox_triton,
)

triton, tl = import_triton()

# NumPy's fp32 log/cos/sin (the interpreter's) against the reference's once-rounded float64: measured at
# most 5 ulps over 2M normals (AVX-512 NumPy 2.3); a margin for other CPUs' NumPy loops.
INTERPRETER_ULPS = 8
# The GPU's fast log/cos/sqrt: |error of cos| ~ 1e-6 absolute, times r = sqrt(-2 log u1) <= 5.68.
GPU_ATOL = 2e-5

# Seeds as a kernel argument: int32 (0, 1, 2^31 - 1, -1), int64 (2^40 + 3, -2^63) and uint64 (2^64 - 1).
SEEDS = [0, 1, 2**31 - 1, -1, 2**40 + 3, -(2**63), 2**64 - 1]


def _offsets(case: str, device=KERNEL_DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if case == "37":
        t = torch.arange(37, dtype=torch.int32)
    elif case == "136x97":  # all of int32, negatives included (their high counter word is 0)
        t = torch.randint(-(2**31), 2**31, (136, 97), dtype=torch.int32, generator=g)
    elif case == "int32-edges":  # up to 2^31 - 1, and down to -2^31
        t = torch.cat([torch.arange(2**31 - 200, 2**31, dtype=torch.int64), torch.arange(-(2**31), -(2**31) + 200)])
        t = t.to(torch.int32)
    elif case == "int64-large":  # across 2^31 and 2^32, far beyond, and negative (high word 0xFFFFFFFF)
        bases = torch.tensor([2**31 - 50, 2**32 - 50, 2**40, 2**62 - 50, -(2**31) - 50, -50, -(2**63)])
        t = (bases[:, None] + torch.arange(100)).reshape(-1)
        t = torch.cat([t, torch.randint(-(2**63), 2**63 - 1, (500,), generator=g)])
    else:
        raise ValueError(case)
    return t.to(device)


CASES = ["37", "136x97", "int32-edges", "int64-large"]


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns as int64, ordered as the values are: the distance of two is their distance in ulps."""
    b = x.contiguous().view(torch.int32).long()
    return torch.where(b < 0, -(b & 0x7FFFFFFF), b)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return (_ordered(a) - _ordered(b)).abs().max().item() if a.numel() else 0


def _interpreter_box_muller(u1: torch.Tensor, u2: torch.Tensor):
    """Triton's pair_uniform_to_normal as the interpreter runs it: NumPy fp32 ops, fp32 constants."""
    u1, u2 = u1.cpu().numpy(), u2.cpu().numpy()
    u1 = np.maximum(np.float32(1.0e-7), u1)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return torch.from_numpy(r * np.cos(th)), torch.from_numpy(r * np.sin(th))


def _assert_normals_match(kernel: torch.Tensor, ref: torch.Tensor):
    assert kernel.shape == ref.shape and kernel.dtype == ref.dtype == torch.float32
    if kernel.device.type == "cuda":
        assert (kernel - ref).abs().max().item() <= GPU_ATOL
    else:
        assert _ulps(kernel, ref) <= INTERPRETER_ULPS


# ----------------------------------------------------------------------------------------------------
# The Philox function


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32_10: the reference is that generator."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in vectors:
        words = philox._philox(*(torch.tensor([c]) for c in counter), *key)
        assert tuple(int(w) for w in words) == expected


def test_mulhilo_is_the_64_bit_product():
    x = torch.tensor([0, 1, 2**16 - 1, 2**16, 2**31, 2**32 - 1, 0x9E3779B9, 0x12345678])
    for c in (philox.PHILOX_ROUND_A, philox.PHILOX_ROUND_B, 0xFFFFFFFF):
        hi, lo = philox._mulhilo(x, c)
        for xi, h, l in zip(x.tolist(), hi.tolist(), lo.tolist()):
            assert (h, l) == ((xi * c) >> 32, (xi * c) & 0xFFFFFFFF)


# ----------------------------------------------------------------------------------------------------
# Against Triton


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_triton(seed, case):
    """randint4x and rand bit for bit; randn within the bound (module docstring), its formula exactly."""
    offsets = _offsets(case)
    words = philox_triton(seed, offsets, "randint4x")
    ref_words = philox_randint4x(seed, offsets)
    for w, r in zip(words, ref_words):
        assert w.shape == offsets.shape and torch.equal(w, r)
    assert torch.equal(philox_randint(seed, offsets), ref_words[0])

    uniform = philox_triton(seed, offsets, "rand")
    assert uniform.dtype == torch.float32 and torch.equal(uniform, philox_rand(seed, offsets))

    normal = philox_triton(seed, offsets, "randn")
    _assert_normals_match(normal, philox_randn(seed, offsets))
    if normal.device.type == "cpu":  # the interpreter: Box-Muller on the reference's uniforms, NumPy's fp32 math
        u1, u2 = (philox._uniform(w) for w in ref_words[:2])
        assert torch.equal(normal, _interpreter_box_muller(u1, u2)[0])


@pytest.mark.parametrize("case", ["136x97", "int64-large"])
def test_randn4x_matches_triton(case):
    seed = 2**40 + 3
    offsets = _offsets(case)
    normals = philox_triton(seed, offsets, "randn4x")
    ref = philox_randn4x(seed, offsets)
    for n, r in zip(normals, ref):
        _assert_normals_match(n, r)
    assert torch.equal(ref[0], philox_randn(seed, offsets))  # randn is randn4x's first
    if KERNEL_DEVICE == "cpu":
        u = [philox._uniform(w) for w in philox_randint4x(seed, offsets)]
        expected = _interpreter_box_muller(u[0], u[1]) + _interpreter_box_muller(u[2], u[3])
        for n, e in zip(normals, expected):
            assert torch.equal(n, e)


def test_rounds_match_triton():
    offsets = _offsets("136x97")
    for n_rounds in (1, 7):
        words = philox_triton(5, offsets, "randint4x", n_rounds=n_rounds)
        assert all(torch.equal(w, r) for w, r in zip(words, philox_randint4x(5, offsets, n_rounds=n_rounds)))
    assert not torch.equal(philox_randint(5, offsets, n_rounds=7), philox_randint(5, offsets))


@triton.jit
def _convert_kernel(WORDS, U1, U2, UNIFORM, N1, N2, BLOCK: tl.constexpr):
    """Triton's uint -> float conversion on given words, and its Box-Muller on given uniforms."""
    i = tl.arange(0, BLOCK)
    word = tl.load(WORDS + i).to(tl.uint32)  # int64 holding a uint32: the low 32 bits
    tl.store(UNIFORM + i, tl.random.uint_to_uniform_float(word))
    n1, n2 = tl.random.pair_uniform_to_normal(tl.load(U1 + i), tl.load(U2 + i))
    tl.store(N1 + i, n1)
    tl.store(N2 + i, n2)


def test_conversion_edges_match_triton():
    """The conversion at the words where it folds (2^31) and ends (0, 2^32 - 1); Box-Muller at u1 = 0 (clamped)."""
    words = torch.tensor([0, 1, 2, 2**23, 2**24 + 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]
                         + [0x3FFFFFFF, 0xC0000000, 0x7F7F7F7F, 0xDEADBEEF, 0x12345678])  # fmt: skip
    top = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()  # the largest fp32 below 1
    u1 = torch.tensor([0.0, 1e-9, 1e-7, 2e-7, 1e-3, 0.25, 0.5, 0.75, top, 0.999, 0.3, 0.6, 0.9, 0.1, 0.05, 0.2])
    u2 = torch.tensor([0.0, 0.25, 0.5, 0.75, top, 0.125, 0.375, 0.625, 0.875, 0.999, 1e-7, 0.33, 0.66, 0.1, 0.9, 0.0])
    words, u1, u2 = words.to(KERNEL_DEVICE), u1.to(KERNEL_DEVICE), u2.to(KERNEL_DEVICE)
    uniform, n1, n2 = (torch.empty(16, device=KERNEL_DEVICE) for _ in range(3))
    _convert_kernel[(1,)](words, u1, u2, uniform, n1, n2, BLOCK=16)

    ref_uniform = philox._uniform(words)
    assert torch.equal(uniform, ref_uniform)
    assert ref_uniform.min().item() == 0.0 and ref_uniform.max().item() < 1.0
    ref_n1, ref_n2 = philox._box_muller(u1, u2)
    _assert_normals_match(n1, ref_n1)
    _assert_normals_match(n2, ref_n2)
    assert torch.isfinite(ref_n1).all() and ref_n1.abs().max().item() <= 5.7  # sqrt(-2 log 1e-7) = 5.68
    if KERNEL_DEVICE == "cpu":
        exp1, exp2 = _interpreter_box_muller(u1, u2)
        assert torch.equal(n1, exp1) and torch.equal(n2, exp2)


# ----------------------------------------------------------------------------------------------------
# The reference alone


def test_statistics():
    offsets = torch.arange(100_000)
    z = philox_randn(12345, offsets).double()
    assert abs(z.mean().item()) < 0.015  # 5 standard errors
    assert abs(z.std().item() - 1) < 0.015
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01
    u = philox_rand(12345, offsets).double()
    assert u.min().item() >= 0 and u.max().item() < 1 and abs(u.mean().item() - 0.5) < 0.005
    for w in philox_randint4x(12345, offsets):  # each bit of each word: about half ones
        bits = (w[:, None] >> torch.arange(32)) & 1
        assert ((bits.double().mean(0) - 0.5).abs() < 0.01).all()


def test_deterministic_and_counter_based(monkeypatch):
    offsets = _offsets("136x97", "cpu")
    z = philox_randn(7, offsets)
    assert torch.equal(z, philox_randn(7, offsets))
    # Each value depends on its own offset only: not on position, shape or the chunk it falls in.
    perm = torch.randperm(offsets.numel(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(philox_randn(7, offsets.reshape(-1)[perm]), z.reshape(-1)[perm])
    assert torch.equal(philox_randn(7, offsets.t()), z.t())
    monkeypatch.setattr(philox, "CHUNK_ELEMENTS", 1000)
    assert torch.equal(philox_randn(7, offsets), z)


def test_seeds_and_offsets_differ():
    offsets = torch.arange(10_000)
    base = philox_randint(0, offsets)
    for other in (philox_randint(1, offsets), philox_randint(2**32, offsets), philox_randint(0, offsets + 10_000)):
        assert (other != base).float().mean().item() > 0.999
    assert (philox_randn(0, offsets) != philox_randn(1, offsets)).float().mean().item() > 0.999
    assert torch.equal(philox_randn(-1, offsets), philox_randn(2**64 - 1, offsets))  # one key, mod 2^64
    # int32 and int64 offsets agree where the high word is 0 (0 <= offset < 2^31), not for negative ones.
    assert torch.equal(philox_randn(3, offsets.int()), philox_randn(3, offsets))
    negative = -1 - offsets
    assert (philox_randint(3, negative.int()) != philox_randint(3, negative)).all()


def test_shapes_and_bad_inputs(monkeypatch):
    assert philox_randn(0, torch.empty(0, 3, dtype=torch.int64)).shape == (0, 3)
    assert philox_randn(0, torch.tensor(5)).shape == ()
    assert philox_randn(np.int64(4), torch.arange(3)).equal(philox_randn(4, torch.arange(3)))
    with pytest.raises(TypeError, match="int32 or int64"):
        philox_randn(0, torch.arange(3.0))
    with pytest.raises(TypeError, match="integer"):
        philox_randn(1.5, torch.arange(3))
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="outside"):
            philox_rand(seed, torch.arange(3))
    with pytest.raises(ValueError, match="dist"):
        philox_triton(0, torch.arange(3, device=KERNEL_DEVICE), "normal")
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")
    with pytest.raises(RuntimeError, match="Triton does not run"):
        philox_triton(0, torch.arange(3))


# ----------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_matches_triton_and_cpu():
    """Compiled on CUDA: words and uniforms bit for bit at 1M offsets; normals within GPU_ATOL. The
    reference gives the same words and uniforms on CUDA as on the CPU, and its normals to an ulp."""
    offsets = torch.arange(-(2**20), 2**20, 2, dtype=torch.int64, device="cuda") * 4099 + 2**31
    for seed in (0, 2**31 - 1, 2**40 + 3, 2**64 - 1):
        for dtype in (torch.int32, torch.int64):
            off = offsets.to(dtype)
            ref_words = philox_randint4x(seed, off)
            assert all(torch.equal(w, r) for w, r in zip(philox_triton(seed, off, "randint4x"), ref_words))
            assert torch.equal(philox_triton(seed, off, "rand"), philox_rand(seed, off))
            normal, ref = philox_triton(seed, off, "randn"), philox_randn(seed, off)
            assert (normal - ref).abs().max().item() <= GPU_ATOL
            for n, r in zip(philox_triton(seed, off, "randn4x"), philox_randn4x(seed, off)):
                assert (n - r).abs().max().item() <= GPU_ATOL
            cpu = off.cpu()
            assert all(torch.equal(w.cpu(), r) for w, r in zip(ref_words, philox_randint4x(seed, cpu)))
            assert torch.equal(philox_rand(seed, off).cpu(), philox_rand(seed, cpu))
            assert _ulps(ref.cpu(), philox_randn(seed, cpu)) <= 1
