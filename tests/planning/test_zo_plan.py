"""ZO's byte model (``lopt.planning.zo_memory``) against the bytes a ``ZOEngine.step`` allocates on the CPU, and
``lopt plan --method zo``.

The oracle is ``benchmarks.e2e.bytecount.ByteCounter`` (see tests/planning/test_plan.py): every storage an
operator returns, counted exactly until it dies. The engine runs with ``kernels=False`` (the PyTorch references:
Hugging Face's layer ops, ``grouped_lowrank_reference``, ``perturbed_linear_reference`` and
``apply_directions_reference_``), and the estimate is asked for those (``kernels=False``): it predicts the
references' own bytes, their workspaces included (the fullrank reference's materialised Z and Philox words, the
low-rank reference's fp32 copies for a 16-bit output). The GPU kernels' bytes (``kernels=True``, what the plan
uses) leave those workspaces out; the CPU cannot count them: the Triton interpreter keeps a kernel's arguments
alive in reference cycles until the garbage collector runs, and the byte counter does not see inside a custom op
(the fused head), so that path is derived from the kernels' code, not counted here.

Each case counts one step (lowrank after a warm-up step, with ``interval=1``: the counted step folds the update
and draws a new basis while the old one is alive, the lowrank step's largest draw), the whole step and each of
its three windows (``draw``, the scoring ``scores`` and ``update``). Measured on the grid and the extra cases: the
worst peak 0.009% under the count (184 bytes: the estimate leaves out the rotary ``inv_freq`` buffers and
scalars), the worst window 0.025% (204 bytes); the tolerance is 3%.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re

import pytest
import torch

from benchmarks.e2e.bytecount import ByteCounter, tensors_of
from lopt.errors import UsageError
from lopt.models.shapes import build_model, shipped_config, tiny_config
from lopt.planning.memory_model import GiB, model_shape
from lopt.planning.plan import add_plan_arguments, run_plan, usable_bytes, zo_plan
from lopt.planning.zo_memory import (
    PHILOX_REFERENCE_BYTES,
    ZOStepShape,
    estimate_zo_memory,
    layer_linears,
    linear_workspace,
)
from lopt.zo import ZOEngine, ZOSettings
from lopt_kernels.zo_matmul import zo_noise_like

PEAK_TOL = 0.03
VOCAB = 512
LAYERS = 4


# ---------------------------------------------------------------------------------------------- counting a step


def lm_batch(batch_size, seq_len, vocab, seed=0, padded=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padded:  # the last row ends 5 tokens early
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        mask[-1, seq_len - 5:] = 0
        batch.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    return batch


def classification_batch(batch_size, seq_len, vocab, candidates=3, seed=0):
    """Right-padded prompts (the last one 5 tokens short), the answer scored after each one's last token."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.full((batch_size,), seq_len)
    lengths[-1] = seq_len - 5
    return {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=gen),
            "attention_mask": (torch.arange(seq_len)[None] < lengths[:, None]).long(), "last_index": lengths - 1,
            "candidate_ids": torch.randint(0, vocab, (batch_size, candidates), generator=gen),
            "label": torch.randint(0, candidates, (batch_size,), generator=gen)}


def counted_step(engine, micro_batches):
    """Bytes of one ``engine.step`` (lowrank: after a warm-up step, which draws the first basis): the persistent
    bytes (weights, fp32 state, batches), the step's peak and the peak of each window (``draw``, ``scores``,
    ``update``), all with the persistent bytes."""
    if engine.settings.kind == "lowrank":
        engine.step(micro_batches)
    windows = {}
    with ByteCounter() as counter:
        counter.track(tensors_of(engine.model))
        state = engine.state
        counter.track(state.master + (state.A or []) + (state.V or []))
        for batch in micro_batches:
            counter.track(batch.values())
        persistent = counter.current

        def windowed(name, method):
            def run(*args, **kwargs):
                before, counter.peak = counter.peak, counter.current
                out = method(*args, **kwargs)
                windows[name] = max(windows.get(name, 0), counter.peak)
                counter.peak = max(before, counter.peak)
                return out
            return run

        for name in ("draw", "scores", "update"):
            setattr(engine, name, windowed(name, getattr(engine, name)))
        counter.reset_peak()
        engine.step(micro_batches)
    return persistent, counter.peak, windows


