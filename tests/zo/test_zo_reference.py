"""The MeZO / LoZO reference steps (lopt.zo.reference) on a tiny random fp32 Llama.

Tolerances are rounding bounds, with u = 2^-24 (fp32 unit roundoff; a rounded result is within u of its
exact value, relative). The restore pass θ + a - 2a + a (a = fl(z·ε), the same tensor each pass, so
the exact sum is θ) rounds three times at magnitudes <= |θ| + 2|a|: each weight ends within
3u·(|θ| + 2ε|z|) of θ. The update θ' - lr·(g·z + wd·θ') adds one rounding at ~|θ| and a few relative
roundings of the (small) update term; those bounds are written where used.
"""

import copy

import pytest
import torch

from lopt.models.shapes import build_model, tiny_config
from lopt.zo import (
    CONSISTENT,
    MEZO_NO_DECAY,
    NO_DECAY,
    PUBLISHED,
    LowRank,
    causal_lm_loss,
    decays,
    lozo_perturbation_directions,
    lozo_step,
    lozo_update_directions,
    mezo_directions,
    mezo_step,
    trainable_parameters,
)

U = 2.0**-24
EPS = 1e-3
RANK, NU = 2, 3


@pytest.fixture(scope="module")
def base():
    """A 2-layer Llama (hidden 32) with attention biases; norms and biases moved off 1 and 0 so that
    weight decay shows on them."""
    config = tiny_config("llama", hidden_size=32, num_hidden_layers=2, vocab_size=64, attention_bias=True)
    model = build_model(config, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    return model, {"input_ids": ids, "labels": ids}


def fresh(base):
    model, batch = base
    return copy.deepcopy(model), batch


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restore_bound(theta, z):
    return 3 * U * (theta.abs() + 2 * EPS * z.abs())


def constant_loss(model, batch):
    return torch.tensor(1.0)


# ------------------------------------------------------------------------------------------------------ MeZO


def test_directions_follow_mezo_convention(base):
    model, _ = fresh(base)
    z = mezo_directions(model, 7)
    names = [n for n, _ in trainable_parameters(model)]
    assert list(z) == names == [n for n, _ in model.named_parameters()]
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        assert torch.equal(z[name], torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype))


def test_mezo_step_is_closed_form_update(base):
    """(a) θ1 = θ0 - lr·(g·z + wd·θ0) from the regenerated z; eval mode, no grad, logged loss L+."""
    model, batch = fresh(base)
    model.train()
    seen = []

    def loss_fn(m, b):
        seen.append((m.training, torch.is_grad_enabled()))
        return causal_lm_loss(m, b)

    theta0, z = snapshot(model), mezo_directions(model, 11)
    lr, wd = 1e-3, 0.1
    res = mezo_step(model, loss_fn, batch, 11, eps=EPS, lr=lr, weight_decay=wd)
    assert seen == [(False, False), (False, False)] and model.training
    assert res.loss == res.loss_plus and res.projected_grad != 0.0
    assert res.projected_grad == ((torch.tensor(res.loss_plus) - torch.tensor(res.loss_minus)) / (2 * EPS)).item()
    g = res.projected_grad
    moved = 0.0
    for name, p in model.named_parameters():
        t0, zz = theta0[name].double(), z[name].double()
        decay = wd * t0 if decays(name) else 0.0
        expected = t0 - lr * (g * zz + decay)
        # restore (3 roundings), the final subtraction (1 at ~|θ|), the update term (a few, relative)
        tol = restore_bound(t0, zz) + U * t0.abs() + 4 * U * lr * (abs(g) * zz.abs() + wd * t0.abs()) + 1e-12
        assert ((p.double() - expected).abs() <= tol).all(), name
        moved = max(moved, ((expected - t0).abs() / tol).max().item())
    assert moved > 1e3  # the update is far above the tolerance


