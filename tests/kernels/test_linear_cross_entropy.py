"""Fused lm_head + cross-entropy against a float64 oracle: loss and every gradient, all reductions.

The inputs live on ``KERNEL_DEVICE`` (tests/conftest.py): CUDA where there is a GPU, so the compiled
kernels run; else the CPU, where the Triton kernels run through the interpreter. Hence shapes are small
and odd (37 tokens, width 96/136, vocab 777) and the dtypes fp32/fp16 (the interpreter truncates casts
to bf16). Tests about the CPU alone (the backend switch, argument errors, lm_head_weight) stay on the CPU.
Tests marked ``gpu`` check real vocabulary sizes in bf16 with the criterion: the kernel's error against
float64 is no worse than native bf16 PyTorch's error against the same answer, plus a small tolerance.
"""

import importlib

import pytest
import torch
from conftest import KERNEL_DEVICE
from kernel_checks import assert_no_worse_than_native, double_backward, rel_err
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lopt_kernels import current_backend
from lopt_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference, lm_head_weight

# the module itself: the package re-exports the function under the same name
lce = importlib.import_module("lopt_kernels.linear_cross_entropy")

IGNORE = -100
REDUCTIONS = ("mean", "sum", "none")


def make_inputs(
    n, h, v, *, dtype=torch.float32, device=KERNEL_DEVICE, bias=True, ignore_frac=0.25, logit_std=2.0, seed=0
):
    """hidden [n, h], weight [v, h], bias [v] or None, labels [n]; logits have about ``logit_std`` spread.

    Drawn on the CPU (the same values on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (logit_std / h**0.5)
    b = torch.randn(v, generator=gen) * logit_std if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = IGNORE
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def loss_and_grads(fn, hidden, weight, bias, labels, reduction, grad_out=None, **kwargs):
    """Run ``fn`` on fresh leaves and backpropagate; returns (loss, [grad_hidden, grad_weight, grad_bias?])."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(leaves[0], leaves[1], labels, reduction=reduction, bias=leaves[2] if bias is not None else None, **kwargs)
    if reduction == "none":
        loss.backward(grad_out.to(device=loss.device, dtype=loss.dtype))
    else:
        loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def float64_oracle(hidden, weight, bias, labels, reduction, grad_out=None):
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    return loss_and_grads(
        linear_cross_entropy_reference, as64(hidden), as64(weight), as64(bias), labels, reduction, grad_out
    )


def assert_matches(got, want, tol):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert rel_err(loss, ref_loss) < tol, ("loss", rel_err(loss, ref_loss))
    assert len(grads) == len(ref_grads)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.fixture
def many_blocks(monkeypatch):
    """Shrink the block plan: vocab blocks of 256 (777 = 3 x 256 + 9), token blocks of 16, and kernel
    programs that loop twice over each block, so every accumulation path runs."""
    monkeypatch.setattr(lce, "_MIN_BLOCK_VOCAB", 256)
    monkeypatch.setattr(lce, "_BLOCK_ELEMENTS", 0)
    monkeypatch.setattr(lce, "_MAX_BLOCK_ELEMENTS", 16 * 256)
    monkeypatch.setattr(lce, "_KERNEL_MAX_COLS", 128)
    assert lce._plan(37, 777) == (16, 256)