def run_case(family, dtype, kind, directions, first_layer, loss, *, batch_size=2, seq_len=32, hidden=64,
             layers=LAYERS, vocab=VOCAB, micro_batches=1, padded=None):
    """Count one step of a tiny model and estimate it; returns (counted, estimate)."""
    config = tiny_config(family, hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                         tie_word_embeddings=family == "qwen2")
    engine = ZOEngine(build_model(config, dtype=dtype),
                      ZOSettings(kind=kind, directions=directions, first_layer=first_layer, interval=1), kernels=False)
    if loss == "classification":
        padded = True
        batches = [classification_batch(batch_size, seq_len, vocab, seed=i) for i in range(micro_batches)]
        labels = None
    else:
        batches = [lm_batch(batch_size, seq_len, vocab, seed=i, padded=bool(padded)) for i in range(micro_batches)]
        labels = int((batches[0]["labels"][:, 1:] != -100).sum())
    counted = counted_step(engine, batches)
    est = estimate_zo_memory(config, seq_len=seq_len, batch_size=batch_size, kind=kind, directions=directions,
                             first_layer=first_layer, micro_batches=micro_batches, loss=loss, candidates=3,
                             label_tokens=labels, padded=bool(padded), dtype=dtype, kernels=False)
    return counted, est


def assert_matches(counted, est):
    persistent, peak, windows = counted
    assert est.persistent == pytest.approx(persistent, rel=0.001)
    assert est.peak == pytest.approx(peak, rel=PEAK_TOL), (est.peak_phase, est.phases)
    scoring = max(total for name, total in est.phases.items() if name.startswith("scoring"))
    for window, predicted in (("draw", est.phases["draw"]), ("scores", scoring), ("update", est.phases["update"])):
        assert predicted == pytest.approx(windows[window], rel=PEAK_TOL), (window, est.phases)
    assert sum(est.breakdown.values()) == est.peak


# Every kind x P in {1, 3} x K in {0, L/2} x fp32/bf16 x causal LM / classification, on Llama and Qwen2 (q/k/v
# biases, a tied head).
STEP_CASES = list(itertools.product(("llama", "qwen2"), (torch.float32, torch.bfloat16),
                                    ("lowrank", "highrank", "fullrank"), (1, 3), (0, LAYERS // 2),
                                    ("causal-lm", "classification")))


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}-P{c[3]}-K{c[4]}-{c[5]}")
def test_zo_step_peak_matches_counted_bytes(case):
    assert_matches(*run_case(*case))


EXTRA_CASES = [  # where another phase or part is the peak, and the settings the grid leaves at one value
    ("the head (V = 4096) is the peak", ("llama", torch.bfloat16, "lowrank", 1, 0, "causal-lm"),
     dict(vocab=4096), "scoring: head"),
    ("the head, padded, fp32", ("qwen2", torch.float32, "highrank", 2, 2, "causal-lm"),
     dict(vocab=4096, padded=True), "scoring: head"),
    ("highrank's update (P = 4) is the peak", ("llama", torch.float32, "highrank", 4, 0, "causal-lm"),
     dict(batch_size=1, seq_len=8), "update"),
    ("fullrank's reference update is the peak", ("llama", torch.bfloat16, "fullrank", 1, 0, "causal-lm"),
     dict(batch_size=1, seq_len=8, hidden=128), "update"),
    ("three micro-batches, 6 layers, K = 3", ("llama", torch.float32, "fullrank", 2, 3, "classification"),
     dict(layers=6, micro_batches=3), None),
    ("Qwen3's q/k norms", ("qwen3", torch.bfloat16, "lowrank", 2, 1, "causal-lm"), dict(padded=True), None),
    ("a wider model and batch", ("llama", torch.bfloat16, "lowrank", 1, 0, "causal-lm"),
     dict(batch_size=8, seq_len=64, hidden=128), None),
]