def test_projected_gradient_matches_perturbed_copies(base):
    """(b) g = (L+ - L-)/(2ε) with L± from separate copies at θ ± εz."""
    model, batch = fresh(base)
    z = mezo_directions(model, 5)
    losses = []
    for sign in (1, -1):
        copy_ = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in copy_.named_parameters():
                p.copy_(p + sign * z[name] * EPS)
            losses.append(copy_(**batch).loss.item())
    l_plus, l_minus = losses
    res = mezo_step(model, causal_lm_loss, batch, 5, eps=EPS, lr=0.0)
    # L+ is computed at the very same weights (θ + fl(z·ε)): bit for bit.
    assert res.loss_plus == l_plus
    # L- is computed at fl(fl(θ + a) - 2a), not fl(θ - a): allow a few ulps of the loss.
    scale = max(abs(l_plus), abs(l_minus))
    assert abs(res.loss_minus - l_minus) <= 8 * U * scale
    g_ref = (l_plus - l_minus) / (2 * EPS)
    assert abs(res.projected_grad - g_ref) <= 4 * U * abs(g_ref) + 8 * U * scale / (2 * EPS)
    assert abs(g_ref) > 100 * 8 * U * scale / (2 * EPS)  # the check is not vacuous


def test_zero_lr_leaves_model_unchanged(base):
    """(c) lr = 0: only the restore's rounding remains, within 3u·(|θ| + 2ε|z|)."""
    model, batch = fresh(base)
    theta0, z = snapshot(model), mezo_directions(model, 3)
    mezo_step(model, causal_lm_loss, batch, 3, eps=EPS, lr=0.0, weight_decay=0.5)
    for name, p in model.named_parameters():
        assert ((p - theta0[name]).abs() <= restore_bound(theta0[name], z[name])).all(), name


def test_decay_rule_names():
    llama = ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
             "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"]
    opt = ["model.decoder.layers.0.self_attn_layer_norm.weight", "model.decoder.final_layer_norm.bias"]
    qwen3 = ["model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"]
    weights = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    assert not any(decays(n) for n in llama + opt + qwen3)
    assert all(decays(n) for n in weights)
    # The published rule decays the final Llama norm and Qwen3's q/k norms; on OPT it is the same set.
    assert [n for n in llama + opt + qwen3 if decays(n, MEZO_NO_DECAY)] == ["model.norm.weight"] + qwen3
    assert all(decays(n, MEZO_NO_DECAY) for n in weights)


@pytest.mark.parametrize("method", ["mezo", "lozo"])
@pytest.mark.parametrize("rule", [NO_DECAY, MEZO_NO_DECAY], ids=["no_decay", "mezo_no_decay"])
def test_weight_decay_exclusions(base, method, rule):
    """(d) with g = 0 (constant loss) the step is θ <- θ - lr·wd·θ on decayed names only."""
    model, batch = fresh(base)
    theta0 = snapshot(model)
    lr, wd = 0.5, 0.2
    if method == "mezo":
        res = mezo_step(model, constant_loss, batch, 9, eps=EPS, lr=lr, weight_decay=wd, no_decay=rule)
    else:
        res = lozo_step(model, constant_loss, batch, 9, 0, {}, rank=RANK, interval=NU, eps=EPS, lr=lr,
                        weight_decay=wd, no_decay=rule)
    assert res.projected_grad == 0.0
    exempt = {n for n, p in model.named_parameters() if p.ndim == 1 and ("bias" in n or "layernorm" in n)}
    if rule is NO_DECAY:
        exempt.add("model.norm.weight")
    assert {n for n, _ in model.named_parameters() if not decays(n, rule)} == exempt
    for name, p in model.named_parameters():
        t0 = theta0[name]
        expected = t0 if name in exempt else t0 * (1 - lr * wd)  # a decayed weight shrinks by lr·wd
        # only the restore's rounding (a few u·(|θ| + 2ε|direction|)) remains: 1e-5 relative + 1e-7
        assert torch.allclose(p, expected, rtol=1e-5, atol=1e-7), name
        if name not in exempt:
            assert not torch.allclose(p, t0, rtol=1e-3, atol=0)


def test_mezo_seed_determinism(base):
    """(f) same seed, same result bit for bit; another seed moves the weights elsewhere."""
    runs = []
    for seed in (21, 21, 22):
        model, batch = fresh(base)
        res = mezo_step(model, causal_lm_loss, batch, seed, eps=EPS, lr=1e-3, weight_decay=0.1)
        runs.append((res, snapshot(model)))
    (r1, s1), (r2, s2), (r3, s3) = runs
    assert r1 == r2 and all(torch.equal(s1[n], s2[n]) for n in s1)
    assert r1.projected_grad != r3.projected_grad and not torch.equal(s1["lm_head.weight"], s3["lm_head.weight"])
    assert all(torch.equal(a, b) for a, b in zip(mezo_directions(base[0], 4).values(),
                                                 mezo_directions(base[0], 4).values()))


