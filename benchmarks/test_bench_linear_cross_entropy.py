"""Fused lm_head + cross-entropy, forward + backward: time and peak memory against the alternatives.

    pytest benchmarks/test_bench_linear_cross_entropy.py                      # time it
    pytest benchmarks/test_bench_linear_cross_entropy.py --benchmark-disable  # one quick pass

Implementations: ``fused`` (lopt_kernels.linear_cross_entropy), ``eager`` (plain matmul + fp32
cross-entropy, the reference), ``compiled`` (torch.compile of the reference, CUDA only: on the CPU
the C++ build dominates) and ``liger`` (Liger-Kernel's LigerFusedLinearCrossEntropyLoss, where it
imports). On CUDA: bf16, Qwen2-1.5B's head (h=1536, V=151936), 2k-16k tokens; peak memory over the
inputs goes into ``extra_info``. On the CPU: tiny fp32 sizes, and ``fused`` is whatever
``current_backend("cpu")`` picks (the reference unless TRITON_INTERPRET=1).
"""

import functools

import pytest
import torch

from benchmarks.common import run_benchmark, sync
from lopt_kernels import current_backend
from lopt_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
HIDDEN, VOCAB = (1536, 151936) if CUDA else (64, 1000)
TOKENS = (2048, 8192, 16384) if CUDA else (32, 128)
IGNORE_FRACTION = 0.1  # prompt tokens / padding


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    return lambda hidden, weight, labels: loss(weight, hidden, labels)


@functools.lru_cache(maxsize=None)
def _impl(name):
    """The implementation as fn(hidden, weight, labels) -> mean loss, or a reason to skip it."""
    if name == "fused":
        return linear_cross_entropy
    if name == "eager":
        return linear_cross_entropy_reference
    if name == "compiled":
        return torch.compile(linear_cross_entropy_reference) if CUDA else "torch.compile timed on CUDA only"
    if name == "liger":
        return (_liger_loss() if CUDA else None) or "liger-kernel not importable (or no CUDA)"
    raise ValueError(name)


@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled", "liger"])
def test_linear_cross_entropy_fwd_bwd(benchmark, impl, n_tokens):
    fn = _impl(impl)
    if isinstance(fn, str):
        pytest.skip(fn)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n_tokens, HIDDEN, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device=DEVICE, generator=gen) * HIDDEN**-0.5).to(DTYPE).requires_grad_()
    labels = torch.randint(0, VOCAB, (n_tokens,), device=DEVICE, generator=gen)
    labels[torch.rand(n_tokens, device=DEVICE, generator=gen) < IGNORE_FRACTION] = -100

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).backward()
        sync()

    def drop_grads():
        hidden.grad = weight.grad = None

    run_benchmark(
        benchmark, step, rounds=10 if CUDA else 3, warmup_rounds=1, reset=drop_grads,
        backend=current_backend(DEVICE) if impl == "fused" else "torch",
        tokens=n_tokens,
        hidden=HIDDEN,
        vocab=VOCAB,
        dtype=str(DTYPE),
    )
