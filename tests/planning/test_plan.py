"""The memory planner's arithmetic against bytes counted on the CPU.

The oracle is ``benchmarks.e2e.bytecount``: ``ByteCounter`` registers the storage of every tensor an
operator returns (the autograd engine's backward included) and drops it when the storage dies, so its
``current``/``peak`` are what a caching-free allocator would report, in exact bytes;
``saved_tensor_bytes`` counts the distinct storages autograd saves for backward.

Tolerances, and why they are tight: the planner counts the same tensors the ops allocate, byte for
byte, so on the CPU its terms come out exact or within a few hundred bytes (int64 scalars, the loss).
The activation and optimizer terms must agree within 1%, a whole step's peak within 3%; a formula
that misses one ``[N, h]`` tensor in a layer, or the wrong recomputation mode, fails them
(``test_wrong_mode_is_detected`` shows the margin). The CPU runs SDPA through its flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``: no ``T^2`` tensor, like CUDA's flash path), which the
tests assert, so the attention term is the one the GPU uses. What the CPU cannot check: the CUDA
caching allocator's rounding and fragmentation (the plan's safety margin), cuBLAS workspaces, and the
Triton head / decoder kernels' buffers (their activation terms are checked here through the Triton
interpreter; the full-step peak with kernels is measured on the GPU by the benchmark harness).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest
import torch

from benchmarks.e2e.bytecount import ByteCounter, saved_tensor_bytes, tensors_of, unique_bytes
from benchmarks.schedule_memory import measure_windows
from lopt import LoPTModel
from lopt.models.shapes import build_model, shipped_config, tiny_config
from lopt_kernels import current_backend
from lopt.planning.memory_model import (
    GiB,
    estimate_memory,
    input_saved_per_layer,
    model_shape,
    optimizer_state_bytes,
    saved_per_layer,
)
from lopt.engine.model import split_layers
from lopt.training.optim import build_optimizer
from lopt.planning.plan import add_plan_arguments, apply_recipe, plan, run_plan, step_time, usable_bytes

ACT_TOL = 0.01
PEAK_TOL = 0.03


# ---------------------------------------------------------------------------------------------- shipped configs

PUBLISHED = {  # parameters of the released checkpoints, as their model cards state, and whether the head is tied
    "qwen2.5-0.5b": (0.49e9, True),
    "llama-3.2-1b": (1.24e9, True),
    "qwen2.5-1.5b": (1.54e9, True),
    "llama-3.2-3b": (3.21e9, True),
    "qwen3-4b": (4.02e9, True),  # the paper's models from here on
    "qwen2.5-7b-instruct": (7.61e9, False),
    "llama-3.1-8b-instruct": (8.03e9, False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_config_builds_with_published_size(name):
    from transformers import AutoModelForCausalLM

    published, tied = PUBLISHED[name]
    config = shipped_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # transformers 5.0 leaves a meta-device model untied until asked
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(published, rel=0.01), count
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    shape = model_shape(config)
    assert shape.total_params(1) == count  # one block is plain fine-tuning: a tied head stays tied
    # Two or more blocks untie a tied head: one more V x h matrix (and a decoder per lower block)
    head = config.vocab_size * config.hidden_size if tied else 0
    assert shape.total_params(2) == count + head + shape.decoder_params
    assert shape.total_params(1, untie=True) == count + head


@pytest.mark.parametrize("name,factor", [("llama-3.2-1b", 32.0), ("llama-3.1-8b-instruct", 8.0)])
def test_llama_rope_scaling_is_llama3(name, factor):
    config = shipped_config(name)
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == factor


# ---------------------------------------------------------------------------------------------- activations


def _wrapped(family, dtype, recompute, *, layers=4, num_blocks=2, hidden=64, vocab=256, kernels=False):
    config = tiny_config(family, hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab)
    model = build_model(config, dtype=dtype)
    return config, LoPTModel(model, num_blocks=num_blocks, recompute=recompute, kernels=kernels,
                             boundary_memory="torch")


def _block_forward_bytes(lm, block, batch_size, seq_len):
    """Bytes a block's forward leaves alive for its backward (its output excluded), counted, and the
    bytes of the distinct storages autograd saved (for the no-recompute cross-check)."""
    decoder = lm.model.model
    ids = torch.randint(0, lm.model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
    start, end = split_layers(len(decoder.layers), lm.num_blocks)[block]
    with ByteCounter() as counter:
        counter.track(tensors_of(lm))
        counter.track([ids, positions])
        hidden = decoder.embed_tokens(ids)
        if block > 0:  # later blocks start from the detached boundary tensor
            hidden = hidden.detach()
        with torch.no_grad():
            cos, sin = decoder.rotary_emb(hidden, positions)
        before = counter.current
        with saved_tensor_bytes(exclude=list(lm.parameters()) + [hidden], shared=[cos, sin]) as saved:
            out = hidden
            for layer in decoder.layers[start:end]:
                out = layer(out, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
                out = out[0] if isinstance(out, tuple) else out
        kept = counter.current - before - out.untyped_storage().nbytes()
        grad_fns = _grad_fn_names(out)
    return kept, saved.bytes, grad_fns


def _grad_fn_names(tensor):
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack += [f for f, _ in fn.next_functions]
    return names


def _predicted_block(config, dtype, recompute, block, batch_size, seq_len, num_blocks=2, kernels=False):
    est = estimate_memory(config, seq_len=seq_len, batch_size=batch_size, num_blocks=num_blocks,
                          recompute=recompute, dtype=dtype, kernels=kernels, optimizer="adamw")
    return est.activations_per_block[block]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_block_activations_match_counted_bytes(family, dtype, recompute):
    config, lm = _wrapped(family, dtype, recompute)
    for block in (0, 1):  # block 0 starts from the embeddings (they need a gradient), block 1 from a detached tensor
        kept, saved, grad_fns = _block_forward_bytes(lm, block, batch_size=2, seq_len=64)
        predicted = _predicted_block(config, dtype, recompute, block, batch_size=2, seq_len=64)
        assert predicted == pytest.approx(kept, rel=ACT_TOL), (block, predicted, kept)
        if recompute == "none":
            # what stayed alive is exactly what autograd saved: no stray references
            assert kept == saved
            assert any("FlashAttention" in name for name in grad_fns), grad_fns  # no T^2 attention path


def test_wrong_mode_is_detected():
    """The tolerance separates the modes: each mode's prediction misses the other modes' counts."""
    config, _ = _wrapped("llama", torch.bfloat16, "none")
    counted = {}
    for mode in ("none", "selective", "full"):
        _, lm = _wrapped("llama", torch.bfloat16, mode)
        counted[mode] = _block_forward_bytes(lm, 0, batch_size=2, seq_len=64)[0]
    for predicted_mode in counted:
        predicted = _predicted_block(config, torch.bfloat16, predicted_mode, 0, 2, 64)
        for mode, kept in counted.items():
            close = abs(predicted - kept) <= ACT_TOL * kept
            assert close == (mode == predicted_mode), (predicted_mode, mode, predicted, kept)


def test_block_activations_scale_with_tokens():
    config = tiny_config("llama", hidden_size=64, num_hidden_layers=4)
    shape = model_shape(config)
    small = _predicted_block(config, torch.bfloat16, "none", 0, batch_size=1, seq_len=512)
    large = _predicted_block(config, torch.bfloat16, "none", 0, batch_size=4, seq_len=512)
    assert large == 4 * small  # no T^2 term
    assert small == (2 * saved_per_layer(shape, 2, "none", kernels=False)
                     - input_saved_per_layer(shape, 2, "none", kernels=False)) * 512


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("qwen3", torch.float32)], ids=["llama-bf16", "qwen3-fp32"])
def test_fused_layer_activations_match_saved_bytes(family, dtype):
    """lopt_kernels.patch: fused RMSNorm / SwiGLU / RoPE save what the planner's kernels terms say
    (through the Triton interpreter on the CPU: the saved tensors are the same as on the GPU)."""
    import lopt_kernels

    if lopt_kernels.current_backend("cpu") != "triton":
        pytest.skip("the Triton backend (interpreter) is not active on the CPU")
    config = tiny_config(family, hidden_size=64, num_hidden_layers=2)
    model = build_model(config, dtype=dtype)
    lopt_kernels.patch(model)
    batch_size, seq_len = 2, 32
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
    x = torch.randn(batch_size, seq_len, 64, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(x, positions)
    with saved_tensor_bytes(exclude=list(model.parameters()) + [x], shared=[cos, sin]) as saved:
        out = x
        for layer in model.model.layers:
            out = layer(out, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    shape, s = model_shape(config), x.element_size()
    predicted = (2 * saved_per_layer(shape, s, "none", kernels=True)
                 - input_saved_per_layer(shape, s, "none", kernels=True)) * batch_size * seq_len
    assert saved.bytes == predicted


# ---------------------------------------------------------------------------------------------- parameters, optimizer


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-bf16", "torch-adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parameter_gradient_and_optimizer_bytes(optimizer, dtype):
    config, lm = _wrapped("qwen2", dtype, "none", num_blocks=3, layers=6)
    groups = lm.param_groups(1e-3)
    opt = torch.optim.AdamW(groups, foreach=False) if optimizer == "torch-adamw" else build_optimizer(optimizer, groups)
    batch = {"input_ids": torch.randint(0, 256, (2, 16))}
    lm.train_step(batch)
    grads = sum(p.grad.untyped_storage().nbytes() for p in lm.parameters())
    opt.step()
    state = sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    params = sum(p.untyped_storage().nbytes() for p in lm.parameters())
    est = estimate_memory(config, seq_len=16, batch_size=2, num_blocks=3, optimizer=optimizer, dtype=dtype,
                          kernels=False)
    assert est.parameters == params
    assert est.gradients == grads
    assert est.optimizer_state == pytest.approx(state, rel=ACT_TOL)
    assert est.persistent == est.parameters + est.optimizer_state


def test_8bit_state_arithmetic():
    # bitsandbytes' block-wise 8-bit moments: 1 byte + an fp32 absmax per 256 values, each; small tensors 32-bit
    assert optimizer_state_bytes("adamw-8bit", [4096], 2) == 2 * (4096 + 4 * 16)
    assert optimizer_state_bytes("adamw-8bit", [100], 2) == 800
    assert optimizer_state_bytes("adamw", [10], 2) == 120 and optimizer_state_bytes("adamw", [10], 4) == 80


# ---------------------------------------------------------------------------------------------- a whole step


def _measured_step(lm, optimizer_name, batch, grad_accum=1, early=False):
    """Peak bytes of one optimizer step (train_step per micro-batch + optimizer), after two warm-up steps."""
    groups = lm.param_groups(1e-3)
    make = (lambda g: torch.optim.AdamW(g, foreach=False)) if optimizer_name == "torch-adamw" else (
        lambda g: build_optimizer(optimizer_name, g))
    if early:  # one optimizer per lower block, stepped at its boundary (as lopt.train does)
        optimizers = [make(g) for g in lm.block_param_groups(1e-3)]
    else:
        optimizers = [make(groups)]

    def on_boundary(b):
        optimizers[b].step()
        optimizers[b].zero_grad(set_to_none=True)

    def step():
        for _ in range(grad_accum):
            lm.train_step(batch, on_boundary=on_boundary if early else None)
        optimizers[-1].step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    step()
    step()
    with ByteCounter() as counter:
        counter.track(tensors_of(lm))
        for opt in optimizers:
            counter.track(tensors_of(optimizer=opt))
        counter.track(batch.values())
        persistent = counter.current
        counter.reset_peak()
        step()
    return persistent, counter.peak


STEP_CASES = [
    # family, dtype, num_blocks, recompute, optimizer, grad_accum, early_lower_step, batch, seq
    ("llama", torch.float32, 2, "none", "adamw", 1, False, 2, 64),
    ("llama", torch.bfloat16, 2, "none", "adamw", 1, False, 2, 128),
    ("qwen2", torch.bfloat16, 3, "selective", "adamw-bf16", 1, False, 2, 64),
    ("qwen3", torch.float32, 2, "full", "torch-adamw", 1, False, 2, 64),
    ("llama", torch.bfloat16, 1, "none", "adamw", 1, False, 2, 64),
    ("llama", torch.float32, 2, "none", "adamw", 2, False, 2, 64),
    ("llama", torch.bfloat16, 3, "none", "adamw", 1, True, 2, 64),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-{c[3]}-{c[4]}-acc{c[5]}-early{int(c[6])}".replace("torch.", ""))
def test_step_peak_matches_counted_bytes(case):
    family, dtype, k, recompute, optimizer, accum, early, batch_size, seq_len = case
    config, lm = _wrapped(family, dtype, recompute, layers=6, num_blocks=k, vocab=512)
    batch = {"input_ids": torch.randint(0, 512, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))}
    persistent, peak = _measured_step(lm, optimizer, batch, grad_accum=accum, early=early)
    est = estimate_memory(config, seq_len=seq_len, batch_size=batch_size, num_blocks=k, recompute=recompute,
                          optimizer=optimizer, kernels=False, dtype=dtype, grad_accum=accum,
                          early_lower_step=early, foreach=False,
                          fused_optimizer=current_backend("cpu") == "triton")  # the interpreted kernel
    assert est.persistent == pytest.approx(persistent, rel=ACT_TOL)
    assert est.peak == pytest.approx(peak, rel=PEAK_TOL), (est.peak_phase, est.phases)
    assert sum(est.breakdown.values()) == est.peak


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_a_tied_head_is_counted_once_at_one_block(num_blocks):
    """k = 1 keeps a tied head tied (one matrix, one gradient, one optimizer state); k = 2 unties it."""
    config = tiny_config("llama", hidden_size=64, num_hidden_layers=4, vocab_size=512, tie_word_embeddings=True)
    lm = LoPTModel(build_model(config), num_blocks=num_blocks, kernels=False, boundary_memory="torch")
    assert model_shape(config).total_params(num_blocks) == sum(p.numel() for p in lm.parameters())
    batch = {"input_ids": torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))}
    persistent, _ = _measured_step(lm, "adamw", batch)
    est = estimate_memory(config, seq_len=32, batch_size=2, num_blocks=num_blocks, recompute="none",
                          optimizer="adamw", kernels=False, dtype=torch.float32, foreach=False,
                          fused_optimizer=current_backend("cpu") == "triton")
    assert est.persistent == pytest.approx(persistent, rel=ACT_TOL)


# ---------------------------------------------------------------------------------------------- schedules and offload


def _predicted_windows(est, schedule, k):
    """The estimate's phases grouped as ``benchmarks.schedule_memory.measure_windows`` cuts the step."""
    if schedule == "interleaved":
        return {("block", 0): max(v for n, v in est.phases.items() if n != "optimizer step"),
                ("step", 0): est.phases["optimizer step"]}
    out = {}
    for b in range(k):
        if b < k - 1:
            out["block", b] = max(v for n, v in est.phases.items() if n.startswith(f"block {b} ") and "step" not in n)
            out["step", b] = max(v for n, v in est.phases.items() if n.startswith(f"block {b} step"))
        else:
            out["block", b] = max(v for n, v in est.phases.items() if n.startswith(("last block", "head backward")))
            out["step", b] = est.phases["optimizer step"]
    return out