# ------------------------------------------------------------------------------------------------------ LoZO


def capture_plus(model):
    """A loss function that also records the weights of its first call (the θ + ε·direction pass)."""
    seen = {}

    def loss_fn(m, b):
        if not seen:
            seen.update({n: p.detach().clone() for n, p in m.named_parameters()})
        return causal_lm_loss(m, b)

    return loss_fn, seen


def test_lozo_keeps_v_for_nu_steps_and_u_is_fresh(base):
    """(e) v drawn on step 0, kept for steps 1..ν-1, renewed on step ν; u new every step; 1-D get full z."""
    model, batch = fresh(base)
    v: dict = {}
    kept, us = [], []
    for step in range(NU + 1):
        seed = 100 + step
        dirs = lozo_perturbation_directions(model, seed, step, v, rank=RANK, interval=NU)
        res = lozo_step(model, causal_lm_loss, batch, seed, step, v, rank=RANK, interval=NU, eps=EPS, lr=1e-3)
        assert res.refreshed == (step % NU == 0)
        assert all(torch.equal(v[n], d.v) for n, d in dirs.items() if isinstance(d, LowRank))
        kept.append({n: t.clone() for n, t in v.items()})
        us.append({n: d.u for n, d in dirs.items() if isinstance(d, LowRank)})
    matrices = [n for n, p in model.named_parameters() if p.ndim == 2]
    vectors = [n for n, p in model.named_parameters() if p.ndim == 1]
    assert sorted(kept[0]) == sorted(matrices)
    for n in matrices:
        assert kept[0][n].shape == (dict(model.named_parameters())[n].shape[1], RANK)
        assert torch.equal(kept[0][n], kept[1][n]) and torch.equal(kept[1][n], kept[2][n])
        assert not torch.allclose(kept[2][n], kept[3][n])
        assert all(not torch.allclose(us[i][n], us[i + 1][n]) for i in range(NU))
    dirs = lozo_perturbation_directions(model, 5, 1, kept[0], rank=RANK, interval=NU)
    assert all(not isinstance(dirs[n], LowRank) and dirs[n].shape == dict(model.named_parameters())[n].shape
               for n in vectors)


@pytest.mark.parametrize("step", [0, 1], ids=["refresh", "kept"])
def test_lozo_perturbation_is_rank_r(base, step):
    """(e) θ+ - θ0 = ε·u·vᵀ (rank <= r) per matrix, ε·z per vector; the update is along -g·u·vᵀ."""
    model, batch = fresh(base)
    v = {}
    if step:  # a v store as a previous refresh left it
        v = {n: d.v for n, d in lozo_perturbation_directions(model, 1, 0, {}, rank=RANK, interval=NU).items()
             if isinstance(d, LowRank)}
    theta0 = snapshot(model)
    dirs = lozo_perturbation_directions(model, 31, step, v, rank=RANK, interval=NU)
    loss_fn, plus = capture_plus(model)
    lr = 1e-3
    res = lozo_step(model, loss_fn, batch, 31, step, v, rank=RANK, interval=NU, eps=EPS, lr=lr)
    for name, p in model.named_parameters():
        t0 = theta0[name]
        direction = dirs[name].dense() if p.ndim == 2 else dirs[name]
        delta = plus[name] - t0
        assert ((delta - EPS * direction).abs() <= 2 * U * (t0.abs() + EPS * direction.abs())).all(), name
        tol = restore_bound(t0, direction) + U * t0.abs() + 4 * U * lr * abs(res.projected_grad) * direction.abs()
        assert ((p - (t0 - lr * res.projected_grad * direction)).abs() <= tol).all(), name
        if p.ndim == 2:
            s = torch.linalg.svdvals(delta.double())
            assert s[RANK - 1] > 1e-2 * s[0] and s[RANK] < 1e-4 * s[0], name
            s = torch.linalg.svdvals((p - t0).double())
            assert s[RANK] < 1e-3 * s[0], name


