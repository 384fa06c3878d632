"""The fp32 state of the weights a ZO run trains: every update accumulates in fp32, never in the model's dtype.

Per trained linear l (weight W_l, N x K):
- ``master[l]``: W_l's fp32 values: the weight itself for an fp32 model, else an fp32 copy (4 bytes per
  trained parameter: 2x the bf16/fp16 weights), rounded into W_l after every change.
- low rank: the trained weight is c_l·master_l + A_l·V_lᵀ. V_l (K x r) is the basis kept for ν steps;
  A_l (N x r, fp32) = Σ_t −lr·g_t·U_t (decayed), the update since the last fold; c_l = Π(1 − lr·wd) the
  weight decay of master since then (a scalar, so decay costs no pass over W). ``fold`` writes
  c·master + A·Vᵀ into master and W and resets A = 0, c = 1 (each refresh, and for a plain checkpoint).
- high rank / full rank: master is updated every step (master −= Σ_p coeff_p·Z_p) and rounded into W.
Memory beyond the model: master for 16-bit models; A and V (r·(N+K) fp32 per linear) for lowrank.
"""

from __future__ import annotations

import torch

from lopt.zo.linears import TrainedLinear


class TrainedState:
    """fp32 masters (and the low-rank A, V, c) of ``linears``; ``rank`` > 0 for the lowrank kind."""

    def __init__(self, linears: list[TrainedLinear], rank: int = 0):
        self.linears = linears
        self.separate = [lin.weight.dtype != torch.float32 for lin in linears]
        self.master = [lin.weight.detach().float().clone() if sep else lin.weight.data
                       for lin, sep in zip(linears, self.separate)]
        self.rank = rank
        self.A = [m.new_zeros(m.shape[0], rank) for m in self.master] if rank else None
        self.V: list[torch.Tensor] | None = None
        self.c = [1.0] * len(linears)

    def sync(self, l: int) -> None:
        """Round master l into the model's weight (nothing to do where the weight is the master)."""
        if self.separate[l]:
            self.linears[l].weight.data.copy_(self.master[l])

    @torch.no_grad()
    def effective(self, l: int) -> torch.Tensor:
        """The trained weight l in fp32 (a new tensor): c·master + A·Vᵀ (low rank), else master."""
        w = self.master[l] * self.c[l]
        if self.A is not None and self.V is not None:
            w.addmm_(self.A[l], self.V[l].T)
        return w

    @torch.no_grad()
    def fold(self) -> None:
        """master ← c·master + A·Vᵀ, A ← 0, c ← 1, rounded into the weights (low rank; else nothing)."""
        if self.A is None or self.V is None:
            return
        for l, (master, a, v) in enumerate(zip(self.master, self.A, self.V)):
            if self.c[l] != 1.0:
                master.mul_(self.c[l])
            master.addmm_(a, v.T)
            a.zero_()
            self.c[l] = 1.0
            self.sync(l)

    def set_basis(self, bases: list[torch.Tensor]) -> None:
        """A new V (call ``fold`` first: A is relative to the old one)."""
        self.V = [v.detach().to(torch.float32, copy=True).contiguous() for v in bases]

    @torch.no_grad()
    def lowrank_update(self, coeffs: torch.Tensor, factors: list[torch.Tensor], decay: list[float]) -> None:
        """A_l ← decay_l·A_l − Σ_p coeffs[p]·U_{p,l}, c_l ← decay_l·c_l; ``factors``: U_l (P, N, r)."""
        for l, (a, u) in enumerate(zip(self.A, factors)):
            if decay[l] != 1.0:
                a.mul_(decay[l])
                self.c[l] *= decay[l]
            a.sub_(torch.einsum("p,pnr->nr", coeffs, u))

    @torch.no_grad()
    def highrank_update(self, coeffs: torch.Tensor, u: list[torch.Tensor], v: list[torch.Tensor],
                        decay: list[float]) -> None:
        """master_l ← decay_l·master_l − Σ_p coeffs[p]·U_{p,l}·V_{p,l}ᵀ, rounded into W_l."""
        for l, (master, u_l, v_l) in enumerate(zip(self.master, u, v)):
            if decay[l] != 1.0:
                master.mul_(decay[l])
            left = (u_l * coeffs[:, None, None]).permute(1, 0, 2).reshape(u_l.shape[1], -1)  # (N, P·r)
            right = v_l.permute(1, 0, 2).reshape(v_l.shape[1], -1)  # (K, P·r)
            master.addmm_(left, right.T, alpha=-1.0)
            self.sync(l)

    @torch.no_grad()
    def fullrank_update(self, coeffs: torch.Tensor, seeds, decay: list[float], apply_directions_) -> None:
        """master_l ← decay_l·master_l − Σ_p coeffs[p]·Z_{p,l} (``apply_directions_``), rounded into W_l."""
        for l, (lin, master) in enumerate(zip(self.linears, self.master)):
            if decay[l] != 1.0:
                master.mul_(decay[l])
            apply_directions_(master, seeds, coeffs, lin.base)
            self.sync(l)

    def state_dict(self) -> dict:
        clone = lambda ts: None if ts is None else [t.detach().clone() for t in ts]  # noqa: E731
        return {"names": [lin.name for lin in self.linears], "master": clone(self.master), "A": clone(self.A),
                "V": clone(self.V), "c": list(self.c)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        names = [lin.name for lin in self.linears]
        if list(state["names"]) != names:
            raise ValueError("ZO state: the trained linears differ from this engine's (model or first_layer)")
        for l, master in enumerate(self.master):
            master.copy_(state["master"][l])
            self.sync(l)
        if self.A is not None:
            for a, saved in zip(self.A, state["A"]):
                a.copy_(saved)
        self.V = None if state["V"] is None else [v.to(self.master[0].device).clone() for v in state["V"]]
        self.c = [float(c) for c in state["c"]]