def test_cpu_runs_the_kernels():
    if not torch.cuda.is_available():
        assert current_backend("cpu") == "triton", "the CPU tests must exercise the Triton kernels (interpreter)"


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("h,bias", [(96, True), (136, False)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64(request, blocks, h, bias, reduction):
    if blocks == "many":
        request.getfixturevalue("many_blocks")
    hidden, weight, b, labels = make_inputs(37, h, 777, bias=bias)
    grad_out = torch.randn(37, generator=torch.Generator().manual_seed(1))
    got = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, reduction, grad_out)
    assert got[0].dtype == torch.float32
    assert got[0].shape == ((37,) if reduction == "none" else ())
    assert_matches(got, float64_oracle(hidden, weight, b, labels, reduction, grad_out), tol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp16_no_worse_than_native(many_blocks, reduction):
    hidden, weight, b, labels = make_inputs(37, 96, 777, dtype=torch.float16)
    grad_out = torch.randn(37, generator=torch.Generator().manual_seed(2))
    got_loss, got_grads = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, reduction, grad_out)
    nat_loss, nat_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, reduction, grad_out)
    ref_loss, ref_grads = float64_oracle(hidden, weight, b, labels, reduction, grad_out)
    assert_no_worse_than_native(got_loss, nat_loss, ref_loss, slack=1e-3, name="loss")
    for name, got, nat, ref in zip(("hidden", "weight", "bias"), got_grads, nat_grads, ref_grads):
        assert got.dtype == torch.float16
        assert_no_worse_than_native(got, nat, ref, slack=1e-3, name=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_stable_with_logits_in_the_hundreds(many_blocks, reduction):
    hidden, weight, b, labels = make_inputs(37, 96, 777, logit_std=300.0)
    grad_out = torch.randn(37, generator=torch.Generator().manual_seed(3))
    got = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, reduction, grad_out)
    ref = float64_oracle(hidden, weight, b, labels, reduction, grad_out)
    assert ref[0].abs().max() > 100  # the losses themselves are in the hundreds
    assert_matches(got, ref, tol=1e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero_loss_and_zero_grads(many_blocks, reduction):
    hidden, weight, b, labels = make_inputs(37, 96, 777, ignore_frac=1.0)
    assert (labels == IGNORE).all()
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, reduction, torch.ones(37))
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    ref_loss, _ = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, reduction, torch.ones(37))
    assert torch.equal(ref_loss, torch.zeros_like(ref_loss))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    hidden, weight, b, labels = make_inputs(0, 96, 777)
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, reduction, torch.ones(0))
    assert loss.shape == ((0,) if reduction == "none" else ()) and not loss.any()
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_gradient_accumulation_sum_over_total_count_equals_full_batch_mean(many_blocks):
    hidden, weight, b, labels = make_inputs(37, 96, 777)
    labels[:15] = IGNORE  # the halves hold very different numbers of tokens
    total = (labels != IGNORE).sum()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    accumulated = 0.0
    for part in (slice(0, 20), slice(20, 37)):
        loss = linear_cross_entropy(leaves[0][part], leaves[1], labels[part], reduction="sum", bias=leaves[2]) / total
        loss.backward()
        accumulated += loss.detach()
    full_loss, full_grads = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, "mean")
    assert rel_err(accumulated, full_loss) < 1e-6
    for leaf, g in zip(leaves, full_grads):
        assert rel_err(leaf.grad, g) < 1e-5


def test_no_grad_and_matches_grad_mode():
    hidden, weight, b, labels = make_inputs(37, 96, 777)
    with torch.no_grad():
        out = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), labels, bias=b)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, linear_cross_entropy(hidden, weight, labels, bias=b).detach())


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_frozen_weight_gets_no_grad_and_its_work_is_skipped(reduction):
    hidden, weight, b, labels = make_inputs(37, 96, 777, bias=False)
    x = hidden.clone().requires_grad_()
    with _OpLog() as log:
        loss = linear_cross_entropy(x, weight, labels, reduction=reduction)
        loss.backward(torch.ones_like(loss))
    bwd = [args for name, args in log.calls if "linear_cross_entropy_bwd" in name]
    assert len(bwd) == 1 and bwd[0][-3:] == (True, False, False)  # need hidden, weight, bias
    assert weight.grad is None
    ref = float64_oracle(hidden, weight, None, labels, reduction, torch.ones(37))[1][0]
    assert rel_err(x.grad, ref) < 1e-5


def test_frozen_hidden_only_weight_grad():
    hidden, weight, b, labels = make_inputs(37, 96, 777)
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, labels, bias=b).backward()
    ref = float64_oracle(hidden, weight, b, labels, "mean")[1][1]
    assert rel_err(w.grad, ref) < 1e-5


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inputs_are_not_modified_and_saved_tensors_stay_valid(reduction):
    hidden, weight, b, labels = make_inputs(37, 96, 777)
    z = torch.randn(37, 96).to(KERNEL_DEVICE).requires_grad_()
    w, bb = weight.clone().requires_grad_(), b.clone().requires_grad_()
    h = torch.tanh(z)  # tanh saves its output for backward: an in-place write to it would raise there
    snapshot = [t.detach().clone() for t in (h, w, bb, labels)]
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, bias=bb)
    loss.backward(torch.ones_like(loss))
    for before, after in zip(snapshot, (h, w, bb, labels)):
        assert torch.equal(before, after.detach())
    assert torch.isfinite(z.grad).all()


