"""The ZO engine's steps (lopt.zo.engine) against reference loops that perturb the weights in place:
LoZO's ``lozo_step`` fed the same directions (lowrank), a MeZO loop with the same Z (fullrank: the
Philox noise; highrank: U·Vᵀ/√r); then bf16 against fp32, resume, the merged model and the kernels.

Tolerances. A loss of ~4.2 is computed by the two paths to within ~2.5e-7 relative (different summation
orders, and the reference's in-place +1/-2/+1 passes round the weights), so g = (L+ - L-)/(2ε) agrees
to ~2·1e-6/(2ε) = 1e-4 at ε = 1e-2 (G_ATOL; measured 5e-5). The weights then agree to the rounding
of their update paths (a few fp32 ulps of |θ| ~ 0.1: 1e-8) plus lr·|Δg|·|Z| per step (1e-3·5e-5·|Z|,
|Z| up to ~10, 6 steps: 3e-6, W_ATOL; measured 6e-7), against an update that moves weights by > 3e-4.
"""

import copy
import io

import pytest
import torch
from zo_helpers import lm_batch, tiny_model

import lopt_kernels
from lopt.zo import (
    ZOEngine,
    ZOSettings,
    causal_lm_loss,
    direction_seeds,
    lozo_perturbation_directions,
    lozo_step,
)
from lopt_kernels.zo_matmul import zo_noise_like

EPS, LR = 1e-2, 1e-3
G_ATOL = 2e-4
W_ATOL = 3e-6
BATCHES = [lm_batch(3, 10, seed=s) for s in range(6)]


def only_trained(model, names):
    """A copy whose only trainable parameters are ``names`` (what the reference loops then perturb)."""
    out = copy.deepcopy(model)
    for name, p in out.named_parameters():
        p.requires_grad_(name in names)
    return out


def assert_weights_close(engine, reference, start):
    weights, params = engine.trained_weights(), dict(reference.named_parameters())
    for name, w in weights.items():
        moved = (params[name] - start[name]).abs().max()
        assert moved > 100 * W_ATOL, name  # the update is far above the tolerance
        torch.testing.assert_close(w, params[name].detach(), rtol=0, atol=W_ATOL)


class LozoDraws:
    """``LowRankDraws`` taking LoZO's reference directions (v on refresh steps, u every step)."""

    def __init__(self, reference, seeds, rank, interval, v_store):
        self.reference, self.seeds, self.rank, self.interval, self.v = reference, seeds, rank, interval, v_store
        self.names = [n for n, p in reference.named_parameters() if p.requires_grad]

    def _directions(self, step):
        return lozo_perturbation_directions(self.reference, self.seeds[step], step, self.v, rank=self.rank,
                                            interval=self.interval)

    def basis(self, step):
        d = self._directions(step)
        return [d[n].v for n in self.names]

    def factors(self, step, directions):
        assert directions == 1
        d = self._directions(step)
        return [d[n].u[None] for n in self.names]