def test_lozo_refresh_stream_quirk(base):
    """On a refresh step the published update draws u from where the passes drew v; otherwise both agree."""
    seed, lr = 41, 1e-3
    results, params = {}, {}
    for mode in (CONSISTENT, PUBLISHED):
        model, batch = fresh(base)
        v = {}
        results[mode] = lozo_step(model, causal_lm_loss, batch, seed, 0, v, rank=RANK, interval=NU, eps=EPS,
                                  lr=lr, refresh_stream=mode)
        params[mode] = snapshot(model)
        updates = lozo_update_directions(model, seed, 0, v, rank=RANK, interval=NU, refresh_stream=mode)
        if mode == PUBLISHED:
            published_updates, published_v = updates, v
    assert results[CONSISTENT] == results[PUBLISHED]  # same measurement, different update
    model = base[0]
    perturbation = lozo_perturbation_directions(model, seed, 0, {}, rank=RANK, interval=NU)
    # The passes' stream on a refresh step, written out: reseed, then v (n, r) and u (m, r) per matrix.
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            assert torch.equal(perturbation[name].v, torch.randn(p.size(1), RANK))
            assert torch.equal(perturbation[name].u, torch.randn(p.size(0), RANK))
        else:
            assert torch.equal(perturbation[name], torch.normal(mean=0, std=1, size=p.size()))
    # The published update stream, written out: reseed, then u per matrix and z per vector, no v.
    torch.manual_seed(seed)
    g = results[PUBLISHED].projected_grad
    theta0 = snapshot(model)
    for name, p in model.named_parameters():
        measured = perturbation[name].dense() if p.ndim == 2 else perturbation[name]
        if p.ndim == 2:
            u = torch.randn(p.size(0), RANK)
            assert torch.equal(published_updates[name].u, u)
            assert torch.equal(published_updates[name].v, perturbation[name].v)  # v is the new one
            assert not torch.allclose(u, perturbation[name].u)  # but u is not the measured one
            direction = u @ published_v[name].t()
        else:
            direction = torch.normal(mean=0, std=1, size=p.size())
            assert torch.equal(published_updates[name], direction)
        t0 = theta0[name]
        tol = restore_bound(t0, measured) + U * t0.abs() + 4 * U * lr * abs(g) * direction.abs()
        assert ((params[PUBLISHED][name] - (t0 - lr * g * direction)).abs() <= tol).all(), name
    assert not torch.equal(params[CONSISTENT]["lm_head.weight"], params[PUBLISHED]["lm_head.weight"])
    # On a step that keeps v the two modes are the same step, bit for bit.
    v0 = {n: d.v for n, d in perturbation.items() if isinstance(d, LowRank)}
    after = {}
    for mode in (CONSISTENT, PUBLISHED):
        model, batch = fresh(base)
        lozo_step(model, causal_lm_loss, batch, seed, 1, dict(v0), rank=RANK, interval=NU, eps=EPS, lr=lr,
                  weight_decay=0.1, refresh_stream=mode)
        after[mode] = snapshot(model)
    assert all(torch.equal(after[CONSISTENT][n], after[PUBLISHED][n]) for n in after[CONSISTENT])


def test_lozo_seed_determinism(base):
    """(f) the same seeds and steps give the same weights, v and results, bit for bit."""
    runs = []
    for _ in range(2):
        model, batch = fresh(base)
        v: dict = {}
        results = [lozo_step(model, causal_lm_loss, batch, 200 + s, s, v, rank=RANK, interval=NU, eps=EPS,
                             lr=1e-3, weight_decay=0.1) for s in range(NU + 1)]
        runs.append((results, snapshot(model), v))
    (r1, s1, v1), (r2, s2, v2) = runs
    assert r1 == r2
    assert all(torch.equal(s1[n], s2[n]) for n in s1) and all(torch.equal(v1[n], v2[n]) for n in v1)


def test_lozo_rejects_missing_v_and_bad_mode(base):
    model, batch = fresh(base)
    with pytest.raises(KeyError, match="no kept v"):
        lozo_step(model, causal_lm_loss, batch, 1, 1, {}, rank=RANK, interval=NU, eps=EPS, lr=0.0)
    with pytest.raises(ValueError, match="refresh_stream"):
        lozo_step(model, causal_lm_loss, batch, 1, 0, {}, rank=RANK, interval=NU, eps=EPS, lr=0.0,
                  refresh_stream="other")
