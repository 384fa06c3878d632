"""Triton's counter-based random numbers (``tl.randint4x`` / ``tl.rand`` / ``tl.randn``) in plain PyTorch.

A kernel that draws noise with ``tl.randn(seed, offsets)`` holds no noise in memory: any program can
regenerate any element from its offset. The functions here compute the same numbers with PyTorch ops,
on any device, so that the PyTorch path (and the tests) can reproduce a kernel's noise. What Triton
computes (``triton/language/random.py``; the same in Triton 3.6 through 3.9, where 3.6 writes the
conversion's ``~x`` as ``-x - 1``, equal in two's complement):

* **Philox 4x32, 10 rounds** (Salmon et al. 2011, the Random123 ``philox4x32_10``). Counter
  ``(c0, c1, c2, c3) = (low 32 bits of the offset, high 32 bits or 0, 0, 0)``: the high word is
  ``offset >> 32`` (arithmetic) for 64-bit offsets and 0 for 32-bit ones, so an int32 offset -1 and an
  int64 offset -1 differ. Key ``(k0, k1) = (low, high 32 bits of seed)``, the seed taken as a 64-bit
  two's-complement value (a negative seed is sign-extended). One round, all mod 2^32::

      c0, c1, c2, c3 = hi(B * c2) ^ c1 ^ k0,  lo(B * c2),  hi(A * c0) ^ c3 ^ k1,  lo(A * c0)
      k0, k1 = k0 + 0x9E3779B9, k1 + 0xBB67AE85

  with A = 0xD2511F53, B = 0xCD9E8D57, and hi/lo the halves of the 64-bit product.
  ``randint4x`` returns the four words, ``randint`` the first.
* **uint32 -> float** (``rand``): the word read as an int32 x, ``x = ~x`` where x < 0 (so
  0 <= x < 2^31), then ``float32(x) * float32(4.6566127342e-10)``: uniform on [0, 1), never 1.
* **Box-Muller** (``randn``): from the first two words' uniforms, ``u1 = max(1e-7, u1)``,
  ``sqrt(-2 * log(u1)) * cos(2 pi * u2)`` in fp32 (the cosine branch). ``randn4x`` also returns the sine
  branch of that pair, then the same two from the third and fourth words' uniforms.

Exactness. ``philox_randint4x`` and ``philox_rand`` equal Triton bit for bit on every backend (integer
ops, one int -> fp32 rounding and one fp32 product, all exact or IEEE round-to-nearest). The normals
cannot be: Triton's ``log``, ``cos``, ``sin`` and ``sqrt`` are not correctly rounded (the interpreter
runs NumPy's fp32 SIMD routines, which depend on the CPU and NumPy's build; on NVIDIA ``tl.sqrt`` is
documented as a fast square root, and ``log``/``cos`` are not correctly rounded either), and PyTorch's
own fp32 versions (even its fp32 ``sqrt`` on AVX-512) differ from both. ``philox_randn`` evaluates them
in float64 and rounds once to fp32: the correctly rounded fp32 Box-Muller but for rare double
roundings (which also let two devices' float64 math, equal to a float64 ulp, differ in an fp32 result
now and then). That is Triton's formula on Triton's uniforms, within a few fp32
ulps of the interpreter (at most 5 seen) and, expected, a few 1e-6 (absolute) of the GPU.
Where noise must be reproduced bit for bit across backends, draw it from the integer words
(``randint4x``: Rademacher signs, or uniforms through ``rand``'s conversion).

``philox_triton`` runs the Triton functions themselves in a small kernel (compiled on CUDA, in the
interpreter on the CPU with ``TRITON_INTERPRET=1``): the oracle for the tests.
"""

from __future__ import annotations

import struct

import torch

from .backend import current_backend, import_triton

triton, tl = import_triton()  # stand-ins without Triton: current_backend() never picks it then