LAYOUT_CASES = [
    # family, dtype, num_blocks, recompute, optimizer, micro-batches, schedule, offload, stream_state
    ("llama", torch.float32, 2, "none", "adamw", 2, "interleaved", "none", False),
    ("llama", torch.float32, 2, "none", "adamw", 2, "sequential", "none", False),
    ("llama", torch.float32, 3, "full", "torch-adamw", 2, "sequential", "optimizer", False),
    ("qwen3", torch.bfloat16, 3, "none", "adamw", 2, "sequential", "params", False),
    ("llama", torch.bfloat16, 3, "selective", "adamw-bf16", 1, "sequential", "params", False),
    ("llama", torch.bfloat16, 3, "none", "adamw", 2, "sequential", "params", True),
    ("qwen2", torch.float32, 2, "none", "torch-adamw", 1, "sequential", "optimizer", True),
    # many micro-batches, small activations: the stash is a large part of each block's peak
    ("llama", torch.float32, 3, "full", "adamw", 8, "sequential", "none", False),
]


def _layout_model(family, dtype, k, recompute):
    return _wrapped(family, dtype, recompute, layers=6, num_blocks=k, vocab=512)


def _micro(n, batch_size=2, seq_len=64):
    return [{"input_ids": torch.randint(0, 512, (batch_size, seq_len), generator=torch.Generator().manual_seed(i))}
            for i in range(n)]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-k{c[2]}-{c[3]}-{c[4]}-m{c[5]}-"
                                                            f"{c[6]}-{c[7]}{'-stream' if c[8] else ''}")
