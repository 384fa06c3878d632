"""The auxiliary decoder's reconstruction loss, forward + backward: time and peak memory.

    pytest benchmarks/test_bench_recon_loss.py                      # time it
    pytest benchmarks/test_bench_recon_loss.py --benchmark-disable  # one quick pass

Implementations: ``fused`` (lopt_kernels.recon_loss: loss and gradients in one chunked pass),
``eager`` (recon_loss_reference, plain PyTorch autograd) and ``compiled`` (torch.compile of the
reference). On CUDA: bf16, h=2048 (Llama-3.2-1B's width; the decoder's middle is h/4), 2k-16k tokens
with 10% of the positions masked; peak memory over the inputs goes into ``extra_info``. On the CPU:
tiny fp32 sizes, ``eager`` only unless TRITON_INTERPRET=1 puts ``fused`` on the interpreter (on the CPU
``compiled`` is skipped: its C++ build takes about 30 s per shape there, which is not what is timed).
"""

import functools

import pytest
import torch

from benchmarks.common import run_benchmark, sync
from lopt_kernels import current_backend
from lopt_kernels.recon_loss import recon_loss, recon_loss_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
HIDDEN = 2048 if CUDA else 128
TOKENS = (2048, 8192, 16384) if CUDA else (64, 256)
MASKED_FRACTION = 0.1  # padding


@functools.lru_cache(maxsize=None)
def _impl(name):
    """The implementation, or a reason to skip it."""
    if name == "fused":
        return recon_loss if current_backend(DEVICE) == "triton" else "the reference runs here (no Triton backend)"
    if name == "eager":
        return recon_loss_reference
    if name == "compiled":
        return torch.compile(recon_loss_reference) if CUDA else "torch.compile timed on CUDA only"
    raise ValueError(name)


@pytest.mark.parametrize("n_tokens", TOKENS)
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_recon_loss_fwd_bwd(benchmark, impl, n_tokens):
    fn = _impl(impl)
    if isinstance(fn, str):
        pytest.skip(fn)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * std + mean).to(DTYPE)

    h, d = HIDDEN, HIDDEN // 4
    h_out = randn(n_tokens, h).requires_grad_()
    target = randn(n_tokens, h)
    params = [randn(h, std=0.1, mean=1.0), randn(h, std=0.1), randn(d, h, std=0.02), randn(d, std=0.02),
              randn(h, d, std=0.02), randn(h, std=0.02)]  # fmt: skip
    for p in params:
        p.requires_grad_()
    mask = torch.rand(n_tokens, device=DEVICE, generator=gen) >= MASKED_FRACTION

    def step():
        for t in (h_out, *params):
            t.grad = None
        fn(h_out, target, *params, mask).backward()
        sync()

    run_benchmark(
        benchmark, step, rounds=10 if CUDA else 3, warmup_rounds=1,
        backend=current_backend(DEVICE) if impl == "fused" else "torch",
        tokens=n_tokens,
        hidden=h,
        dtype=str(DTYPE),
    )
