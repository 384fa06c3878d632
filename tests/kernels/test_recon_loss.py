"""recon_loss: the fused Triton path and the reference, against float64.

The inputs live on ``KERNEL_DEVICE`` (conftest.py): CUDA where there is a GPU, so the compiled kernels
run; else the CPU, where the kernels run in the Triton interpreter. Those tests use small shapes, fp32
and fp16; bf16 and real widths run on the GPU only (tests marked gpu). Tests of the reference alone and
of argument errors stay on the CPU.
Most tests call the Triton path with a small chunk, so that a few chunks (the last one ragged) run.
"""

import importlib

import pytest
import torch
from conftest import KERNEL_DEVICE
from kernel_checks import assert_no_worse_than_native, double_backward, rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lopt_kernels.backend import current_backend
from lopt_kernels.recon_loss import _fused_forward_backward, _recon_loss_triton, recon_loss, recon_loss_reference

recon_module = importlib.import_module("lopt_kernels.recon_loss")  # the package exports a function of that name

PARAMS = ("ln_weight", "ln_bias", "w1", "b1", "w2", "b2")
CHUNK = 32  # tokens per chunk in the small-shape tests: 74 tokens make chunks of 32, 32 and 10
EPS = 1e-5


def make_inputs(shape, dtype=torch.float32, mask="none", device=KERNEL_DEVICE, seed=0):
    """(h_out, target, params, mask): h_out/params require grad; a decoder of the engine's shape.

    Drawn on the CPU (the same values on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    *lead, h = shape
    d = h // 4

    def randn(*size, std=1.0, mean=0.0):
        return torch.randn(*size, generator=gen) * std + mean

    h_out = randn(*shape, std=2.0, mean=0.3)
    target = randn(*shape)
    params = {
        "ln_weight": randn(h, std=0.2, mean=1.0),
        "ln_bias": randn(h, std=0.1),
        "w1": randn(d, h, std=h**-0.5),
        "b1": randn(d, std=0.1),
        "w2": randn(h, d, std=d**-0.5),
        "b2": randn(h, std=0.1),
    }
    if mask == "none":
        keep = None
    elif mask == "holes":  # zeros mid-sequence and at the end of a sequence, as padding leaves them
        keep = torch.ones(lead, dtype=torch.bool)
        keep[..., 1:3] = False
        keep[-1, -max(1, lead[-1] // 4) :] = False
    elif mask == "zeros":
        keep = torch.zeros(lead, dtype=torch.bool)
    else:
        raise ValueError(mask)

    def prepare(t, grad=True):
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    params = {name: prepare(p) for name, p in params.items()}
    return prepare(h_out), prepare(target, grad=False), params, None if keep is None else keep.to(device)


def loss_and_grads(fn, h_out, target, params, mask, **kwargs):
    """The loss and the gradients of every input that requires grad (None for the others)."""
    loss = fn(h_out, target, *params.values(), mask, **kwargs)
    wrt = [h_out, *params.values()]
    needed = [t for t in wrt if t.requires_grad]
    grads = iter(torch.autograd.grad(loss, needed)) if needed else iter(())
    return loss, [next(grads) if t.requires_grad else None for t in wrt]


def oracle(h_out, target, params, mask):
    """Float64 reference from the same (rounded) inputs."""

    def up(t):
        return t.detach().double().requires_grad_(t.requires_grad)

    return loss_and_grads(recon_loss_reference, up(h_out), up(target), {k: up(p) for k, p in params.items()}, mask)


def triton_path(h_out, target, params, mask, chunk_tokens=CHUNK):
    return loss_and_grads(_recon_loss_triton, h_out, target, params, mask, eps=EPS, chunk_tokens=chunk_tokens)


@torch.no_grad()  # as inside the op: below autograd
def fused_pass(h_out, target, params, mask, needs_grad, chunk_tokens=CHUNK):
    """What the fused op returns: (loss, dh_out, dln_weight, dln_bias, dw1, db1, dw2, db2)."""
    return _fused_forward_backward(h_out, target, *params.values(), mask, EPS, needs_grad, chunk_tokens)


SHAPES = [(2, 37, 96), (2, 37, 136), (1, 5, 896)]


@pytest.mark.parametrize("mask", ["none", "holes"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_float64(shape, mask):
    inputs = make_inputs(shape, torch.float32, mask)
    loss, grads = triton_path(*inputs, chunk_tokens=CHUNK if shape[1] > CHUNK else 2)
    ref_loss, ref_grads = oracle(*inputs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, ref_loss) < 1e-6
    for name, g, ref in zip(("h_out", *PARAMS), grads, ref_grads):
        assert g.dtype == torch.float32 and g.shape == ref.shape, name
        assert rel_err(g, ref) < 2e-5, name


def assert_16bit_criterion(dtype, loss, grads, native_loss, native_grads, ref_loss, ref_grads):
    """The 16-bit criterion: the kernel's error against float64 is no worse than plain PyTorch's in
    the same dtype, plus a small tolerance (a fraction of the dtype's rounding step)."""
    unit = torch.finfo(dtype).eps
    assert loss.dtype == torch.float32
    assert_no_worse_than_native(loss, native_loss, ref_loss, slack=0.1 * unit, name="loss")
    for name, g, native, ref in zip(("h_out", *PARAMS), grads, native_grads, ref_grads):
        assert g.dtype == dtype, name
        assert_no_worse_than_native(g, native, ref, factor=1.05, slack=0.25 * unit, name=name)


# bf16 is checked on the GPU: the interpreter (Triton 3.8) rounds fp32 -> bf16 toward zero, not to nearest.
@pytest.mark.parametrize("mask", ["none", "holes"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_fp16_no_worse_than_native_fp16(shape, mask):
    inputs = make_inputs(shape, torch.float16, mask)
    assert_16bit_criterion(
        torch.float16, *triton_path(*inputs), *loss_and_grads(recon_loss_reference, *inputs), *oracle(*inputs)
    )


def test_reference_is_the_masked_mean_it_claims():
    """The oracle itself, against the formula written out from scratch on the kept rows."""
    h_out, target, params, mask = make_inputs((2, 37, 136), torch.float64, "holes", device="cpu")
    p = {k: v.detach() for k, v in params.items()}
    rows = h_out.detach()[mask]
    x = (rows - rows.mean(-1, keepdim=True)) / torch.sqrt(rows.var(-1, unbiased=False, keepdim=True) + EPS)
    z = (x * p["ln_weight"] + p["ln_bias"]) @ p["w1"].T + p["b1"]
    y = (z * 0.5 * (1 + torch.erf(z / 2**0.5))) @ p["w2"].T + p["b2"]
    expected = ((y - target[mask]) ** 2).sum() / (rows.shape[0] * rows.shape[1])
    torch.testing.assert_close(recon_loss_reference(h_out, target, *params.values(), mask), expected)
    expected_all = recon_loss_reference(h_out, target, *params.values(), torch.ones(2, 37))
    torch.testing.assert_close(recon_loss_reference(h_out, target, *params.values()), expected_all)


@pytest.mark.parametrize("fn", ["reference", "triton"])
def test_all_masked_gives_zero_loss_and_zero_grads(fn):
    inputs = make_inputs((2, 37, 96), torch.float32, "zeros")
    loss, grads = triton_path(*inputs) if fn == "triton" else loss_and_grads(recon_loss_reference, *inputs)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_mask_dtypes_agree():
    h_out, target, params, mask = make_inputs((2, 37, 96), torch.float32, "holes")
    losses = [
        _recon_loss_triton(h_out, target, *params.values(), m, EPS, CHUNK).item()
        for m in (mask, mask.long(), mask.float())
    ]
    assert losses[0] == losses[1] == losses[2]


def test_no_grad_computes_the_loss_only():
    h_out, target, params, mask = make_inputs((2, 37, 96), torch.float32, "holes")
    with torch.no_grad():
        loss = _recon_loss_triton(h_out, target, *params.values(), mask, EPS, CHUNK)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, recon_loss_reference(h_out, target, *params.values(), mask).detach())
    # What the fused pass hands back when nothing needs a gradient: no gradient at all.
    outputs = fused_pass(h_out, target, params, mask, [False] * 7)
    assert all(g.numel() == 0 for g in outputs[1:])


@pytest.mark.parametrize("frozen", [("ln_weight", "w2"), ("h_out", "b1", "ln_bias"), ("h_out", *PARAMS)])
def test_frozen_inputs_get_no_gradient(frozen):
    h_out, target, params, mask = make_inputs((2, 37, 96), torch.float32, "holes")
    for name in frozen:
        (h_out if name == "h_out" else params[name]).requires_grad_(False)
    loss, grads = triton_path(h_out, target, params, mask)
    ref_loss, ref_grads = oracle(h_out, target, params, mask)
    torch.testing.assert_close(loss, ref_loss.float())  # an fp32 loss: fp32 tolerance, whatever the reduction order
    for name, g, ref in zip(("h_out", *PARAMS), grads, ref_grads):
        if name in frozen:
            assert g is None and ref is None, name
        else:
            assert rel_err(g, ref) < 2e-5, name
    # And the fused pass skips them: it returns nothing for a frozen input.
    needs = [name not in frozen for name in ("h_out", *PARAMS)]
    outputs = fused_pass(h_out, target, params, mask, needs)
    assert [g.numel() > 0 for g in outputs[1:]] == needs


def test_inputs_are_left_untouched():
    h_out, target, params, mask = make_inputs((2, 37, 136), torch.float32, "holes")
    before = [t.detach().clone() for t in (h_out, target, *params.values(), mask)]
    loss = _recon_loss_triton(h_out, target, *params.values(), mask, EPS, CHUNK)
    loss.backward()
    for t, saved in zip((h_out, target, *params.values(), mask), before):
        assert torch.equal(t.detach(), saved)
    assert target.grad is None


def test_backward_scales_by_grad_output_and_can_run_twice():
    h_out, target, params, mask = make_inputs((2, 37, 96), torch.float32, "holes")
    wrt = [h_out, *params.values()]
    loss = _recon_loss_triton(h_out, target, *params.values(), mask, EPS, CHUNK)
    once = torch.autograd.grad(loss, wrt, retain_graph=True)
    scaled = torch.autograd.grad(loss * 3.0, wrt, retain_graph=True)
    again = torch.autograd.grad(loss * 3.0, wrt)
    for g, s, a in zip(once, scaled, again):
        torch.testing.assert_close(s, 3.0 * g)
        assert torch.equal(s, a)


def test_recon_loss_dispatches_on_the_backend(monkeypatch):
    inputs = make_inputs((2, 37, 96), torch.float32, "holes")
    calls = []
    monkeypatch.setattr(recon_module, "_recon_loss_triton", lambda *a: calls.append(a) or _recon_loss_triton(*a))
    loss, _ = loss_and_grads(recon_loss, *inputs)
    assert current_backend(inputs[0].device) == "triton" and len(calls) == 1
    torch.testing.assert_close(loss, oracle(*inputs)[0].float())
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")
    loss, _ = loss_and_grads(recon_loss, *inputs)
    assert len(calls) == 1
    assert torch.equal(loss, loss_and_grads(recon_loss_reference, *inputs)[0])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_double_backward_is_refused_or_exact(backend, monkeypatch):
    """The fused pass saves finished gradients, nothing to differentiate again: it refuses a second-order
    gradient with an error naming it. The reference differentiates twice as any PyTorch code."""
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", backend)
    h_out, target, params, mask = make_inputs((2, 5, 96), torch.float32, "holes")

    def op(fn):
        return lambda h_out, target, *rest: fn(h_out, target, *rest[:-1], mask=rest[-1])

    inputs = [h_out, target, *params.values(), mask]
    outcome = double_backward("recon_loss", op(recon_loss), op(recon_loss_reference), inputs)
    assert outcome == ("raised" if backend == "triton" else "matched")


def test_shape_errors_are_reported():
    h_out, target, params, mask = make_inputs((2, 37, 96), torch.float32, "holes", device="cpu")
    with pytest.raises(ValueError, match="mask has shape"):
        recon_loss(h_out, target, *params.values(), mask[:, :-1])
    with pytest.raises(ValueError, match="w2 has shape"):
        recon_loss(h_out, target, *list(params.values())[:4], params["w2"].T, params["b2"])


def test_compiles_in_one_graph():
    h_out, target, params, mask = make_inputs((2, 37, 96), torch.float32, "holes")
    compiled = torch.compile(recon_loss, backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(compiled, h_out, target, params, mask)
    eager_loss, eager_grads = loss_and_grads(recon_loss, h_out, target, params, mask)
    assert torch.equal(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)


class _Storages(TorchDispatchMode):
    """The size of every storage that an op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.nbytes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out


def _largest_intermediate(fn, n_tokens, h=96):
    """Bytes of the largest storage fn creates besides its inputs and what it returns."""
    h_out, target, params, _ = make_inputs((n_tokens, h), torch.float32)
    storages = _Storages()
    with storages:
        out = fn(h_out, target, *params.values())
    kept = {t.untyped_storage().data_ptr() for t in tree_leaves(out) + [h_out, target, *params.values()]}
    return max(n for ptr, n in storages.nbytes.items() if ptr not in kept)


def test_working_set_does_not_grow_with_tokens():
    """The fused pass never holds a whole-batch LayerNorm output or [N, h/4] intermediate: apart
    from the gradient it returns, its largest allocation is the same for 48 and 192 tokens."""

    def fused(h_out, target, *params):
        return fused_pass(h_out, target, dict(zip(PARAMS, params)), None, [True] * 7, chunk_tokens=16)

    def reference(*args):
        loss = recon_loss_reference(*args)
        return [loss, *torch.autograd.grad(loss, [args[0], *args[2:]])]

    assert _largest_intermediate(fused, 48) == _largest_intermediate(fused, 192)
    # The measure does see a working set that grows: the reference's.
    assert _largest_intermediate(reference, 192) >= 3 * _largest_intermediate(reference, 48)


def _saved_bytes(fn, *args):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(saved.values())


def test_saves_only_the_finished_gradients():
    h_out, target, params, mask = make_inputs((2, 37, 136), torch.float32, "holes")
    args = (h_out, target, *params.values(), mask)
    grads_bytes = h_out.numel() * h_out.element_size() + sum(p.numel() * 4 for p in params.values())
    for chunk in (16, 64):
        assert _saved_bytes(_recon_loss_triton, *args, EPS, chunk) == grads_bytes
    assert _saved_bytes(recon_loss_reference, *args) > 2 * grads_bytes


# ---------------------------------------------------------------- GPU: bf16 and real widths


def _bf16_check(shape, chunk_tokens):
    inputs = make_inputs(shape, torch.bfloat16, "holes", device="cuda")
    assert_16bit_criterion(
        torch.bfloat16,
        *triton_path(*inputs, chunk_tokens=chunk_tokens),
        *loss_and_grads(recon_loss_reference, *inputs),
        *oracle(*inputs),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("h", [1536, 2048, 4096])
def test_gpu_bf16_no_worse_than_native_bf16(h):
    _bf16_check((2, 1000, h), chunk_tokens=recon_module.tokens_per_chunk(h))  # one chunk
    _bf16_check((2, 1000, h), chunk_tokens=384)  # six chunks, the last ragged


@pytest.mark.gpu
def test_gpu_no_host_sync():
    h_out, target, params, mask = make_inputs((4, 1024, 2048), torch.bfloat16, "holes", device="cuda")
    recon_loss(h_out, target, *params.values(), mask).backward()  # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        recon_loss(h_out, target, *params.values(), mask).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_peak_memory_below_reference():
    h_out, target, params, mask = make_inputs((4, 4096, 2048), torch.bfloat16, "holes", device="cuda")

    def peak(fn):
        fn(h_out, target, *params.values(), mask).backward()  # warm up
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(h_out, target, *params.values(), mask).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused, reference = peak(recon_loss), peak(recon_loss_reference)
    assert fused < 0.6 * reference, (fused, reference)


@pytest.mark.gpu
def test_gpu_compiled_matches_eager():
    h_out, target, params, mask = make_inputs((2, 1000, 2048), torch.bfloat16, "holes", device="cuda")
    compiled = torch.compile(recon_loss, fullgraph=True)
    loss, grads = loss_and_grads(compiled, h_out, target, params, mask)
    eager_loss, eager_grads = loss_and_grads(recon_loss, h_out, target, params, mask)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