def test_schedule_and_offload_match_counted_bytes_phase_by_phase(case, monkeypatch):
    """Device bytes in each window of the step (all counted storages minus the offload's host buffers), host
    bytes and bytes moved, against the estimate."""
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")  # the reference step: its temporaries are tensors
    family, dtype, k, recompute, optimizer, micro_batches, schedule, offload, stream = case
    config, lm = _layout_model(family, dtype, k, recompute)
    counted = measure_windows(lm, optimizer, _micro(micro_batches), schedule, offload, stream)
    windows = counted["windows"]
    est = estimate_memory(config, seq_len=64, batch_size=2, num_blocks=k, recompute=recompute, optimizer=optimizer,
                          kernels=False, dtype=dtype, grad_accum=micro_batches, foreach=False, fused_optimizer=False,
                          schedule=schedule, offload=offload, stream_state=stream)
    predicted = _predicted_windows(est, schedule, k)
    assert predicted.keys() == windows.keys()
    for window, peak in windows.items():
        assert predicted[window] == pytest.approx(peak, rel=PEAK_TOL), (window, est.phases)
    assert est.peak == pytest.approx(max(windows.values()), rel=PEAK_TOL)
    assert est.persistent == pytest.approx(counted["before"], rel=ACT_TOL)
    assert est.host == pytest.approx(counted["host"], rel=ACT_TOL) and (counted["host"] > 0) == (offload != "none")
    assert est.transfer == pytest.approx(counted["moved"], rel=ACT_TOL)
    assert (counted["moved"] > 0) == (offload != "none")


