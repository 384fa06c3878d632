"""BoundaryMemory: what is released at the end of a lower block, what never is, on CPU and on the GPU.

The release rule is the same in both implementations ("torch": Python, "extension": csrc/), so the
CPU tests run it on CPU tensors through ``BoundaryMemory._block(keep, "cpu")`` (the public ``block``
is a no-op off CUDA). The GPU tests drive the public API in a minimal LoPT loop.
"""

import contextlib
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from lopt_kernels import boundary as boundary_module
from lopt_kernels.boundary import BoundaryMemory, release_saved_extension, release_saved_torch, resolve_mode
from lopt_kernels.extension import has_extension

ROOT = Path(__file__).resolve().parents[2]
IMPLS = ["torch", pytest.param("extension", marks=pytest.mark.skipif(not has_extension(), reason="lopt_kernels._C not built"))]
RELEASE = {"torch": release_saved_torch, "extension": release_saved_extension}


def cpu_scope(mode):
    memory = BoundaryMemory(mode, device="cpu")
    return memory, functools.partial(memory._block, device_type="cpu")


# ------------------------------------------------------------------ modes and the CPU no-op


def test_modes_resolve():
    assert resolve_mode("torch") == "torch"
    assert resolve_mode("auto") == ("extension" if has_extension() else "torch")
    assert BoundaryMemory("auto").mode in ("extension", "torch")
    with pytest.raises(ValueError, match="expected one of"):
        BoundaryMemory("arena")


def test_extension_mode_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(boundary_module, "has_extension", lambda: False)
    monkeypatch.setattr("lopt_kernels.extension._module", None)
    assert resolve_mode("auto") == "torch"
    with pytest.raises(RuntimeError, match="build_extension"):
        BoundaryMemory("extension")


def test_block_is_a_noop_on_cpu():
    memory = BoundaryMemory("auto", device="cpu")
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with memory.block(keep=[x]):
        h = lin(x).sin()
        loss = h.cos().sum()
        loss.backward(retain_graph=True)
    first = lin.weight.grad.clone()
    loss.backward()  # the retained graph is intact: nothing was released
    torch.testing.assert_close(lin.weight.grad, 2 * first)
    assert memory.released_bytes == 0


# ------------------------------------------------------------------ the release rule, on CPU tensors


@pytest.mark.parametrize("mode", IMPLS)
def test_leftover_graph_is_released_and_nothing_referenced_is(mode):
    memory, scope = cpu_scope(mode)
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(8, 64)
    held = {}
    with scope([x]):
        a = lin(x)
        held["view"] = a[:, :4]  # a view a caller keeps: `a` must survive
        b = a.sin()  # each sin saves its input
        c = b.sin()
        held["storage"] = c.untyped_storage()  # a storage object a caller keeps: `c` must survive
        d = c.sin()
        e = d.sin()
        out = e.sin()
        loss = out.square().mean()
        loss.backward(retain_graph=True)  # `loss` keeps the whole graph alive
        boundary = out.detach()
        copies = [t.clone() for t in (a, c, boundary)]
        del a, b, c, d, e, out
    grad = lin.weight.grad.clone()

    # b, d and e (reachable only through the graph) are released; everything else is whole.
    assert memory.released_bytes == 3 * 8 * 64 * 4
    a, c = held["view"]._base, torch.empty(0).set_(held["storage"]).view(8, 64)
    for kept, copy in zip((a, c, boundary), copies):
        assert torch.equal(kept, copy)
    assert x.untyped_storage().nbytes() == 8 * 64 * 4
    for p in lin.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * 4 and p.grad.untyped_storage().nbytes() == p.numel() * 4
    assert torch.equal(lin.weight.grad, grad)
    with pytest.raises(RuntimeError, match="released at the LoPT boundary"):
        loss.backward()


@pytest.mark.parametrize("mode", IMPLS)
def test_gradients_are_unchanged_by_the_block(mode):
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=777, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 777, (2, 37))

    def grads(scope):
        model.zero_grad()
        with scope():
            model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    memory, scope = cpu_scope(mode)
    for expected, got in zip(grads(contextlib.nullcontext), grads(lambda: scope([ids]))):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("mode", IMPLS)
