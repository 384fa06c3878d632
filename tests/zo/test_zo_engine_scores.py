"""The ZO engine's stacked scoring (lopt.zo.engine / scoring): 2P evaluations in one forward equal 2P
separately perturbed models, on tiny fp32 Llama and Qwen2 (biases, tied embeddings), padded batches.

Tolerance: 1e-6 relative on a loss of ~4: the two paths differ only in summation order (the low-rank
term added after the base product instead of inside a materialised weight; SDPA vs the LoPT mask path)
and each fp32 op rounds at 6e-8; measured differences are ~1e-7.
"""

import dataclasses

import pytest
import torch
from zo_helpers import (
    candidate_log_probs_full,
    classification_batch,
    hf_loss,
    lm_batch,
    materialised_losses,
    tiny_model,
    with_weights,
)

from lopt.zo import ZOEngine, ZOSettings, candidate_log_probs

RTOL = 1e-6
EPS = 1e-2
RANK = {"lowrank": 3, "highrank": 8, "fullrank": None}


def engine_for(model, kind, directions=1, first_layer=0, **kw):
    settings = ZOSettings(kind=kind, eps=EPS, lr=1e-2, directions=directions, rank=RANK[kind],
                          interval=3, first_layer=first_layer, seed=5, **kw)
    return ZOEngine(model, settings, kernels=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["lowrank", "highrank", "fullrank"])
@pytest.mark.parametrize("directions,first_layer", [(1, 0), (3, 2)])
def test_stacked_scores_equal_separate_models(family, kind, directions, first_layer):
    model = tiny_model(family)
    engine = engine_for(model, kind, directions, first_layer)
    batch = lm_batch()
    perturbation = engine.draw(0)
    stacked = engine.scores(batch, perturbation)
    assert stacked.loss.shape == (2 * directions,) and stacked.accuracy is None
    assert int(stacked.count) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(stacked.loss.double(), materialised_losses(model, engine, perturbation, batch),
                               rtol=RTOL, atol=0)


@pytest.mark.parametrize("kind", ["lowrank", "highrank", "fullrank"])
def test_stacked_scores_after_updates(kind):
    """With an update under way (lowrank: A ≠ 0 and a weight-decay scale c ≠ 1) and K = L/2, P = 3."""
    model = tiny_model("llama")
    engine = engine_for(model, kind, 3, 2, weight_decay=0.5)
    for t in range(2):
        engine.step([lm_batch(seed=t)], t)
    if kind == "lowrank":
        assert engine.state.c[0] < 1 and float(engine.state.A[0].abs().max()) > 0
    batch = lm_batch(seed=9)
    perturbation = engine.draw(2)
    torch.testing.assert_close(engine.scores(batch, perturbation).loss.double(),
                               materialised_losses(model, engine, perturbation, batch), rtol=RTOL, atol=0)
    clean = engine.scores(batch)  # one group: the trained weights as they are
    weights = engine.trained_weights()
    assert clean.loss.shape == (1,)
    assert clean.loss.item() == pytest.approx(hf_loss(with_weights(model, weights), batch), rel=RTOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["lowrank", "fullrank"])
def test_classification_scores(family, kind):
    model = tiny_model(family)
    engine = engine_for(model, kind, 2, 2)
    batch = classification_batch()
    perturbation = engine.draw(0)
    stacked = engine.scores(batch, perturbation)
    assert int(stacked.count) == 4 and stacked.accuracy.shape == (4,)
    torch.testing.assert_close(stacked.loss.double(), materialised_losses(model, engine, perturbation, batch),
                               rtol=RTOL, atol=0)
    # the candidates' rows of the head = the full-vocabulary logits restricted to the candidates
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        last = out.hidden_states[-1][torch.arange(4), batch["last_index"]]  # after the final norm
        ours = candidate_log_probs(last, model.lm_head, batch["candidate_ids"])
    full = candidate_log_probs_full(out.logits.float(), batch)
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-6)
    clean = engine.scores(batch)
    assert clean.accuracy.item() == (full.argmax(1) == batch["label"]).float().mean().item()


@pytest.mark.parametrize("kind", ["lowrank", "highrank", "fullrank"])
def test_swapping_signs_negates_g(kind):
    """Negated directions (lowrank/highrank: -U; fullrank: -ε in the GEMM) swap each ± pair bit for bit."""
    model = tiny_model("llama")
    engine = engine_for(model, kind, 2, 1)
    batch = lm_batch()
    perturbation = engine.draw(0)
    g = engine.estimate([batch], perturbation)[0]
    if kind == "fullrank":
        object.__setattr__(engine.settings, "eps", -EPS)  # the GEMM's sign only: -ε z = -(ε z) exactly
        swapped = engine.scores(batch, perturbation).loss
        object.__setattr__(engine.settings, "eps", EPS)
    else:
        swapped = engine.scores(batch, dataclasses.replace(perturbation, u=[-u for u in perturbation.u])).loss
    plain = engine.scores(batch, perturbation).loss
    assert torch.equal(swapped, plain.view(-1, 2).flip(1).reshape(-1))
    g_swapped = (swapped[0::2] - swapped[1::2]) / (2 * EPS)
    assert torch.equal(g_swapped, -g)


@pytest.mark.parametrize("kind", ["lowrank", "fullrank"])
def test_accumulation_is_token_weighted(kind):
    """Two micro-batches with 17 and 9 label tokens give the g of the one batch holding both (its loss is
    the mean over all 26 tokens), not the mean of the two micro-batches' g."""
    model = tiny_model("qwen2")
    engine = engine_for(model, kind, 2, 2)
    first, second = lm_batch(2, 10, seed=1, lengths=[10, 9]), lm_batch(2, 10, seed=2, lengths=[6, 5])
    both = {k: torch.cat([first[k], second[k]]) for k in first}
    perturbation = engine.draw(0)
    g_accumulated, *_, count = engine.estimate([first, second], perturbation)
    g_big = engine.estimate([both], perturbation)[0]
    assert int(count) == 26
    torch.testing.assert_close(g_accumulated, g_big, rtol=1e-4, atol=4.0 * 2**-24 * 4.2 / EPS)
    mean_of_means = (engine.estimate([first], perturbation)[0] + engine.estimate([second], perturbation)[0]) / 2
    assert (mean_of_means - g_big).abs().max() > 10 * (g_accumulated - g_big).abs().max()


def test_seed_stream():
    """``mix`` is Philox4x32-10's words 0 and 1 (``philox_randint4x``); direction p's seed does not depend
    on P; the low-rank draws are reproducible from the step alone."""
    from lopt_kernels import philox_randint4x

    from lopt.zo import direction_seeds
    from lopt.zo.directions import mix

    for key, counter in [(0, 0), (2**63 - 1, 2**40 + 5), (12345, 2**32)]:
        w = philox_randint4x(key, torch.tensor([counter]))
        assert mix(key, counter) == int(w[0]) | ((int(w[1]) & 0x7FFFFFFF) << 32)
    assert direction_seeds(7, 3, 4)[:2] == direction_seeds(7, 3, 2)
    assert len(set(direction_seeds(7, 3, 4) + direction_seeds(7, 4, 4))) == 8
    first, second = (engine_for(tiny_model("llama"), "highrank", 2).draw(5) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.u + first.v, second.u + second.v))
