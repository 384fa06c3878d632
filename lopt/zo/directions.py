"""A ZO step's directions: the seed stream, the factor draws and the ``Perturbation`` they make.

Seeds. ``mix(key, counter)`` is the first two words of Philox4x32-10 (``lopt_kernels.philox_randint4x``)
at ``counter`` under ``key``, as a 63-bit integer: stateless and the same on every device. A run seeded s
has, at step t, the step seed s_t = mix(s, t), direction p's seed d_{t,p} = mix(s_t, p) and, on low-rank
refresh steps, the basis seed b_t = mix(s_t, 2^32). Nothing else is random: a run resumes from its step.

Draws. ``fullrank``: d_{t,p} is the seed of ``lopt_kernels.zo_matmul`` (Z_p regenerated from the counters
base_l + n·K + k, base_l = the numel of the trained linears before l; the same on every device).
``lowrank`` / ``highrank``: a ``torch.Generator`` on the weights' device seeded d_{t,p} (b_t for the basis)
fills one flat fp32 vector with standard normals (``Tensor.normal_``), split in trained-linear order into
U_l (N_l x r) [lowrank], U_l then V_l (K_l x r) [highrank], V_l [basis]. torch's generators differ between
CPU and CUDA: low-rank runs reproduce on the same device type, as MeZO's ``torch.normal`` does.
``LowRankDraws`` is what the engine asks for low-rank factors; ``SeededLowRank`` the stream above (tests
plug in the LoZO reference's draws instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from lopt_kernels.philox import N_ROUNDS, PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A, PHILOX_ROUND_B
from lopt_kernels.zo_matmul import zo_noise_like

KINDS = ("lowrank", "highrank", "fullrank")
BASIS_COUNTER = 1 << 32  # the counter of the basis seed under s_t; directions use p < 2^32
_MASK32, _MASK31 = 0xFFFFFFFF, 0x7FFFFFFF


def mix(key: int, counter: int) -> int:
    """A 63-bit integer from Philox4x32-10 at ``counter`` (int64) under ``key`` (in [0, 2^64)): word 0, and
    word 1's low 31 bits above it. ``lopt_kernels.philox_randint4x``'s words, in Python integers (no tensor
    ops: a step draws 1 + P of these)."""
    c0, c1, c2, c3 = counter & _MASK32, (counter >> 32) & _MASK32, 0, 0
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(N_ROUNDS):
        b, a = PHILOX_ROUND_B * c2, PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = (b >> 32) ^ c1 ^ k0, b & _MASK32, (a >> 32) ^ c3 ^ k1, a & _MASK32
        k0, k1 = (k0 + PHILOX_KEY_A) & _MASK32, (k1 + PHILOX_KEY_B) & _MASK32
    return c0 | ((c1 & _MASK31) << 32)


def step_seed(seed: int, step: int) -> int:
    return mix(seed, step)


def direction_seeds(seed: int, step: int, directions: int) -> tuple[int, ...]:
    """d_{t,p} for p < ``directions``: direction p's seed does not depend on how many directions there are."""
    s = step_seed(seed, step)
    return tuple(mix(s, p) for p in range(directions))


def basis_seed(seed: int, step: int) -> int:
    return mix(step_seed(seed, step), BASIS_COUNTER)


def normal_rows(seeds, size: int, device) -> torch.Tensor:
    """(len(seeds), size) fp32: row i filled with standard normals by a generator on ``device`` seeded seeds[i]."""
    out = torch.empty(len(seeds), size, dtype=torch.float32, device=device)
    for row, s in zip(out, seeds):
        generator = torch.Generator(device=out.device)
        generator.manual_seed(s)
        row.normal_(generator=generator)
    return out


def split_rows(flat: torch.Tensor, rows: list[int], rank: int) -> list[torch.Tensor]:
    """Views (P, rows_l, rank) of consecutive slices of ``flat`` (P, S): unit stride in their last two dims."""
    out, start = [], 0
    for n in rows:
        out.append(flat[:, start:start + n * rank].unflatten(1, (n, rank)))
        start += n * rank
    if start != flat.shape[1]:
        raise ValueError(f"split_rows: {flat.shape[1]} values for {start}")
    return out


class LowRankDraws(Protocol):
    """Where the engine's ``lowrank`` kind takes its factors (fp32, on the weights' device, linear order)."""

    def basis(self, step: int) -> list[torch.Tensor]:
        """V_l (K_l, r) per trained linear, drawn on refresh step ``step``."""
        ...

    def factors(self, step: int, directions: int) -> list[torch.Tensor]:
        """U_l (P, N_l, r) per trained linear, for the P directions of step ``step``."""
        ...


class SeededLowRank:
    """The default ``LowRankDraws``: the seed stream of the module docstring."""

    def __init__(self, seed: int, out_features: list[int], in_features: list[int], rank: int, device):
        self.seed, self.out_features, self.in_features = seed, list(out_features), list(in_features)
        self.rank, self.device = rank, device

    def basis(self, step: int) -> list[torch.Tensor]:
        flat = normal_rows([basis_seed(self.seed, step)], sum(self.in_features) * self.rank, self.device)
        return [v[0] for v in split_rows(flat, self.in_features, self.rank)]

    def factors(self, step: int, directions: int) -> list[torch.Tensor]:
        seeds = direction_seeds(self.seed, step, directions)
        flat = normal_rows(seeds, sum(self.out_features) * self.rank, self.device)
        return split_rows(flat, self.out_features, self.rank)


def highrank_factors(seeds, out_features: list[int], in_features: list[int], rank: int, device):
    """(U, V): per trained linear U_l (P, N_l, r) and V_l (P, K_l, r), views of one (P, Σ(N+K)·r) draw."""
    rows = [n for pair in zip(out_features, in_features) for n in pair]
    parts = split_rows(normal_rows(seeds, sum(rows) * rank, device), rows, rank)
    return parts[0::2], parts[1::2]


@dataclass
class Perturbation:
    """The P directions of one step, for every trained linear l: Z_{p,l} = ``scale``·U_{p,l}·V_{p,l}ᵀ
    (low rank; lowrank's V is the step's basis, shared by the directions: ``v[l]`` is (1, K, r)) or the
    Philox noise of seed ``seeds[p]`` at counter base ``bases[l]`` (fullrank). ε is the engine's."""

    kind: str
    step: int
    seeds: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # (N_l, K_l)
    bases: tuple[int, ...]  # fullrank counters: the numel of the linears before l
    u: list[torch.Tensor] | None = None  # (P, N_l, r) fp32
    v: list[torch.Tensor] | None = None  # (P or 1, K_l, r) fp32
    scale: float = 1.0  # highrank: 1/√r, so that Z's entries have unit variance
    refreshed: bool = False  # lowrank: drawing it drew a new basis (and folded the update)

    @property
    def directions(self) -> int:
        return len(self.seeds) if self.u is None else self.u[0].shape[0]

    def dense(self, p: int, l: int, device=None) -> torch.Tensor:
        """Z_{p,l} (N_l, K_l) fp32, materialised (for tests and the update of the highrank kind)."""
        if self.kind == "fullrank":
            return zo_noise_like(self.seeds[p], self.shapes[l], self.bases[l], device=device)
        v = self.v[l][p if self.v[l].shape[0] > 1 else 0]
        return (self.u[l][p] @ v.T) * self.scale


def highrank_scale(rank: int) -> float:
    return 1.0 / math.sqrt(rank)