__all__ = [
    "philox_rand",
    "philox_randint",
    "philox_randint4x",
    "philox_randn",
    "philox_randn4x",
    "philox_triton",
]

# Triton's default number of Philox rounds (tl.randint4x & co.: n_rounds=10).
N_ROUNDS = 10
# Philox 4x32 multipliers and key increments (the golden ratio and sqrt(3) - 1 in 32 bits).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF

# Seeds Triton takes as a kernel's integer argument: int32, int64 or uint64 (the kernel turns all into uint64).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _fp32(x: float) -> float:
    """``x`` rounded to fp32 (as a Python float): the value of a float literal in a Triton kernel."""
    return struct.unpack("f", struct.pack("f", x))[0]


# The fp32 constants of Triton's conversion and Box-Muller (Python floats in the kernel are fp32).
_UNIFORM_SCALE = _fp32(4.6566127342e-10)  # the largest with (2^31 - 1) * scale < 1 in fp32
_MIN_U1 = _fp32(1.0e-7)  # log(u1) stays finite: |normal| <= sqrt(-2 log 1e-7) ~ 5.68
_TWO_PI = _fp32(6.283185307179586)

# Offsets the reference takes at a time: bounds its int64 temporaries (about a dozen of 8 bytes each).
CHUNK_ELEMENTS = 1 << 20

# Values per program of the kernel: on the GPU, and at most in the interpreter (which pays per program).
BLOCK = 1024
INTERPRETER_BLOCK = 8192
NUM_WARPS = 4

# What philox_triton's kernel writes: its DIST constexpr, and how many outputs per offset.
_DISTS = {"randint4x": (0, 4), "rand": (1, 1), "randn": (2, 1), "randn4x": (3, 4)}