def test_saved_tensor_a_caller_unpacked_is_kept(mode):
    memory, scope = cpu_scope(mode)
    x = torch.randn(16, requires_grad=True)
    with scope([x]):
        y = (x * 2).sin()
        saved = y.grad_fn._saved_self  # the caller now holds the saved tensor itself
        copy = saved.clone()
    assert memory.released_bytes == 0
    assert torch.equal(saved, copy)
    y.sum().backward()


@pytest.mark.parametrize("mode", IMPLS)
def test_release_checks_keep_and_resizability(mode):
    release = RELEASE[mode]
    only_in_graph = torch.randn(32)
    assert release([only_in_graph], [only_in_graph]) == ([False], 0)  # named in keep
    foreign = torch.from_numpy(np.ones(32, dtype=np.float32))  # memory torch does not own
    assert release([foreign], []) == ([False], 0)
    assert not foreign.untyped_storage().resizable() and foreign.untyped_storage().nbytes() == 128
    assert release([only_in_graph], []) == ([True], 128)
    assert only_in_graph.untyped_storage().nbytes() == 0


@pytest.mark.parametrize("mode", IMPLS)
def test_exception_in_block_releases_nothing_and_removes_the_hooks(mode):
    memory, scope = cpu_scope(mode)
    x = torch.randn(8, requires_grad=True)
    with pytest.raises(KeyError):
        with scope([x]):
            y = (x * 3).sin()
            raise KeyError("boom")
    y.sum().backward()  # the graph is intact
    assert x.sin().grad_fn._saved_self is x  # no saved-tensor hook left behind (it would hand back a detach)
    assert memory.released_bytes == 0


# ------------------------------------------------------------------ a minimal LoPT loop


def tiny_llama(device, seed=0, attn="eager"):
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(device)
    aux = nn.ModuleList(nn.Linear(64, 64) for _ in range(2)).to(device)  # one per lower block
    params = list(model.parameters()) + list(aux.parameters())
    return model, aux, torch.optim.AdamW(params, lr=1e-3)