@pytest.mark.parametrize("why, case, options, peak_phase", EXTRA_CASES, ids=[c[0] for c in EXTRA_CASES])
def test_zo_step_peak_matches_counted_bytes_elsewhere(why, case, options, peak_phase):
    counted, est = run_case(*case, **options)
    assert_matches(counted, est)
    if peak_phase is not None:
        assert est.peak_phase == peak_phase


def test_philox_reference_bytes_per_element():
    """The fullrank reference's noise: the fp32 Z it returns and, while it runs, the Philox words of a chunk."""
    for shape in ((160, 64), (1000, 3)):
        with ByteCounter() as counter:
            z = zo_noise_like(7, shape, 11)
        n = z.numel()
        assert counter.peak == 4 * n + PHILOX_REFERENCE_BYTES * n


def test_kernels_drop_the_references_workspace():
    """With the kernels (the plan's default) a trained linear holds nothing beyond its output (lowrank's εU and
    stacked U aside) and the fullrank update nothing at all; the persistent bytes do not depend on the path."""
    config = shipped_config("llama-3.2-1b")
    shape = model_shape(config)
    for kind in ("lowrank", "highrank", "fullrank"):
        on, off = (estimate_zo_memory(config, seq_len=512, batch_size=4, kind=kind, kernels=k) for k in (True, False))
        assert on.persistent == off.persistent and on.peak < off.peak
        st = ZOStepShape(batch_size=4, seq_len=512, kind=kind, directions=1, rank=on.settings["rank"], first_layer=0,
                         micro_batches=1, loss="causal-lm", candidates=2, label_tokens=4 * 511, padded=False, s=2,
                         kernels=True)
        for lin in layer_linears(shape):  # lowrank: εU, A ± εU and their stack while U is made, 5·P·N·r fp32
            expected = 5 * 4 * lin.out * st.rank if kind == "lowrank" else 0
            assert linear_workspace(st, lin, st.rows, trained=True) == expected
    fullrank = estimate_zo_memory(config, seq_len=512, batch_size=4, kind="fullrank")
    assert fullrank.phases["update"] == fullrank.persistent  # Z is regenerated in the kernel, never stored


# ---------------------------------------------------------------------------------------------- what the model says


def test_fp32_masters_for_every_kind_of_a_16bit_model():
    """A bf16 model keeps an fp32 master of each trained linear (``TrainedState``), lowrank included; an fp32
    model's weights are their own masters."""
    config = shipped_config("llama-3.1-8b-instruct")
    shape = model_shape(config)
    per_layer = sum(lin.numel for lin in layer_linears(shape))
    for kind in ("lowrank", "highrank", "fullrank"):
        est = estimate_zo_memory(config, seq_len=128, batch_size=1, kind=kind, first_layer=16)
        assert est.breakdown["fp32 masters"] == 4 * 16 * per_layer
        assert "fp32 masters" not in estimate_zo_memory(config, seq_len=128, batch_size=1, kind=kind,
                                                        dtype=torch.float32).breakdown
    assert per_layer * 4 * 32 / GiB == pytest.approx(26.0, abs=0.01)  # 8B: 26 GiB of masters with every layer


def test_plan_takes_the_largest_micro_batch_then_the_most_directions():
    config = shipped_config("qwen2.5-0.5b")
    result = zo_plan(config, 8, 1024)
    assert result.fits and result.estimate.peak <= usable_bytes(8)
    budget, E = usable_bytes(8), result.batch_size * result.grad_accum

    def peak(b, p):
        return estimate_zo_memory(config, seq_len=1024, batch_size=b, directions=p, micro_batches=E // b,
                                  padded=True).peak

    assert result.estimate.peak == peak(result.batch_size, result.directions)
    larger = [b for b in range(result.batch_size + 1, E + 1) if E % b == 0]
    assert all(peak(b, 1) > budget for b in larger)  # no larger micro-batch fits
    if result.directions < 16:
        assert peak(result.batch_size, result.directions + 1) > budget  # nor more directions with it
    fixed = zo_plan(config, 8, 1024, directions=2)
    assert fixed.directions == 2 and fixed.batch_size <= result.batch_size


# ---------------------------------------------------------------------------------------------- Llama-3.1-8B


