"""The inference-shaped ZO engine: a step's 2P evaluations scored in one no-grad forward over frozen weights.

Step t: draw P directions (``directions``); score each micro-batch once with the 2P perturbed models
stacked along the batch (+εZ_p in group 2p, −εZ_p in 2p+1; ``scoring``, ``linears``); g_p = (L+ − L−)/(2ε);
θ ← θ − lr·((1/P)·Σ_p g_p·Z_p + wd·θ) in fp32 (``state``). No weight is ever perturbed in place.
Kinds: ``lowrank`` (LoZO, the default: Z_p = U_p·Vᵀ, V kept ``interval`` steps), ``highrank`` (tracks
MeZO: Z_p = U_p·V_pᵀ/√r, r = 128, both fresh) and ``fullrank`` (MeZO: unit-variance Philox noise made
inside the GEMM, never stored). Trained: the ``nn.Linear`` weights of decoder layers ≥ ``first_layer`` = K;
embeddings, norms, biases and lm_head are not (as in zo-vllm). The layers below K run once per micro-batch
and are shared by the 2P evaluations: (K + 2P·(L − K))/(2P·L) of 2P full forwards (K = L/2, P = 1: 3/4).
Memory beyond inference: ``state`` (fp32 masters of 16-bit models; lowrank A, V) and the step's factors
(lowrank P·Σ N·r, highrank P·Σ (N + K)·r fp32).
Gradient accumulation: the micro-batches share the step's directions and L± are token-weighted over them
(examples for classification): g is that of one batch holding them all, not a mean of per-micro-batch g.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lopt.engine.model import LoPTModel
from lopt.errors import NonFiniteLossError
from lopt.zo.directions import (
    KINDS,
    LowRankDraws,
    Perturbation,
    SeededLowRank,
    direction_seeds,
    highrank_factors,
    highrank_scale,
)
from lopt.zo.linears import fullrank_forward, installed, linear_ops, lowrank_forward, trained_linears
from lopt.zo.reference import NO_DECAY, decays
from lopt.zo.scoring import Scores, stacked_scores
from lopt.zo.state import TrainedState

DEFAULT_RANK = {"lowrank": 2, "highrank": 128, "fullrank": 0}
STATE_VERSION = 1
# What a saved state depends on (eps, lr, wd and the number of directions may change on resume).
_STATE_SHAPING = ("kind", "factor_rank", "interval", "first_layer", "seed")


@dataclass(frozen=True)
class ZOSettings:
    """What a ZO run is. ``rank`` None: 2 (lowrank, LoZO's) or 128 (highrank); unused by fullrank.
    ``interval``: ν, the steps a lowrank basis V is kept (LoZO's 50). ``first_layer``: K, the first
    trained decoder layer. ``seed``: the run's seed stream (``lopt.zo.directions``)."""

    kind: str = "lowrank"
    eps: float = 1e-3
    lr: float = 1e-6
    weight_decay: float = 0.0
    directions: int = 1
    rank: int | None = None
    interval: int = 50
    first_layer: int = 0
    seed: int = 0
    no_decay: tuple[str, ...] = NO_DECAY

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        checks = [("eps", self.eps > 0), ("lr", self.lr >= 0), ("weight_decay", self.weight_decay >= 0),
                  ("directions", self.directions >= 1), ("interval", self.interval >= 1),
                  ("first_layer", self.first_layer >= 0), ("rank", self.rank is None or self.rank >= 1),
                  ("seed", 0 <= self.seed < 2**63)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"ZOSettings.{name} out of range: {getattr(self, name)!r}")

    @property
    def factor_rank(self) -> int:
        """r of the low-rank factors (0 for fullrank)."""
        return 0 if self.kind == "fullrank" else (self.rank or DEFAULT_RANK[self.kind])


@dataclass(frozen=True)
class ZOStepOutput:
    """One step. ``loss``: the mean of the 2P evaluation losses (the loss at θ, to O(ε²)); ``loss_plus`` /
    ``loss_minus`` / ``projected_grads``: per direction; ``accuracy``: classification, the mean over the
    2P perturbed evaluations (the clean accuracy comes from ``scores(batch)``); ``count``: label tokens or
    examples scored; ``refreshed``: a new lowrank basis was drawn; ``seconds``: wall time (synchronised)."""

    step: int
    loss: float
    projected_grads: tuple[float, ...]
    loss_plus: tuple[float, ...]
    loss_minus: tuple[float, ...]
    accuracy: float | None
    count: int
    refreshed: bool
    seconds: float


class ZOEngine:
    """Zeroth-order training of ``model`` (a Hugging Face causal LM, in place) under ``settings``.

    ``kernels``: the Triton ops (``lopt_kernels.zo_lowrank`` / ``zo_matmul`` and LoPT's fused ops; they
    run where ``current_backend`` says so) or their PyTorch references; default: on CUDA with Triton.
    ``lowrank_draws``: where the lowrank kind takes V and U (default: the seed stream, ``SeededLowRank``).
    ``select(name, module)``: which of the decoder layers' linears train (``trained_linears``; default: all;
    ``lopt.zo.hf.build_engine`` selects a PEFT model's LoRA linears).

    Use: ``out = engine.step(micro_batches)`` per step; ``engine.scores(batch)`` for a clean evaluation;
    ``engine.merged_model()`` before saving the model; ``state_dict`` / ``load_state_dict`` to resume.
    """

    def __init__(self, model: nn.Module, settings: ZOSettings | None = None, *, kernels: bool | None = None,
                 lowrank_draws: LowRankDraws | None = None, select=None):
        self.settings = settings = settings or ZOSettings()
        self.runner = LoPTModel(model, num_blocks=1, lambda_aux=0.0, kernels=kernels)
        self.model = model
        self.linears = trained_linears(model, settings.first_layer, select)
        self.runner.block_ranges = [(0, settings.first_layer), (settings.first_layer, len(model.model.layers))]
        self.kernels = self.runner.kernels
        self.ops = linear_ops(self.kernels)
        self.device = self.linears[0].weight.device
        rank = settings.factor_rank
        self.state = TrainedState(self.linears, rank if settings.kind == "lowrank" else 0)
        self.shapes = tuple(tuple(lin.weight.shape) for lin in self.linears)
        self.lowrank_draws = lowrank_draws or SeededLowRank(
            settings.seed, [n for n, _ in self.shapes], [k for _, k in self.shapes], rank, self.device)
        self.next_step = 0
        self.basis_step: int | None = None  # the refresh step the lowrank basis V was drawn on

    # ------------------------------------------------------------------ directions and scoring

    def draw(self, step: int) -> Perturbation:
        """Step ``step``'s P directions (``refreshed``: a lowrank basis was drawn). On the first lowrank step
        of a basis period (step − step mod ν differs from the current basis's) the update is folded into
        the weights and the period's basis drawn first: this mutates the engine, and a lowrank
        perturbation scores only until the next such refresh."""
        s = self.settings
        seeds = direction_seeds(s.seed, step, s.directions)
        common = dict(kind=s.kind, step=step, seeds=seeds, shapes=self.shapes,
                      bases=tuple(lin.base for lin in self.linears))
        refreshed = False
        if s.kind == "lowrank":
            period = step - step % s.interval
            if self.basis_step != period:
                self.state.fold()
                self.state.set_basis(self.lowrank_draws.basis(period))
                self.basis_step, refreshed = period, True
            u = self.lowrank_draws.factors(step, s.directions)
            return Perturbation(**common, u=u, v=[v[None] for v in self.state.V], refreshed=refreshed)
        if s.kind == "highrank":
            u, v = highrank_factors(seeds, [n for n, _ in self.shapes], [k for _, k in self.shapes],
                                    s.factor_rank, self.device)
            return Perturbation(**common, u=u, v=v, scale=highrank_scale(s.factor_rank))
        return Perturbation(**common)

    def scores(self, batch, perturbation: Perturbation | None = None) -> Scores:
        """The stacked forward: per-group losses of ``batch`` under the 2P evaluations of ``perturbation``
        (group 2p: +εZ_p, 2p+1: −εZ_p), or one clean group (the trained weights as they are) for None."""
        groups = 1 if perturbation is None else 2 * perturbation.directions
        if perturbation is not None and perturbation.kind == "lowrank" and \
                perturbation.v[0].data_ptr() != self.state.V[0].data_ptr():
            raise ValueError(f"the lowrank directions of step {perturbation.step} are from an earlier basis period")
        forward = self._forward(perturbation)
        context = installed(self.linears, forward) if forward is not None else contextlib.nullcontext()
        was_training = self.model.training
        self.model.eval()
        try:
            return stacked_scores(self.runner, batch, groups, context)
        finally:
            self.model.train(was_training)

    def _forward(self, perturbation: Perturbation | None):
        """The trained linears' forward ``f(l, x)`` for this scoring, or None where the model's own is exact."""
        s, state = self.settings, self.state
        if s.kind == "lowrank" and state.V is not None:
            return self._lowrank_forward(perturbation)
        if perturbation is None:
            return None
        groups = 2 * perturbation.directions
        if s.kind == "highrank":
            index = torch.arange(perturbation.directions, device=self.device).repeat_interleave(2)
            step = s.eps * perturbation.scale
            scale = torch.tensor([step, -step], device=self.device).repeat(perturbation.directions)
            return lambda l, x: lowrank_forward(self.linears[l].module, x, groups, perturbation.v[l],
                                                perturbation.u[l], index, index, scale, 1.0,
                                                self.ops.grouped_lowrank)
        seeds = torch.tensor(perturbation.seeds, dtype=torch.int64, device=self.device)
        return lambda l, x: fullrank_forward(self.linears[l].module, x, seeds, s.eps, self.linears[l].base,
                                             self.ops.perturbed_linear)

    def _lowrank_forward(self, perturbation: Perturbation | None):
        """c·x·Wᵀ + (x·V)·Uᵀ with U = A ± εU_p per group (A alone for a clean scoring): one grouped call."""
        state, eps = self.state, self.settings.eps
        groups = 1 if perturbation is None else 2 * perturbation.directions
        zeros = torch.zeros(groups, dtype=torch.int64, device=self.device)
        u_index = torch.arange(groups, device=self.device)
        ones = torch.ones(groups, dtype=torch.float32, device=self.device)

        def forward(l, x):
            a = state.A[l]
            if perturbation is None:
                u = a[None]
            else:
                step = eps * perturbation.u[l]
                u = torch.stack((a + step, a - step), dim=1).flatten(0, 1)  # (2P, N, r): +, − per direction
            return lowrank_forward(self.linears[l].module, x, groups, state.V[l][None], u, zeros, u_index, ones,
                                   state.c[l], self.ops.grouped_lowrank)

        return forward

    # ------------------------------------------------------------------ the step

    def score_sums(self, micro_batches, perturbation: Perturbation) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Σ count·loss (G,), Σ count·accuracy (G,) or None, and Σ count over ``micro_batches``: sums, so that
        ranks scoring different micro-batches add theirs up before ``projected_gradients``. In float64: the
        sums of fp32 losses are then exact in any order, and g = (L+ − L−)/2ε, which magnifies a rounding by
        1/2ε, is the same however the micro-batches are split."""
        results = [self.scores(mb, perturbation) for mb in micro_batches]
        counts = [r.count.double() for r in results]
        loss = sum(c * r.loss.double() for c, r in zip(counts, results))
        accuracy = None
        if results[0].accuracy is not None:
            accuracy = sum(c * r.accuracy.double() for c, r in zip(counts, results))
        return loss, accuracy, sum(counts)

    def projected_gradients(self, loss_sums: torch.Tensor, count: torch.Tensor):
        """(g (P,), L+ (P,), L− (P,)) from ``score_sums``' loss sums and count: L± count-weighted means."""
        loss = loss_sums / count.clamp(min=1)
        loss_plus, loss_minus = loss[0::2], loss[1::2]
        return (loss_plus - loss_minus) / (2 * self.settings.eps), loss_plus, loss_minus

    def estimate(self, micro_batches, perturbation: Perturbation):
        """(g (P,), L+ (P,), L− (P,), accuracy (G,) or None, count): L± token-weighted over the micro-batches."""
        loss_sums, accuracy_sums, count = self.score_sums(micro_batches, perturbation)
        g, loss_plus, loss_minus = self.projected_gradients(loss_sums, count)
        accuracy = None if accuracy_sums is None else accuracy_sums / count.clamp(min=1)
        return g, loss_plus, loss_minus, accuracy, count

    def update(self, perturbation: Perturbation, g: torch.Tensor, lr: float | None = None) -> None:
        """θ ← θ − lr·((1/P)·Σ_p g_p·Z_p + wd·θ) on the trained weights, in fp32 (wd where ``decays``)."""
        s = self.settings
        lr = s.lr if lr is None else lr
        coeffs = g.float() * (lr / perturbation.directions)
        decay = [1.0 - lr * s.weight_decay if s.weight_decay and decays(lin.name, s.no_decay) else 1.0
                 for lin in self.linears]
        if s.kind == "lowrank":
            self.state.lowrank_update(coeffs, perturbation.u, decay)
        elif s.kind == "highrank":
            self.state.highrank_update(coeffs * perturbation.scale, perturbation.u, perturbation.v, decay)
        else:
            self.state.fullrank_update(coeffs, list(perturbation.seeds), decay, self.ops.apply_directions_)

    def step(self, micro_batches, step_index: int | None = None, *, lr: float | None = None) -> ZOStepOutput:
        """One ZO step over ``micro_batches`` (a batch dict or a list of them) at ``step_index`` (default:
        the step after the last one); ``lr`` overrides the settings' (a scheduler's value). Raises
        ``NonFiniteLossError`` before touching a weight if a loss is not finite."""
        start = time.perf_counter()
        micro_batches = [micro_batches] if isinstance(micro_batches, dict) else list(micro_batches)
        t = self.next_step if step_index is None else step_index
        perturbation = self.draw(t)
        g, loss_plus, loss_minus, accuracy, count = self.estimate(micro_batches, perturbation)
        values = torch.cat([g, loss_plus, loss_minus]).tolist()
        if not all(map(_finite, values)):
            raise NonFiniteLossError(f"ZO step {t}: non-finite loss (L+ {loss_plus.tolist()}, "
                                     f"L- {loss_minus.tolist()}); the weights were not updated")
        self.update(perturbation, g, lr)
        self.next_step = t + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        p = perturbation.directions
        return ZOStepOutput(t, sum(values[p:]) / (2 * p), tuple(values[:p]), tuple(values[p:2 * p]),
                            tuple(values[2 * p:]), None if accuracy is None else float(accuracy.mean()),
                            int(count), perturbation.refreshed, time.perf_counter() - start)

    # ------------------------------------------------------------------ weights and resume

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The trained weights as they stand, fp32 (new tensors), by parameter name; nothing is folded."""
        return {lin.name: self.state.effective(l) for l, lin in enumerate(self.linears)}

    def merged_model(self) -> nn.Module:
        """The model with the whole update in its weights (lowrank: A·Vᵀ folded in), a plain Hugging Face
        model to ``save_pretrained``. Training may go on; a fold off a refresh step changes rounding only."""
        self.state.fold()
        return self.model

    def state_dict(self) -> dict:
        """All bit-exact resume needs besides the frozen base model: the trained weights' fp32 values,
        the lowrank A, V, c, and the stream position (the next step; seeds are derived from it)."""
        return {"version": STATE_VERSION, "settings": asdict(self.settings), "next_step": self.next_step,
                "basis_step": self.basis_step, **self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s state (the trained weights are written into the model)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"ZO state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = ZOSettings(**{**state["settings"], "no_decay": tuple(state["settings"]["no_decay"])})
        differ = [k for k in _STATE_SHAPING if getattr(saved, k) != getattr(self.settings, k)]
        if differ:
            raise ValueError(f"ZO state was saved under other settings: {', '.join(differ)} differ")
        self.state.load_state_dict(state)
        self.next_step, self.basis_step = int(state["next_step"]), state["basis_step"]


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