def test_leading_dims_and_int32_labels():
    hidden, weight, b, labels = make_inputs(36, 96, 777)
    hidden, labels = hidden.view(4, 9, 96), labels.view(4, 9)
    out = linear_cross_entropy(hidden, weight, labels.int(), reduction="none", bias=b)
    assert out.shape == (4, 9)
    ref = linear_cross_entropy_reference(hidden.double(), weight.double(), labels, reduction="none", bias=b.double())
    assert rel_err(out, ref) < 1e-5


def test_autocast_casts_like_f_linear():
    """fp32 parameters under bf16 autocast: bf16 compute, fp32 gradients, as the reference under autocast."""
    hidden, weight, b, labels = make_inputs(37, 96, 777)
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        got_loss, got_grads = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, "mean")
        nat_loss, nat_grads = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, "mean")
    ref_loss, ref_grads = float64_oracle(hidden, weight, b, labels, "mean")
    assert got_loss.dtype == torch.float32
    assert_no_worse_than_native(got_loss, nat_loss, ref_loss, slack=1e-3, name="loss")
    for name, got, nat, ref in zip(("hidden", "weight", "bias"), got_grads, nat_grads, ref_grads):
        assert got.dtype == torch.float32
        assert_no_worse_than_native(got, nat, ref, slack=2e-3, name=name)


def test_backend_torch_uses_the_reference(monkeypatch):
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", "torch")
    hidden, weight, b, labels = make_inputs(37, 96, 777, device="cpu")
    with _OpLog() as log:
        out = linear_cross_entropy(hidden, weight, labels, bias=b)
    assert not any("lopt_kernels" in name for name, _ in log.calls)
    assert torch.equal(out, linear_cross_entropy_reference(hidden, weight, labels, bias=b))


def test_bad_arguments_raise():
    # On the CPU: on CUDA the out-of-range label would trip a device-side assert, which ends the CUDA context.
    hidden, weight, b, labels = make_inputs(37, 96, 777, device="cpu")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(hidden, weight.half(), labels)
    bad = labels.clone()
    bad[3] = 777
    # The kernels' own check where they run on the CPU (the interpreter); the reference (a GPU
    # machine's CPU path) raises PyTorch's IndexError.
    kernel_path = current_backend("cpu") == "triton"
    with pytest.raises(RuntimeError if kernel_path else IndexError, match="outside" if kernel_path else "out of bounds"):
        linear_cross_entropy(hidden, weight, bad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_double_backward_is_refused_or_exact(backend, monkeypatch):
    """The fused op refuses a second-order gradient with an error naming it; the reference gives the exact one."""
    monkeypatch.setenv("LOPT_KERNELS_BACKEND", backend)
    hidden, weight, b, labels = make_inputs(9, 16, 40, ignore_frac=0.3)
    hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_()

    def op(fn):
        return lambda hidden, weight, bias: fn(hidden, weight, labels, bias=bias)

    outcome = double_backward("linear_cross_entropy", op(linear_cross_entropy), op(linear_cross_entropy_reference),
                              [hidden, weight, b])
    assert outcome == ("raised" if backend == "triton" else "matched")


def test_custom_ops_pass_opcheck():
    hidden, weight, b, labels = make_inputs(9, 16, 40, ignore_frac=0.3)
    args = (hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_(), labels, IGNORE)
    torch.library.opcheck(torch.ops.lopt_kernels.linear_cross_entropy_fwd.default, args)
    _, lse = torch.ops.lopt_kernels.linear_cross_entropy_fwd(*args)
    grad_loss = torch.randn(9).to(hidden.device)
    bwd_args = (grad_loss, hidden.detach(), weight.detach(), b.detach(), labels, lse, IGNORE, True, True, True)
    torch.library.opcheck(torch.ops.lopt_kernels.linear_cross_entropy_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    hidden, weight, b, labels = make_inputs(37, 96, 777)
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True)
    for reduction in ("mean", "none"):
        got = loss_and_grads(compiled, hidden, weight, b, labels, reduction, torch.ones(37))
        want = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, reduction, torch.ones(37))
        assert_matches(got, want, tol=1e-6)