def test_llama_8b_bf16_on_24_and_16_gb():
    """Llama-3.1-8B in bf16: its weights take 14.96 GiB, and the fp32 masters of the trained linears 0.81 GiB per
    layer. On 24 GB (21.0 GiB usable) training every layer does not fit; from layer 25 up it does (16 sequences of
    1024: micro-batch 1, one direction at K = 25; micro-batch 8 at K = 27). On 16 GB (13.8 GiB usable) the
    weights alone do not fit: no setting does."""
    config = shipped_config("llama-3.1-8b-instruct")
    every_layer = zo_plan(config, 24, 1024)
    assert not every_layer.fits
    assert every_layer.estimate.breakdown["fp32 masters"] / GiB == pytest.approx(26.0, abs=0.01)
    lowest = zo_plan(config, 24, 1024, first_layer=25)
    assert lowest.fits and not zo_plan(config, 24, 1024, first_layer=24).fits
    assert (lowest.batch_size, lowest.grad_accum, lowest.directions) == (1, 16, 1)
    upper = zo_plan(config, 24, 1024, first_layer=27)
    assert upper.fits and (upper.batch_size, upper.grad_accum, upper.directions) == (8, 2, 1)
    assert upper.estimate.peak <= usable_bytes(24)
    sentiment = zo_plan(config, 24, 128, examples_per_step=16, loss="classification", first_layer=27)
    assert sentiment.fits and (sentiment.batch_size, sentiment.directions) == (16, 4)
    for plan_16 in (zo_plan(config, 16, 1024, first_layer=31), zo_plan(config, 16, 128, first_layer=31,
                                                                      loss="classification")):
        assert not plan_16.fits
    assert plan_16.estimate.weights > usable_bytes(16)


# ---------------------------------------------------------------------------------------------- lopt plan --method zo


def parse(*flags):
    return add_plan_arguments(argparse.ArgumentParser()).parse_args(list(flags))


def test_plan_cli_method_zo(capsys):
    base = ["--model", "llama-3.1-8b-instruct", "--gpu-mem", "24", "--seq-len", "1024", "--method", "zo"]
    assert run_plan(parse(*base)) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "with --zo-first-layer 25 a setting fits" in out and "fp32 masters" in out
    assert run_plan(parse(*base, "--zo-first-layer", "27")) == 0
    out = capsys.readouterr().out
    command = next(line for line in out.splitlines() if line.startswith("lopt train"))
    assert command == ("lopt train --model CHECKPOINT --method zo --seq-len 1024 --batch-size 8 --grad-accum 2 "
                       "--zo-kind lowrank --zo-directions 1 --zo-rank 2 --zo-first-layer 27")
    for needle in ("predicted peak", "stacked activations", "scoring: trained layers", "other settings that fit"):
        assert needle in out, needle
    assert run_plan(parse(*base, "--zo-first-layer", "27", "--zo-kind", "highrank", "--zo-directions", "2",
                          "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["method"], data["kind"], data["rank"], data["directions"]) == ("zo", "highrank", 128, 2)
    assert data["estimate"]["peak"] <= usable_bytes(24) and data["estimate"]["factors"] > 0
    assert run_plan(parse(*base[:3], "16", *base[4:])) == 1
    assert "no --zo-first-layer fits" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--zo-kind", "highrank"], "--zo-kind is a setting of --method zo: add --method zo or leave it out"),
    (["--zo-loss", "classification"], "--zo-loss is a setting of --method zo"),
    (["--method", "zo", "--optimizer", "adamw"], "--optimizer is a setting of --method lopt"),
    (["--method", "zo", "--num-blocks", "4"], "--num-blocks is a setting of --method lopt"),
    (["--method", "zo", "--zo-first-layer", "4"], "--zo-first-layer must be a layer of the model, 0 to 3, got 4"),
    (["--method", "zo", "--zo-rank", "1000"], "--zo-rank must be at most the narrowest trained layer's width"),
    (["--method", "zo", "--zo-directions", "0"], "--zo-directions must be an integer"),
])
def test_plan_cli_refuses_what_zo_cannot_plan(flags, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        run_plan(parse("--model", "tiny", "--gpu-mem", "8", *flags))