def test_sequential_params_offload_peak_is_one_blocks_share(monkeypatch):
    """Under params offload the device holds at most the largest block's weights, gradients, optimizer state
    and step temporaries, plus the largest activation working set and the stash (every micro-batch's
    boundary tensors, block b's inputs and outputs) and the micro-batches' own tensors. The weights,
    gradients and state are taken from the tensors themselves. Without offload the same step exceeds that
    bound: it is the paging, not slack, that keeps the peak under it."""
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")
    k, M, batch_size, seq_len = 3, 2, 2, 64
    peaks = {}
    for offload in ("none", "params"):
        config, lm = _layout_model("llama", torch.bfloat16, k, "none")
        peaks[offload] = max(measure_windows(lm, "adamw", _micro(M), "sequential", offload)["windows"].values())
    optimizers = [build_optimizer("adamw", g) for g in lm.block_param_groups(1e-3)]
    lm.sequential_step(_micro(M), on_block_done=lambda b: optimizers[b].step())
    optimizers[-1].step()  # the state exists: measure each block's share from its tensors
    est = estimate_memory(config, seq_len=seq_len, batch_size=batch_size, num_blocks=k, optimizer="adamw",
                          kernels=False, dtype=torch.bfloat16, grad_accum=M, fused_optimizer=False,
                          schedule="sequential", offload="params")
    share = []
    for b, opt in enumerate(optimizers):
        params = [p for group in opt.param_groups for p in group["params"]]
        weights = sum(p.numel() * p.element_size() for p in params)
        state = sum(v.numel() * v.element_size() for p in params for v in opt.state[p].values() if torch.is_tensor(v))
        share.append(2 * weights + state + est.per_block[b]["step_temp"])  # weights, their gradients, state
    tokens, h, head_dim = M * batch_size * seq_len, config.hidden_size, config.head_dim
    stash = 2 * tokens * h * 2  # bf16 inputs and outputs of a middle block, every micro-batch
    inputs = tokens * (2 * 8 + 2 * 2 * head_dim)  # ids, labels, rotary cos/sin
    bound = max(share) + est.activation_peak + stash + inputs
    assert peaks["params"] <= bound < peaks["none"], (peaks, bound)


# ---------------------------------------------------------------------------------------------- the plan


def test_plan_prefers_speed_when_memory_is_ample_and_fits_budget():
    config = shipped_config("qwen2.5-0.5b")
    roomy = plan(config, 80, 2048)
    assert roomy.fits and roomy.recompute == "none" and roomy.batch_size == 8 and roomy.grad_accum == 1
    assert roomy.optimizer == "adamw" and not roomy.early_lower_step
    tight = plan(config, 12, 2048)
    assert tight.fits and tight.estimate.peak <= usable_bytes(12)
    assert tight.batch_size * tight.grad_accum == 8  # the same sequences per step, split differently
    assert (tight.recompute, tight.batch_size, tight.optimizer) != (roomy.recompute, roomy.batch_size, roomy.optimizer)


def test_plan_reports_when_nothing_fits():
    result = plan(shipped_config("llama-3.2-3b"), 4, 2048)
    assert not result.fits
    assert result.estimate.peak > usable_bytes(4)


def test_plan_kernels_shrink_the_head_and_layers():
    config = shipped_config("llama-3.2-1b")
    on = estimate_memory(config, seq_len=2048, batch_size=4, kernels=True)
    off = estimate_memory(config, seq_len=2048, batch_size=4, kernels=False)
    assert on.block_activations < off.block_activations
    assert on.head_peak < off.head_peak / 10  # no [N, V] logits
    assert on.peak < off.peak


def test_plan_cli_prints_table(capsys):
    parser = add_plan_arguments(argparse.ArgumentParser())
    status = run_plan(parser.parse_args(["--model", "llama-3.2-1b", "--gpu-mem", "24", "--seq-len", "2048"]))
    out = capsys.readouterr().out
    assert status == 0
    for needle in ("predicted peak", "parameters", "optimizer state", "activations",
                   "lopt train --model CHECKPOINT --seq-len 2048", "CHECKPOINT: a local Hugging Face directory"):
        assert needle in out
    status = run_plan(parser.parse_args(["--model", "qwen2.5-0.5b", "--recipe", "16gb", "--json"]))
    data = json.loads(capsys.readouterr().out)
    assert status == 0 and data["fits"] and data["estimate"]["peak"] <= usable_bytes(16)


def test_plan_reads_a_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": 1000}))
    parser = add_plan_arguments(argparse.ArgumentParser())
    assert run_plan(parser.parse_args(["--model", str(path), "--gpu-mem", "8", "--seq-len", "512"])) == 0
    assert "predicted peak" in capsys.readouterr().out