class _AdapterLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(8, 16, bias=False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 16, bias=False)})


def test_lm_head_weight():
    plain = nn.Linear(8, 16)
    weight, bias = lm_head_weight(plain)
    assert weight is plain.weight and bias is plain.bias
    assert lm_head_weight(nn.Linear(8, 16, bias=False))[1] is None
    with pytest.raises(ValueError, match="adapter"):
        lm_head_weight(_AdapterLike())

    class QuantLinear(nn.Linear):
        pass

    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        lm_head_weight(QuantLinear(8, 16))


def test_lm_head_weight_rejects_peft_lora():
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module("lm_head", nn.Linear(8, 16, bias=False))
    lora = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["lm_head"]), model)
    with pytest.raises(ValueError, match="adapter"):
        lm_head_weight(lora.lm_head)


# ----------------------------------------------------------------------------------------------------
# GPU: real vocabulary sizes in bf16


def _bf16_criterion(reduction, n, h, v, seed):
    hidden, weight, b, labels = make_inputs(n, h, v, dtype=torch.bfloat16, device="cuda", bias=False, seed=seed)
    grad_out = torch.randn(n, generator=torch.Generator().manual_seed(seed)).cuda()
    got_loss, got_grads = loss_and_grads(linear_cross_entropy, hidden, weight, None, labels, reduction, grad_out)
    nat_loss, nat_grads = loss_and_grads(
        linear_cross_entropy_reference, hidden, weight, None, labels, reduction, grad_out
    )
    ref_loss, ref_grads = float64_oracle(hidden, weight, None, labels, reduction, grad_out)
    assert_no_worse_than_native(got_loss, nat_loss, ref_loss, slack=1e-4, name="loss")
    for name, got, nat, ref in zip(("hidden", "weight"), got_grads, nat_grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert_no_worse_than_native(got, nat, ref, factor=1.05, slack=1e-3, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("v,h", [(151936, 1536), (128256, 2048)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_bf16_no_worse_than_native(v, h, reduction):
    _bf16_criterion(reduction, 2048, h, v, seed=0)


@pytest.mark.gpu
def test_gpu_bf16_token_blocked(monkeypatch):
    monkeypatch.setattr(lce, "_MAX_BLOCK_ELEMENTS", 512 * 4096)  # 3000 tokens -> 6 token blocks
    _bf16_criterion("none", 3000, 1536, 151936, seed=1)


@pytest.mark.gpu
def test_gpu_bf16_bias_and_large_logits():
    hidden, weight, b, labels = make_inputs(1024, 1536, 151936, dtype=torch.bfloat16, device="cuda", logit_std=100.0)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, "mean")
    nat = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, "mean")
    ref = float64_oracle(hidden, weight, b, labels, "mean")
    assert_no_worse_than_native(got[0], nat[0], ref[0], slack=1e-4, name="loss")
    for name, g, n, r in zip(("hidden", "weight", "bias"), got[1], nat[1], ref[1]):
        assert_no_worse_than_native(g, n, r, factor=1.05, slack=1e-3, name=name)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_matches_eager():
    hidden, weight, b, labels = make_inputs(1024, 1536, 151936, dtype=torch.bfloat16, device="cuda", bias=False)
    compiled = torch.compile(linear_cross_entropy, fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, None, labels, "mean")
    want = loss_and_grads(linear_cross_entropy, hidden, weight, None, labels, "mean")
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_gpu_memory_is_bounded():
    """8k tokens, Qwen2-1.5B head: the extra memory over inputs and gradients stays far below the
    2.5 GB of bf16 logits that the unfused op materialises (plus their fp32 copies)."""
    n, h, v = 8192, 1536, 151936
    hidden, weight, _, labels = make_inputs(n, h, v, dtype=torch.bfloat16, device="cuda", bias=False)
    hidden.requires_grad_(), weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - hidden.numel() * 2 - weight.numel() * 2
    assert extra < 300 * 2**20, f"{extra / 2**20:.0f} MiB beyond inputs and their gradients"
