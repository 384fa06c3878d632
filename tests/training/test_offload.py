"""``lopt.training.offload.BlockOffload``: paging blocks to the host changes no number.

Each run is the sequential schedule (one optimizer per block, stepped and clipped as the block finishes,
two accumulated micro-batches per step) from the same start; with ``"optimizer"`` or ``"params"``
offload, prefetched or streamed state, the weights and the optimizer state after several steps are
bitwise those of the run without offload. What is on the device when, the checkpoint round trip and
the hooks' teardown are checked too.
"""

import io

import pytest
import torch

import lopt
from lopt.training.checkpoint import load_optimizer_state
from lopt.models.shapes import build_model, tiny_config
from lopt.training.offload import BlockOffload
from lopt.training.optim import build_optimizer

LR = 3e-3
VOCAB = 256


@pytest.fixture(autouse=True)
def reference_step(monkeypatch):
    """Paging is the same whatever computes the update; the PyTorch step is faster here than the interpreter."""
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")


def make_optimizer(name, groups):
    return torch.optim.AdamW(groups, lr=LR) if name == "torch-adamw" else build_optimizer(name, groups)


def micro_batches(step, n=2):
    """``n`` right-padded micro-batches of 2 rows."""
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def build(dtype, num_blocks=3, seed=1):
    config = tiny_config("llama", num_hidden_layers=6, hidden_size=64, vocab_size=VOCAB)
    return lopt.LoPTModel(build_model(config, dtype=dtype, seed=seed), num_blocks=num_blocks, kernels=False)


def train(model, offload, steps, start=0, boundary="stale"):
    for step in range(start, start + steps):
        model.sequential_step(micro_batches(step), boundary=boundary,
                              on_block_done=lambda b: offload.step_block(b, max_grad_norm=1.0))
        offload.step_block(model.num_blocks - 1, max_grad_norm=1.0)


def run(optimizer, dtype, mode, stream=False, steps=3, boundary="stale"):
    torch.manual_seed(0)  # adamw-bf16's stochastic rounding draws from the global generator
    model = build(dtype)
    optimizers = [make_optimizer(optimizer, groups) for groups in model.block_param_groups(LR)]
    offload = BlockOffload(model, optimizers, mode, stream_state=stream)
    train(model, offload, steps, boundary=boundary)
    return model, optimizers, offload


def state_tensors(optimizers):
    return [(key, value) for opt in optimizers for group in opt.param_groups for p in group["params"]
            for key, value in sorted(opt.state[p].items()) if torch.is_tensor(value)]


def assert_same(model, optimizers, ref_model, ref_optimizers):
    expected = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name
    got, want = state_tensors(optimizers), state_tensors(ref_optimizers)
    assert [k for k, _ in got] == [k for k, _ in want] and got
    for (key, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), key


@pytest.mark.parametrize("optimizer,dtype", [("torch-adamw", torch.float32), ("adamw", torch.bfloat16),
                                             ("adamw-bf16", torch.bfloat16)], ids=lambda v: str(v).split(".")[-1])
def test_offload_changes_no_number(optimizer, dtype):
    ref_model, ref_optimizers, _ = run(optimizer, dtype, "none")
    start = build(dtype)
    moved = dict(start.named_parameters())
    assert any(not torch.equal(p, moved[n]) for n, p in ref_model.named_parameters())  # the steps did something
    for mode, stream in (("optimizer", False), ("params", False), ("optimizer", True), ("params", True)):
        model, optimizers, offload = run(optimizer, dtype, mode, stream)
        host = {t.data_ptr() for t in offload.host_tensors()}
        paged = [v for _, v in state_tensors(optimizers) if v.dim() > 0]
        assert paged and all(v.data_ptr() in host for v in paged), mode  # between steps: all state on the host
        if mode == "params":  # only the last block's weights are off the host between steps
            off_host = [b for b, params in enumerate(offload.blocks) if any(p.data_ptr() not in host for p in params)]
            assert off_host == [model.num_blocks - 1]
        offload.close()
        assert_same(model, optimizers, ref_model, ref_optimizers)