def test_apply_recipe_sets_the_plan_on_a_train_config():
    from lopt.config import TrainConfig

    config = TrainConfig(model="qwen2.5-0.5b", seq_len=2048, batch_size=8, grad_accum=1)
    applied = apply_recipe(config, "16gb")
    assert dataclasses.is_dataclass(applied) and applied is not config
    assert applied.batch_size * applied.grad_accum == 8
    expected = plan(shipped_config("qwen2.5-0.5b"), 16, 2048, examples_per_step=8)
    assert (applied.batch_size, applied.grad_accum, applied.recompute, applied.optimizer, applied.early_lower_step) == (
        expected.batch_size, expected.grad_accum, expected.recompute, expected.optimizer, expected.early_lower_step)
    assert applied.lr == config.lr and applied.seq_len == 2048  # nothing else changes
    # the embedded default model fits anything
    small = apply_recipe(TrainConfig(), gpu_mem=8)
    assert small.recompute == "none" and small.batch_size == TrainConfig().resolved().batch_size


def test_apply_recipe_raises_a_usage_error_when_nothing_fits():
    from lopt.config import TrainConfig
    from lopt.errors import UsageError

    with pytest.raises(UsageError, match="no setting fits"):
        apply_recipe(TrainConfig(model="llama-3.2-3b", seq_len=8192, batch_size=8), gpu_mem=4)


def test_offload_needs_the_sequential_schedule():
    config = tiny_config("llama", hidden_size=64, num_hidden_layers=4)
    with pytest.raises(ValueError, match="schedule='sequential'"):
        estimate_memory(config, seq_len=16, batch_size=1, offload="params")
    with pytest.raises(ValueError, match="stream_state"):
        estimate_memory(config, seq_len=16, batch_size=1, schedule="sequential", stream_state=True)
    with pytest.raises(ValueError, match="early_lower_step is for the interleaved"):
        estimate_memory(config, seq_len=16, batch_size=1, schedule="sequential", early_lower_step=True)
    parser = add_plan_arguments(argparse.ArgumentParser())
    from lopt.errors import UsageError

    with pytest.raises(UsageError, match="needs --schedule sequential"):
        run_plan(parser.parse_args(["--model", "tiny", "--gpu-mem", "8", "--schedule", "interleaved",
                                    "--offload", "params"]))
    with pytest.raises(UsageError, match="--pcie-bandwidth must be a finite number > 0"):
        run_plan(parser.parse_args(["--model", "tiny", "--gpu-mem", "8", "--pcie-bandwidth", "0"]))
    with pytest.raises(UsageError, match="--stream-state streams offloaded state"):
        run_plan(parser.parse_args(["--model", "tiny", "--gpu-mem", "8", "--offload", "none", "--stream-state"]))


def test_plan_offloads_only_when_nothing_else_fits():
    roomy = plan(shipped_config("qwen2.5-0.5b"), 80, 2048)
    assert (roomy.schedule, roomy.offload, roomy.stream_state) == ("interleaved", "none", False)
    config = shipped_config("llama-3.1-8b-instruct")
    on_device = plan(config, 24, 2048, offloads=("none",))
    assert not on_device.fits  # 8B parameters (16 GB in bf16) with gradients and state do not fit 24 GB
    paged = plan(config, 24, 2048)
    est = paged.estimate
    assert paged.fits and paged.schedule == "sequential" and paged.offload != "none"
    assert est.peak <= usable_bytes(24) < on_device.estimate.peak
    assert est.host >= est.optimizer_state and est.transfer >= 2 * est.optimizer_state
    assert "--schedule sequential --offload" in paged.train_flags()


def test_step_time_counts_flops_and_transfers():
    config = shipped_config("llama-3.2-1b")
    shape = model_shape(config)
    tokens = 8 * 2048
    est = estimate_memory(config, seq_len=2048, batch_size=1, grad_accum=8, schedule="sequential", offload="params")
    fast, slow = step_time(shape, est, tokens), step_time(shape, est, tokens, pcie_gb_s=2.5)
    matrices = shape.total_params(2) - shape.embed_params - shape.final_norm_params  # the embedding is a lookup
    assert fast.compute == pytest.approx(6 * matrices * tokens / 150e12)
    assert slow.transfer == pytest.approx(10 * fast.transfer) and fast.transfer == pytest.approx(est.transfer / 25e9)
    assert fast.compute <= fast.step < fast.compute + fast.transfer  # the transfers overlap the compute
    assert slow.step == pytest.approx(slow.transfer) and slow.step > 10 * slow.compute  # transfer-bound
    streamed = estimate_memory(config, seq_len=2048, batch_size=1, grad_accum=8, schedule="sequential",
                               offload="params", stream_state=True)
    assert streamed.peak < est.peak and step_time(shape, streamed, tokens).step > fast.step


def test_plan_cli_prints_host_memory_and_transfer_time(capsys):
    parser = add_plan_arguments(argparse.ArgumentParser())
    args = ["--model", "llama-3.1-8b-instruct", "--gpu-mem", "24", "--seq-len", "2048"]
    assert run_plan(parser.parse_args(args)) == 0
    out = capsys.readouterr().out
    for needle in ("schedule sequential, offload", "host memory needed", "25 GB/s host<->device", "150 TFLOP/s",
                   "--pcie-bandwidth", "moved per step", "--schedule sequential --offload"):
        assert needle in out, needle

    def transfer_seconds(text):
        return float(text.split("transfers ")[1].split(" s")[0])

    assert run_plan(parser.parse_args(args + ["--pcie-bandwidth", "5", "--offload", "params"])) in (0, 1)
    slow = capsys.readouterr().out
    assert transfer_seconds(slow) == pytest.approx(5 * transfer_seconds(out), rel=0.02)
    assert run_plan(parser.parse_args(args[:3] + ["16", "--seq-len", "2048"])) == 1
    assert "with --num-blocks 3 a setting fits" in capsys.readouterr().out


def test_gib_units():
    assert usable_bytes(24) == int(24 * GiB * 0.9) - int(0.6 * GiB)


# ---------------------------------------------------------------------------------------------- data parallel, sharded