def lopt_step(model, aux, optimizer, ids, scope, keep_graphs=None):
    """Lower blocks (layers 0 and 1) learn from a local reconstruction loss, the upper block from the task loss."""
    decoder = model.model
    seq_len = ids.shape[1]
    positions = torch.arange(seq_len, device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=ids.device).triu(1)
    causal = torch.zeros(1, 1, seq_len, seq_len, device=ids.device).masked_fill(future, torch.finfo(torch.float32).min)
    hidden = decoder.embed_tokens(ids)
    rope = decoder.rotary_emb(hidden, positions)

    def run(layer, h):
        out = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out

    for b in range(2):
        with scope(keep=[hidden]):
            out = run(decoder.layers[b], hidden)
            recon = F.mse_loss(aux[b](out), hidden.detach())
            recon.backward(retain_graph=keep_graphs is not None)
            if keep_graphs is not None:
                keep_graphs.append(recon)  # a caller keeping a loss and its graph
            hidden = out.detach()
    for layer in decoder.layers[2:]:
        hidden = run(layer, hidden)
    logits = model.lm_head(decoder.norm(hidden))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(device, mode, steps, max_len, check_memory=False):
    model, aux, optimizer = tiny_llama(device)
    if mode is None:
        scope = lambda keep: contextlib.nullcontext()  # noqa: E731
    elif device.type == "cuda":
        scope = BoundaryMemory(mode).block
    else:
        scope = cpu_scope(mode)[1]
    gen = torch.Generator().manual_seed(1)
    baseline = None
    for step in range(steps):
        seq_len = int(torch.randint(8, max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, 128, (2, seq_len), generator=gen).to(device)
        lopt_step(model, aux, optimizer, ids, scope)
        del ids
        if check_memory:
            allocated = torch.cuda.memory_allocated()
            if baseline is None:
                baseline = allocated  # after the first step: parameters + optimizer state
            assert allocated == baseline, f"step {step}: {allocated - baseline} bytes left allocated"
    return [p.detach().cpu() for p in list(model.parameters()) + list(aux.parameters())]


@pytest.mark.parametrize("mode", IMPLS)
def test_lopt_loop_on_cpu_matches_no_block(mode):
    device = torch.device("cpu")
    for expected, got in zip(train(device, None, 3, 24), train(device, mode, 3, 24)):
        assert torch.equal(expected, got)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_gpu_200_steps_identical_across_modes_and_no_leak():
    device = torch.device("cuda")
    modes = ["torch"] + (["extension"] if has_extension() else [])
    reference = train(device, None, 200, 256)
    for mode in modes:
        params = train(device, mode, 200, 256, check_memory=True)
        for expected, got in zip(reference, params):
            assert torch.equal(expected, got), mode


@pytest.mark.gpu
@pytest.mark.parametrize("mode", IMPLS)
def test_gpu_leftover_graph_memory_is_returned(mode):
    device = torch.device("cuda")
    model, aux, optimizer = tiny_llama(device)
    ids = torch.randint(0, 128, (4, 256), device=device)
    lopt_step(model, aux, optimizer, ids, lambda keep: contextlib.nullcontext())  # warm-up: optimizer state
    base = torch.cuda.memory_allocated()

    def held_after(scope):
        graphs = []
        lopt_step(model, aux, optimizer, ids, scope, keep_graphs=graphs)
        held = torch.cuda.memory_allocated() - base
        del graphs
        assert torch.cuda.memory_allocated() == base
        return held

    without = held_after(lambda keep: contextlib.nullcontext())
    memory = BoundaryMemory(mode)
    with_release = held_after(memory.block)
    assert memory.released_bytes > 0
    # What is still held is what the graph shares with the boundary tensors (the block outputs).
    assert without - with_release >= 0.95 * memory.released_bytes
    assert with_release < without / 2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", IMPLS)
def test_gpu_tensor_referenced_at_the_boundary_is_never_freed(mode):
    device = torch.device("cuda")
    model, aux, optimizer = tiny_llama(device)
    captured = []  # the MLP's input: saved by its projections, and now also referenced by the caller
    handle = model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: captured.append((args[0], args[0].clone())))
    ids = torch.randint(0, 128, (2, 128), device=device)
    memory = BoundaryMemory(mode)
    params = [p.detach().clone() for p in model.parameters()]
    graphs = []
    lopt_step(model, aux, optimizer, ids, memory.block, keep_graphs=graphs)
    handle.remove()
    assert memory.released_bytes > 0  # the release ran (on block 1, the last lower block)
    mlp_input, copy = captured[0]
    assert mlp_input.untyped_storage().nbytes() > 0 and torch.equal(mlp_input, copy)
    for p in model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    assert any(not torch.equal(a, b) for a, b in zip(params, model.parameters()))  # the step did train


@pytest.mark.gpu
@pytest.mark.parametrize("mode", IMPLS)
def test_gpu_release_waits_for_a_side_stream_still_reading(mode):
    n, rounds = 2048, 30
    torch.manual_seed(0)
    x = torch.randn(n, n, device="cuda", requires_grad=True)
    w = (torch.randn(n, n, device="cuda") / n**0.5).requires_grad_()

    def chain(a):
        acc = a
        for _ in range(rounds):
            acc = (acc @ w).tanh() * a  # every round reads `a`
        return acc

    expected = chain(x.detach().sin()).detach()
    memory, side = BoundaryMemory(mode), torch.cuda.Stream()
    with memory.block(keep=[x]):
        a = x.sin()  # allocated on the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = chain(a)  # queued on the side stream; its graph stays alive through `result`
        del a
    # The release happened while the side stream may still be reading `a`: new allocations on the
    # default stream must not get its memory before that work is done.
    garbage = [torch.full((n, n), float("nan"), device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    assert memory.released_bytes >= n * n * 4
    torch.testing.assert_close(result.detach(), expected)
    del garbage


# ------------------------------------------------------------------ the measurement script


def test_benchmark_script_parses():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "boundary_memory.py"), "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--modes" in result.stdout