@pytest.mark.parametrize("first_layer", [0, 2])
def test_lowrank_steps_equal_lozo_reference(first_layer):
    model = tiny_model("qwen2")
    settings = ZOSettings(kind="lowrank", eps=EPS, lr=LR, rank=2, interval=3, first_layer=first_layer)
    seeds, v_store = [101 + t for t in range(6)], {}
    names = [f"model.layers.{i}.{m}.weight" for i in range(first_layer, 4)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    reference = only_trained(model, set(names))
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    engine = ZOEngine(copy.deepcopy(model), settings, kernels=False,
                      lowrank_draws=LozoDraws(reference, seeds, 2, 3, v_store))
    assert [lin.name for lin in engine.linears] == names
    for t, batch in enumerate(BATCHES):
        expected = lozo_step(reference, causal_lm_loss, batch, seeds[t], t, v_store, rank=2, interval=3,
                             eps=EPS, lr=LR)
        out = engine.step(batch, t)
        assert out.refreshed == expected.refreshed == (t % 3 == 0)
        assert out.projected_grads[0] == pytest.approx(expected.projected_grad, abs=G_ATOL)
        assert out.loss_plus[0] == pytest.approx(expected.loss_plus, rel=3e-7)
    assert_weights_close(engine, reference, start)


def mezo_loop(model, names, batch, directions, eps, lr):
    """MeZO's passes (+εz, loss, -2εz, loss, +εz; in place) per direction, then θ -= lr·mean_p(g_p·z_p)."""
    params = dict(model.named_parameters())
    g = []
    with torch.no_grad():
        for z in directions:
            losses = []
            for factor in (1, -2, 1):  # the last pass restores
                for n in names:
                    params[n].copy_(params[n] + factor * z[n] * eps)
                if len(losses) < 2:
                    losses.append(causal_lm_loss(model, batch))
            g.append(((losses[0] - losses[1]) / (2 * eps)).item())
        for n in names:
            params[n].copy_(params[n] - lr * sum(g_p * z[n] for g_p, z in zip(g, directions)) / len(directions))
    return g


@pytest.mark.parametrize("kind,directions,first_layer", [("fullrank", 1, 0), ("fullrank", 3, 2), ("highrank", 2, 1)])
def test_dense_steps_equal_mezo_loop(kind, directions, first_layer):
    model = tiny_model("llama")
    settings = ZOSettings(kind=kind, eps=EPS, lr=LR, directions=directions, rank=8, first_layer=first_layer,
                          seed=3)
    engine = ZOEngine(copy.deepcopy(model), settings, kernels=False)
    names = [lin.name for lin in engine.linears]
    reference = only_trained(model, set(names)).eval()
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    shapes = {n: p.shape for n, p in reference.named_parameters()}
    bases = dict(zip(names, [0, *torch.tensor([shapes[n].numel() for n in names]).cumsum(0).tolist()]))
    for t, batch in enumerate(BATCHES[:4]):
        if kind == "fullrank":  # Z straight from the Philox noise, as the GEMM regenerates it
            z = [{n: zo_noise_like(s, shapes[n], bases[n]) for n in names}
                 for s in direction_seeds(settings.seed, t, directions)]
        else:
            perturbation = engine.draw(t)
            z = [{n: perturbation.dense(p, l) for l, n in enumerate(names)} for p in range(directions)]
        expected = mezo_loop(reference, names, batch, z, EPS, LR)
        out = engine.step(batch, t)
        assert out.projected_grads == pytest.approx(expected, abs=G_ATOL)
    assert_weights_close(engine, reference, start)


@pytest.mark.parametrize("kind", ["lowrank", "fullrank"])
def test_bf16_tracks_fp32(kind):
    """20 steps on a bf16 model (fp32 masters and update) against the same steps in fp32 from the same
    (bf16-rounded) start: the trained weights stay within 5% of the update's norm of each other (measured
    1.5%). The gap is the bf16 forward's rounding noise in g (ε = 1e-2 moves a loss of 4 by ~0.1%)."""
    bf16 = tiny_model("llama", seed=4).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    settings = ZOSettings(kind=kind, eps=EPS, lr=1e-2, rank=4, interval=5, directions=2, first_layer=2)
    engines = [ZOEngine(m, settings, kernels=False) for m in (bf16, fp32)]
    start = engines[1].trained_weights()
    batch = lm_batch(8, 32, seed=7, lengths=[32] * 8)
    for t in range(20):
        for e in engines:
            e.step(batch, t)
    low, high = (e.trained_weights() for e in engines)
    gap = torch.stack([(low[n] - high[n]).norm() for n in low]).norm()
    update = torch.stack([(high[n] - start[n]).norm() for n in low]).norm()
    assert update > 0 and gap < 0.05 * update, (gap, update)
    # every update is kept: the bf16 weights are the masters rounded, the masters moved everywhere
    model_weights = dict(bf16.named_parameters())
    engines[0].merged_model()
    for l, lin in enumerate(engines[0].linears):
        assert torch.equal(model_weights[lin.name], engines[0].state.master[l].to(torch.bfloat16))


@pytest.mark.parametrize("kind,dtype", [("lowrank", torch.bfloat16), ("lowrank", torch.float32),
                                        ("highrank", torch.float32), ("fullrank", torch.bfloat16)])
def test_state_dict_resume_is_bit_identical(kind, dtype):
    settings = ZOSettings(kind=kind, eps=EPS, lr=LR, rank=4, interval=3, directions=2, first_layer=1,
                          weight_decay=0.1)
    base = tiny_model("qwen2").to(dtype)
    engine = ZOEngine(copy.deepcopy(base), settings, kernels=False)
    for t in range(4):
        engine.step(BATCHES[t])
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    continued = [engine.step(b) for b in BATCHES[4:]]

    resumed = ZOEngine(copy.deepcopy(base), settings, kernels=False)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    again = [resumed.step(b) for b in BATCHES[4:]]
    assert [(o.step, o.projected_grads, o.loss_plus, o.loss_minus) for o in again] == \
           [(o.step, o.projected_grads, o.loss_plus, o.loss_minus) for o in continued]
    for (name, w), (_, w2) in zip(engine.trained_weights().items(), resumed.trained_weights().items()):
        assert torch.equal(w, w2), name
    for (name, p), (_, p2) in zip(engine.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, p2), name
    with pytest.raises(ValueError, match="first_layer"):
        ZOEngine(copy.deepcopy(base), ZOSettings(kind=kind, rank=4, interval=3, first_layer=2)).load_state_dict(
            engine.state_dict())


def test_merged_model_is_a_plain_model():
    """After merging, the Hugging Face forward alone gives the clean scores (lowrank: A·Vᵀ folded in)."""
    model = tiny_model("llama")
    engine = ZOEngine(model, ZOSettings(eps=EPS, lr=LR, rank=2, interval=4, weight_decay=0.3), kernels=False)
    for t in range(3):
        engine.step(BATCHES[t])
    batch = BATCHES[5]
    clean = engine.scores(batch).loss.item()
    weights = engine.trained_weights()
    merged = engine.merged_model()
    assert merged is model and float(engine.state.A[0].abs().max()) == 0 and engine.state.c == [1.0] * 28
    params = dict(merged.named_parameters())
    for name, w in weights.items():
        torch.testing.assert_close(params[name].detach(), w, rtol=0, atol=W_ATOL)
    with torch.no_grad():
        assert merged(**batch).loss.item() == pytest.approx(clean, rel=1e-6)
    engine.step(BATCHES[3])  # training goes on after a merge


@pytest.mark.skipif(lopt_kernels.current_backend("cpu") != "triton", reason="needs the Triton interpreter")
@pytest.mark.parametrize("kind", ["lowrank", "fullrank"])
def test_kernels_match_references(kind):
    """One small scoring through the Triton kernels (interpreted on the CPU) against the references."""
    base = tiny_model("llama", layers=2)
    batch = lm_batch(2, 8)
    settings = ZOSettings(kind=kind, eps=EPS, rank=4, directions=2, first_layer=1)
    scores = []
    for kernels in (False, True):
        engine = ZOEngine(copy.deepcopy(base), settings, kernels=kernels)
        scores.append(engine.scores(batch, engine.draw(0)).loss)
    torch.testing.assert_close(scores[1], scores[0], rtol=2e-6, atol=0)