SHARD_CASES = [(2, "adamw", torch.bfloat16), (4, "adamw", torch.bfloat16), (4, "adamw-bf16", torch.bfloat16),
               (2, "adamw", torch.float32)]


def _shardable_model(dtype, num_blocks=3):
    """Odd sizes: the vocabulary (777), the MLP width (138) and the k/v rows (36) do not split evenly over 4."""
    config = tiny_config("llama", hidden_size=72, num_hidden_layers=4, vocab_size=777, intermediate_size=138)
    return config, LoPTModel(build_model(config, dtype=dtype), num_blocks=num_blocks, kernels=False,
                             boundary_memory="torch")


def _units(lm):
    """The parameters ``lopt train --shard`` shards: the embeddings, each decoder layer, the norm and the head."""
    hf = lm.model
    return [p for unit in (hf.model.embed_tokens, *hf.model.layers, hf.model.norm, hf.lm_head)
            for p in unit.parameters()]


def _counted_resident(lm, ranks, state_per_value):
    """One rank's parameter bytes and the values its optimizer keeps state for, from ``lm``'s tensors: of each
    unit's parameter ``ceil(rows / ranks)`` rows, the aux decoders' whole."""
    sharded = {id(p) for p in _units(lm)}
    values = sum(-(-p.shape[0] // ranks) * p[0].numel() if id(p) in sharded else p.numel() for p in lm.parameters())
    size = next(lm.parameters()).element_size()
    return values * size, values * state_per_value


def _state_per_value(lm, optimizer):
    """Optimizer state bytes per parameter value, measured on the whole model after one step."""
    params = list(lm.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = build_optimizer(optimizer, lm.param_groups(1e-3))
    opt.step()
    state = sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0)
    for p in params:
        p.grad = None
    return state / sum(p.numel() for p in params)


@pytest.mark.parametrize("ranks,optimizer,dtype", SHARD_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_sharded_resident_bytes_match_the_shards_of_the_real_tensors(ranks, optimizer, dtype):
    """A rank's parameters, gradients and optimizer state under --shard against the model's own tensors."""
    config, lm = _shardable_model(dtype)
    params, state = _counted_resident(lm, ranks, _state_per_value(lm, optimizer))
    est = estimate_memory(config, seq_len=32, batch_size=2, num_blocks=3, optimizer=optimizer, dtype=dtype,
                          kernels=False, ranks=ranks, shard=True)
    assert est.parameters == pytest.approx(params, rel=ACT_TOL)
    assert est.gradients == pytest.approx(params, rel=ACT_TOL)  # the gradients are sharded as their parameters
    assert est.optimizer_state == pytest.approx(state, rel=ACT_TOL)
    assert est.persistent + est.gradients == pytest.approx(2 * params + state, rel=ACT_TOL)
    whole = sum(p.numel() * p.element_size() for p in lm.parameters())
    assert params < whole / ranks * 1.1  # the decoders are whole, the padding is a row per tensor


@pytest.mark.parametrize("ranks", [2, 4])
def test_shard_count_is_what_fsdp2_keeps_on_a_rank(ranks):
    """The count above is what FSDP2 holds: the model cut as ``lopt train --shard`` cuts it (``fully_shard`` per
    unit, the norm and head as one), one LoPT step and one optimizer step, on a fake process group of ``ranks``
    in this process (its collectives do nothing; the shards, gradients and states are real tensors)."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    config, lm = _shardable_model(torch.bfloat16)
    params, state = _counted_resident(lm, ranks, _state_per_value(lm, "adamw"))
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=ranks)
    try:
        mesh = init_device_mesh("cpu", (ranks,))
        hf = lm.model
        for unit in (hf.model.embed_tokens, *hf.model.layers):
            fully_shard(unit, mesh=mesh)
        fully_shard([hf.model.norm, hf.lm_head], mesh=mesh, reshard_after_forward=False)
        fully_shard(hf, mesh=mesh)
        hf._get_fsdp_state()._lazy_init()  # the root's first forward would; the engine calls the units
        opt = build_optimizer("adamw", lm.param_groups(1e-3))
        lm.train_step({"input_ids": torch.randint(0, 777, (2, 32), generator=torch.Generator().manual_seed(0))})

        def local(tensors):
            return unique_bytes(t.to_local() if hasattr(t, "to_local") else t for t in tensors)

        held = local(lm.parameters())
        grads = local(p.grad for p in lm.parameters())
        opt.step()
        states = local(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    finally:
        dist.destroy_process_group()
    assert (held, grads, states) == (params, params, state)
    est = estimate_memory(config, seq_len=32, batch_size=2, num_blocks=3, optimizer="adamw", kernels=False,
                          ranks=ranks, shard=True)
    assert (est.parameters, est.gradients, est.optimizer_state) == (held, grads, states)


def test_sharding_keeps_the_activations_and_shrinks_the_peak():
    """Activations are a rank's micro-batch's, as in one process; more ranks, smaller peak."""
    config = shipped_config("llama-3.2-1b")
    one = estimate_memory(config, seq_len=2048, batch_size=2)
    two, four = (estimate_memory(config, seq_len=2048, batch_size=2, ranks=n, shard=True) for n in (2, 4))
    for est in (two, four):
        assert est.activations_per_block == one.activations_per_block and est.head_peak == one.head_peak
        assert est.breakdown["gathered"] > 0  # full weights of the units in flight
    assert one.peak > two.peak > four.peak
    assert four.persistent < one.persistent / 3.5


def test_plain_data_parallel_holds_everything_and_a_copy_of_what_it_sums():
    """Each rank's step is one process's over its micro-batches, plus the gradient sums' copies: block 0's
    gradients while the last block runs (its sum started at the boundary), the last block's before the step."""
    config, lm = _shardable_model(torch.bfloat16, num_blocks=2)
    lower = sum(p.numel() * p.element_size() for g in lm.block_param_groups(0.0)[0] for p in g["params"])
    grads = sum(p.numel() * p.element_size() for p in lm.parameters())
    one, dp = (estimate_memory(config, seq_len=64, batch_size=2, kernels=False, ranks=n) for n in (1, 4))
    assert dp.persistent == one.persistent
    for name, peak in one.phases.items():
        in_flight = lower if name.startswith(("last block", "head")) else 0
        assert dp.phases[name] - peak == in_flight, name
    assert dp.phases["gradient sum before optimizer step"] - one.phases["optimizer step"] == grads - lower
    early = estimate_memory(config, seq_len=64, batch_size=2, kernels=False, ranks=4, early_lower_step=True)
    early_step = early.phases["block 0 early optimizer step"]
    assert early.phases["gradient sum before block 0 early optimizer step"] - early_step == lower


def test_plain_data_parallel_shares_the_micro_batches():
    config = shipped_config("qwen2.5-0.5b")
    one = plan(config, 24, 2048, tokens_per_step=65536, batch_sizes=(8,))
    four = plan(config, 24, 2048, tokens_per_step=65536, batch_sizes=(8,), nproc=4)
    assert four.tokens_per_step == one.tokens_per_step == 65536  # what was asked, shared out among the ranks
    assert (one.grad_accum, one.rank_micro_batches) == (4, 4) and (four.grad_accum, four.rank_micro_batches) == (4, 1)
    assert four.estimate.settings["grad_accum"] == 1  # a rank's memory: its one micro-batch, no accumulation
    assert four.command().startswith("torchrun --nproc-per-node 4 -m lopt train --model CHECKPOINT ")
    assert "--shard" not in four.command() and "4 ranks, plain data parallel" in four.describe()
    eight = plan(config, 24, 2048, tokens_per_step=65536, batch_sizes=(8,), nproc=8)
    assert "only 4 of the 8 ranks get a micro-batch" in eight.describe()
    assert eight.time.compute == pytest.approx(four.time.compute)  # the busiest rank's one micro-batch either way


def test_sharded_plan_prints_one_ranks_peak_and_a_torchrun_command(capsys):
    parser = add_plan_arguments(argparse.ArgumentParser())
    args = ["--model", "llama-3.1-8b-instruct", "--gpu-mem", "80", "--seq-len", "2048", "--nproc", "8", "--shard"]
    assert run_plan(parser.parse_args(args)) == 0
    out = capsys.readouterr().out
    command = next(line for line in out.splitlines() if line.startswith("torchrun"))
    assert command.startswith("torchrun --nproc-per-node 8 -m lopt train --model CHECKPOINT --seq-len 2048 ")
    assert command.endswith(" --shard")
    for needle in ("8 ranks, sharded (FSDP2)", "peak of memory_allocated on each rank", "all-gathered weights",
                   "this rank's 1/8 of parameters + optimizer state", "150 GB/s between ranks", "collectives"):
        assert needle in out, needle
    assert run_plan(parser.parse_args(args + ["--json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == command and data["nproc"] == 8 and data["shard"]
    assert data["tokens_per_step"] == 16384 and data["rank_micro_batches"] == 1
    config = shipped_config("llama-3.1-8b-instruct")
    expected = plan(config, 80, 2048, nproc=8, shard=True)
    assert data["estimate"]["peak"] == expected.estimate.peak <= usable_bytes(80)
    assert expected.optimizer == "adamw"  # one process's fp32 state for 8B (90 GiB) does not fit the card:
    assert not plan(config, 80, 2048, optimizers=("adamw",), offloads=("none",)).fits


@pytest.mark.parametrize("flags,message", [
    (["--shard"], "--shard splits the state over the ranks: it needs --nproc N with N >= 2, got --nproc 1"),
    (["--nproc", "0"], "--nproc must be an integer from 1 to 65536, got 0"),
    (["--nproc", "2", "--shard", "--schedule", "sequential"], "does not run with --schedule sequential"),
    (["--nproc", "2", "--shard", "--offload", "optimizer"], "does not run with --offload optimizer"),
    (["--nproc", "2", "--shard", "--optimizer", "adamw-8bit"], "does not run with --optimizer adamw-8bit"),
    (["--nproc", "2", "--shard", "--stream-state"], "does not run with --stream-state"),
    (["--nproc", "2", "--link-bandwidth", "0"], "--link-bandwidth must be a finite number > 0"),
    (["--nproc", "2", "--shard", "--num-blocks", "1", "--model", "qwen2.5-0.5b"], "whose head is its embedding"),
])
def test_plan_refuses_data_parallel_flags_it_cannot_plan(flags, message):
    from lopt.errors import UsageError

    parser = add_plan_arguments(argparse.ArgumentParser())
    with pytest.raises(UsageError, match=re.escape(message)) as refused:
        run_plan(parser.parse_args(["--model", "tiny", "--gpu-mem", "8", *flags]))
    assert "\n" not in str(refused.value)


def test_estimate_refuses_what_the_sharded_trainer_does_not_run():
    config = tiny_config("llama", hidden_size=64, num_hidden_layers=4)
    for kwargs, message in ((dict(ranks=1), "ranks must be"), (dict(schedule="sequential"), "--schedule sequential"),
                            (dict(optimizer="adamw-8bit"), "--optimizer adamw-8bit")):
        with pytest.raises(ValueError, match=re.escape(message)):
            estimate_memory(config, seq_len=16, batch_size=1, shard=True, **{"ranks": 2, **kwargs})
    with pytest.raises(ValueError, match="nproc >= 2"):
        plan(config, 8, 16, shard=True)


def test_step_time_counts_the_collectives():
    """Sharded: per micro-batch each unit's weights all-gathered twice and its gradients reduce-scattered once,
    overlapped with the compute; plain: one all-reduce of the gradients after the backward."""
    config = shipped_config("llama-3.2-1b")
    shape = model_shape(config)
    ranks, micro, tokens = 4, 2, 2 * 2048
    est = estimate_memory(config, seq_len=2048, batch_size=1, grad_accum=micro, ranks=ranks, shard=True)
    units = (shape.total_params(2) - shape.decoder_params) * 2  # bf16, whole
    assert est.link == pytest.approx(micro * 3 * units * (ranks - 1) / ranks, rel=ACT_TOL)  # ring: (R-1)/R each
    fast, slow = step_time(shape, est, tokens), step_time(shape, est, tokens, link_gb_s=1.0)
    assert fast.link == pytest.approx(est.link / 150e9) and fast.step == pytest.approx(max(fast.compute, fast.link))
    assert slow.step == pytest.approx(slow.link) and slow.link > slow.compute
    plain = estimate_memory(config, seq_len=2048, batch_size=1, grad_accum=micro, ranks=ranks)
    assert plain.link == pytest.approx(2 * plain.gradients * (ranks - 1) / ranks)
    timed = step_time(shape, plain, tokens)
    assert timed.step == pytest.approx(timed.compute + timed.link)


# ---------------------------------------------------------------------------------------------- pinned numbers

# What the byte model and the search said when ``estimate_memory`` and ``plan`` were cut into named pieces
# (the cut changed no number). A change here is a change of the model: say why, then update the row.
# Each estimate row: (peak, peak phase, sum of every phase's total, number of phases, host, transfer, link).
PINNED_ESTIMATES = [
    ("qwen3-4b", {}, (71203419136, "last block backward", 618100402688, 9, 0, 0, 0)),
    ("qwen3-4b", {"recompute": "selective", "kernels": False, "num_blocks": 4},
     (73626954240, "head backward", 1152822380032, 17, 0, 0, 0)),
    ("qwen3-4b", {"recompute": "full", "optimizer": "adamw-8bit", "grad_accum": 3},
     (27714743808, "head backward", 243417899520, 9, 0, 0, 0)),
    ("qwen3-4b", {"early_lower_step": True, "num_blocks": 3, "optimizer": "adamw-bf16", "fused_optimizer": False},
     (30137454080, "last block backward", 442369753088, 15, 0, 0, 0)),
    ("qwen3-4b", {"num_blocks": 1, "dtype": torch.float32, "padded": True, "optimizer": "torch-adamw",
                  "foreach": False},
     (68044318720, "head backward", 333023911936, 5, 0, 0, 0)),
    ("llama-3.1-8b-instruct", {"schedule": "sequential", "grad_accum": 4, "num_blocks": 4},
     (120840521728, "head backward (later micro-batches)", 2835031431168, 24, 0, 0, 0)),
    ("llama-3.1-8b-instruct", {"schedule": "sequential", "offload": "optimizer", "stream_state": True, "grad_accum": 2},
     (30464143360, "block 0 step", 375430019072, 14, 96463958016, 192927916032, 0)),
    ("llama-3.1-8b-instruct", {"schedule": "sequential", "offload": "params", "num_blocks": 4, "recompute": "full"},
     (36476010496, "block 0 end", 707480365056, 23, 112776538112, 225553076224, 0)),
    ("llama-3.1-8b-instruct", {"ranks": 4, "grad_accum": 2},
     (142436313088, "head backward", 1349974147072, 10, 0, 0, 24115989504)),
    ("llama-3.1-8b-instruct", {"ranks": 4, "num_blocks": 4},
     (140576716800, "last block backward", 2308712697856, 18, 0, 0, 24166401024)),
    ("llama-3.1-8b-instruct", {"ranks": 2, "shard": True, "num_blocks": 4, "grad_accum": 2},
     (70233456640, "head backward", 1147496357888, 17, 0, 0, 48181567488)),
    ("qwen2.5-0.5b", {"ranks": 3, "schedule": "sequential", "num_blocks": 3, "grad_accum": 2},
     (10367157888, "head backward (later micro-batches)", 212991400640, 22, 0, 0, 1682602837)),
]
# Each plan row: (batch_size, grad_accum, recompute, optimizer, early_lower_step, schedule, offload, stream_state,
# peak, step seconds); the optimizers searched are fixed (without bitsandbytes' adamw-8bit).
PINNED_PLANS = [
    (("llama-3.1-8b-instruct", 24, 2048, {}),
     (8, 1, "full", "adamw-bf16", False, "sequential", "params", True, 19242287104, 9.342899074498561)),
    (("llama-3.1-8b-instruct", 16, 2048, {"num_blocks": 4}),
     (4, 2, "selective", "adamw-bf16", False, "sequential", "params", True, 14114934784, 8.92643682091008)),
    (("qwen3-4b", 24, 4096, {"nproc": 4, "shard": True}),
     (1, 4, "none", "adamw-bf16", False, "interleaved", "none", False, 18354267648, 0.65957898747904)),
    (("qwen3-4b", 80, 1024, {"nproc": 2}),
     (8, 2, "none", "adamw-bf16", False, "interleaved", "none", False, 52759049472, 1.37802076663808)),
]


@pytest.mark.parametrize("name, settings, expected", PINNED_ESTIMATES)
def test_estimate_is_pinned(name, settings, expected):
    est = estimate_memory(shipped_config(name), seq_len=1024, batch_size=2, **settings)
    assert (est.peak, est.peak_phase, sum(est.phases.values()), len(est.phases), est.host, est.transfer,
            est.link) == expected
    assert sum(est.breakdown.values()) == est.peak


@pytest.mark.parametrize("args, expected", PINNED_PLANS)
def test_plan_is_pinned(args, expected):
    name, gpu_mem, seq_len, settings = args
    result = plan(shipped_config(name), gpu_mem, seq_len, optimizers=("adamw", "adamw-bf16"), **settings)
    assert result.fits
    got = (result.batch_size, result.grad_accum, result.recompute, result.optimizer, result.early_lower_step,
           result.schedule, result.offload, result.stream_state, result.estimate.peak)
    assert got == expected[:-1]
    assert result.time.step == pytest.approx(expected[-1], rel=1e-12)