# ----------------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _philox_kernel(seed, OFFSETS, OUT, n, N_ROUNDS: tl.constexpr, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Triton's own random functions at BLOCK offsets: OUT[k * n + i] is output k at OFFSETS[i].

    DIST 0: the four words of tl.randint4x (OUT int64, values in [0, 2^32)); 1: tl.rand; 2: tl.randn;
    3: the four normals of tl.randn4x (OUT fp32).
    """
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    offsets = tl.load(OFFSETS + i, mask=mask, other=0)  # int32 or int64, as given
    if DIST == 0:
        r0, r1, r2, r3 = tl.randint4x(seed, offsets, N_ROUNDS)
        tl.store(OUT + i, r0.to(tl.int64), mask=mask)  # uint32 -> int64 zero-extends
        tl.store(OUT + n + i, r1.to(tl.int64), mask=mask)
        tl.store(OUT + 2 * n + i, r2.to(tl.int64), mask=mask)
        tl.store(OUT + 3 * n + i, r3.to(tl.int64), mask=mask)
    elif DIST == 1:
        tl.store(OUT + i, tl.rand(seed, offsets, N_ROUNDS), mask=mask)
    elif DIST == 2:
        tl.store(OUT + i, tl.randn(seed, offsets, N_ROUNDS), mask=mask)
    else:
        z0, z1, z2, z3 = tl.randn4x(seed, offsets, N_ROUNDS)
        tl.store(OUT + i, z0, mask=mask)
        tl.store(OUT + n + i, z1, mask=mask)
        tl.store(OUT + 2 * n + i, z2, mask=mask)
        tl.store(OUT + 3 * n + i, z3, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher


def philox_triton(seed: int, offsets: torch.Tensor, dist: str = "randn", n_rounds: int = N_ROUNDS):
    """``tl.<dist>(seed, offsets, n_rounds)`` computed by Triton, for an int32 or int64 ``offsets`` tensor.

    ``dist``: ``"randint4x"`` (a tuple of four int64 tensors holding the uint32 words), ``"rand"``,
    ``"randn"`` (fp32, the shape of ``offsets``) or ``"randn4x"`` (a tuple of four). Runs on CUDA, or on
    the CPU through the interpreter (``TRITON_INTERPRET=1``); elsewhere it raises.
    """
    if dist not in _DISTS:
        raise ValueError(f"philox_triton: dist={dist!r}, expected one of {', '.join(_DISTS)}")
    seed = _check_seed(seed)
    _check_offsets(offsets)
    if current_backend(offsets.device) != "triton":
        raise RuntimeError(
            f"philox_triton: Triton does not run on {offsets.device} here (a CUDA tensor, or a CPU one with "
            "TRITON_INTERPRET=1 set before triton is imported)"
        )
    code, n_out = _DISTS[dist]
    flat = offsets.reshape(-1).contiguous()
    n = flat.numel()
    out_dtype = torch.int64 if dist == "randint4x" else torch.float32
    out = torch.empty((n_out, n), dtype=out_dtype, device=offsets.device)
    if n > 0:
        block = BLOCK if offsets.device.type == "cuda" else min(INTERPRETER_BLOCK, triton.next_power_of_2(n))
        _philox_kernel[(triton.cdiv(n, block),)](
            seed, flat, out, n, N_ROUNDS=n_rounds, DIST=code, BLOCK=block, num_warps=NUM_WARPS
        )
    outs = tuple(o.view(offsets.shape) for o in out)
    return outs if n_out == 4 else outs[0]


# ----------------------------------------------------------------------------------------------------
# Reference


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            seed = int(seed.__index__())  # numpy / 0-d integer tensors
        except (AttributeError, TypeError):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}") from None
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed {seed} is outside what a Triton kernel takes: [-2**63, 2**64)")
    return seed


def _check_offsets(offsets: torch.Tensor) -> None:
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        got = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise TypeError(f"offsets must be an int32 or int64 tensor, got {got}")


def _mulhilo(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``x * c`` for int64 ``x`` in [0, 2^32) and a 32-bit constant ``c``.

    int64 cannot hold the 64-bit product (it wraps past 2^63), so ``c`` is split into 16-bit halves:
    x * c = p_hi * 2^16 + p_lo with p_hi, p_lo < 2^48, and every partial sum below stays under 2^50.
    """
    p_lo = x * (c & 0xFFFF)
    p_hi = x * (c >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # the product's low 32 bits plus its carry into the high half
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def _philox(c0, c1, c2, c3, k0: int, k1: int, n_rounds: int = N_ROUNDS):
    """Philox 4x32 on int64 tensors holding uint32 words; key ``(k0, k1)`` as Python ints."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _randint4x_flat(seed: int, offsets: torch.Tensor, n_rounds: int):
    """The four words (int64 in [0, 2^32)) for a 1-D int32/int64 ``offsets``."""
    seed &= (1 << 64) - 1  # two's complement: Triton sign-extends a negative int32/int64 seed
    k0, k1 = seed & _MASK32, seed >> 32
    off = offsets.to(torch.int64)
    c0 = off & _MASK32
    # The high counter word: offset >> 32 (arithmetic) for 64-bit offsets, 0 for 32-bit ones.
    c1 = (off >> 32) & _MASK32 if offsets.dtype == torch.int64 else torch.zeros_like(off)
    zero = torch.zeros_like(off)
    return _philox(c0, c1, zero, zero, k0, k1, n_rounds)


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float on a uint32 word (int64 holding it): fp32 in [0, 1)."""
    # As an int32, ~x where negative: x >= 2^31 becomes 2^32 - 1 - x = x ^ 0xFFFFFFFF.
    x = torch.where(word >= 2**31, word ^ _MASK32, word)
    x = x.to(torch.float64).to(torch.float32)  # int -> fp32, rounded to nearest (exact in fp64 first)
    return _fp32_mul(x, _UNIFORM_SCALE)


def _fp32_mul(x: torch.Tensor, c: float) -> torch.Tensor:
    """fp32 ``x * c`` rounded to nearest: the fp64 product of two fp32 values is exact, then one rounding."""
    return (x.to(torch.float64) * c).to(torch.float32)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal: (r cos th, r sin th) in fp32, with log/sqrt/cos/sin rounded once from fp64."""
    u1 = torch.clamp_min(u1, _MIN_U1)
    th = _fp32_mul(u2, _TWO_PI).to(torch.float64)
    log_u1 = torch.log(u1.to(torch.float64)).to(torch.float32)
    r = torch.sqrt(-2.0 * log_u1.to(torch.float64)).to(torch.float32).to(torch.float64)  # -2 * log: exact
    cos = torch.cos(th).to(torch.float32).to(torch.float64)
    sin = torch.sin(th).to(torch.float32).to(torch.float64)
    return (r * cos).to(torch.float32), (r * sin).to(torch.float32)


def _chunked(seed: int, offsets: torch.Tensor, n_out: int, dtype: torch.dtype, n_rounds: int, fn):
    """Apply ``fn(words)`` -> n_out tensors over ``offsets`` CHUNK_ELEMENTS at a time; outputs shaped as offsets."""
    seed = _check_seed(seed)
    _check_offsets(offsets)
    flat = offsets.reshape(-1)
    out = torch.empty((n_out, flat.numel()), dtype=dtype, device=offsets.device)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        part = slice(start, start + CHUNK_ELEMENTS)
        for k, value in enumerate(fn(_randint4x_flat(seed, flat[part], n_rounds))):
            out[k, part] = value
    return tuple(o.view(offsets.shape) for o in out)


def philox_randint4x(seed: int, offsets: torch.Tensor, n_rounds: int = N_ROUNDS):
    """``tl.randint4x(seed, offsets)``: four int64 tensors shaped as ``offsets``, holding uint32 values.

    ``seed``: an integer in [-2^63, 2^64) (what a Triton kernel takes; used mod 2^64). ``offsets``: an
    int32 or int64 tensor on any device; its dtype matters (see the module docstring).
    """
    return _chunked(seed, offsets, 4, torch.int64, n_rounds, lambda words: words)


def philox_randint(seed: int, offsets: torch.Tensor, n_rounds: int = N_ROUNDS) -> torch.Tensor:
    """``tl.randint(seed, offsets)``: the first word of ``philox_randint4x``, as int64 in [0, 2^32)."""
    return _chunked(seed, offsets, 1, torch.int64, n_rounds, lambda words: words[:1])[0]


def philox_rand(seed: int, offsets: torch.Tensor, n_rounds: int = N_ROUNDS) -> torch.Tensor:
    """``tl.rand(seed, offsets)``: fp32 uniform on [0, 1), shaped as ``offsets``; Triton's bit for bit."""
    return _chunked(seed, offsets, 1, torch.float32, n_rounds, lambda words: (_uniform(words[0]),))[0]


def philox_randn(seed: int, offsets: torch.Tensor, n_rounds: int = N_ROUNDS) -> torch.Tensor:
    """``tl.randn(seed, offsets)``: fp32 standard normal, shaped as ``offsets``.

    Triton's formula on Triton's uniforms (bit for bit); log, sqrt and cos rounded once from float64,
    so the values match Triton's to a few fp32 ulps, not bit for bit (module docstring).
    """

    def normal(words):
        return _box_muller(_uniform(words[0]), _uniform(words[1]))[:1]

    return _chunked(seed, offsets, 1, torch.float32, n_rounds, normal)[0]


def philox_randn4x(seed: int, offsets: torch.Tensor, n_rounds: int = N_ROUNDS):
    """``tl.randn4x(seed, offsets)``: four fp32 normal tensors (as ``philox_randn``: to a few ulps)."""

    def normals(words):
        u = [_uniform(w) for w in words]
        return _box_muller(u[0], u[1]) + _box_muller(u[2], u[3])

    return _chunked(seed, offsets, 4, torch.float32, n_rounds, normals)