@pytest.mark.parametrize("stream", [False, True], ids=["prefetch", "stream"])
def test_only_the_running_block_is_on_the_device(stream):
    model = build(torch.float32)
    optimizers = [make_optimizer("adamw", groups) for groups in model.block_param_groups(LR)]
    offload = BlockOffload(model, optimizers, "params", stream_state=stream)
    seen = []

    def on_device():
        host = {t.data_ptr() for t in offload.host_tensors()}
        weights = [b for b, params in enumerate(offload.blocks) if any(p.data_ptr() not in host for p in params)]
        state = [b for b, opt in enumerate(optimizers)
                 if any(v.dim() > 0 and v.data_ptr() not in host for s in opt.state.values() for v in s.values()
                        if torch.is_tensor(v))]
        return weights, state

    def step_block(b):
        seen.append((b, on_device()))
        offload.step_block(b)
        seen.append((b, on_device()))

    for step in range(2):
        model.sequential_step(micro_batches(step), on_block_done=step_block)
        step_block(model.num_blocks - 1)
    for b, (weights, _) in seen[-6:]:  # the second step (the first one creates the state)
        assert weights == [b]
    # prefetched: a block's state is on the device when its step starts, and off it after
    assert [state for _, (_, state) in seen[-6:]] == ([[]] * 6 if stream else [[0], [], [1], [], [2], []])


def test_fresh_boundary_under_params_offload():
    """A fresh boundary recomputes block b after its step: its weights must still be on the device then."""
    ref_model, ref_optimizers, _ = run("torch-adamw", torch.float32, "none", steps=2, boundary="fresh")
    model, optimizers, offload = run("torch-adamw", torch.float32, "params", steps=2, boundary="fresh")
    offload.close()
    assert_same(model, optimizers, ref_model, ref_optimizers)


def test_checkpoint_round_trip_with_offloaded_state():
    """state_dict from the host buffers, load_optimizer_state (fp32 moments and master of bf16 weights), page_out:
    the resumed run continues bitwise like the uninterrupted one."""
    ref_model, ref_optimizers, _ = run("adamw", torch.bfloat16, "none", steps=3)
    model, optimizers, offload = run("adamw", torch.bfloat16, "params", steps=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizers": offload.state_dicts()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = build(torch.bfloat16, seed=7)  # other weights: the checkpoint must replace them
    resumed_optimizers = [make_optimizer("adamw", groups) for groups in resumed.block_param_groups(LR)]
    resumed_offload = BlockOffload(resumed, resumed_optimizers, "params")
    resumed.load_state_dict(saved["model"])
    for optimizer, state in zip(resumed_optimizers, saved["optimizers"]):
        load_optimizer_state(optimizer, state)
    resumed_offload.page_out()
    masters = [v for key, v in state_tensors(resumed_optimizers) if key == "master"]
    assert masters and all(v.dtype == torch.float32 for v in masters)
    train(resumed, resumed_offload, 1, start=2)
    resumed_offload.close()
    assert_same(resumed, resumed_optimizers, ref_model, ref_optimizers)


def test_close_removes_the_hooks_and_bad_arguments_are_refused():
    model = build(torch.float32, num_blocks=2)
    optimizers = [make_optimizer("adamw", groups) for groups in model.block_param_groups(LR)]
    hooked = [m for m in model.modules() if m._forward_pre_hooks]
    offload = BlockOffload(model, optimizers, "params")
    assert len([m for m in model.modules() if m._forward_pre_hooks]) == len(hooked) + 5
    with pytest.raises(RuntimeError, match="has not run"):
        offload.step_block(0)
    offload.close()
    assert [m for m in model.modules() if m._forward_pre_hooks] == hooked
    with pytest.raises(ValueError, match="offload must be one of"):
        BlockOffload(model, optimizers, "disk")
    with pytest.raises(ValueError, match="one optimizer per block"):
        BlockOffload(model, optimizers[:1], "optimizer")
    with pytest.raises(ValueError, match="stream_state"):
        BlockOffload(model, optimizers, "none", stream_state=True)
