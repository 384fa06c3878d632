"""RMSNorm, SwiGLU and RoPE, forward + backward: time and peak memory against the references.

    pytest benchmarks/test_bench_layer_ops.py                      # time them
    pytest benchmarks/test_bench_layer_ops.py --benchmark-disable  # one quick pass

Implementations: ``fused`` (lopt_kernels), ``eager`` (the op's ``*_reference``, what Hugging Face
computes) and ``compiled`` (torch.compile of the reference, CUDA only: on the CPU the C++ build
dominates). On CUDA: bf16 at the shapes of Llama-3.2-1B / Qwen2.5-1.5B layers; peak memory over the
inputs goes into ``extra_info``. On the CPU: tiny fp32 sizes, and ``fused`` is whatever
``current_backend("cpu")`` picks (the reference unless TRITON_INTERPRET=1).
"""

import functools

import pytest
import torch

from benchmarks.common import run_benchmark, sync
from lopt_kernels import current_backend
from lopt_kernels.rms_norm import rms_norm, rms_norm_reference
from lopt_kernels.rope import apply_rope, apply_rope_reference
from lopt_kernels.swiglu import swiglu, swiglu_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

# (rows, width): hidden-size norms, and Qwen3's per-head q_norm (rows = tokens x heads, width = head_dim).
RMS_NORM_SIZES = [(8192, 2048), (16384, 4096), (131072, 128)] if CUDA else [(37, 136)]
# (tokens, intermediate size): Llama-3.2-1B's and Qwen2.5-1.5B's MLP.
SWIGLU_SIZES = [(8192, 8192), (16384, 8960)] if CUDA else [(37, 136)]
# (batch, seq, q heads, k heads, head_dim): Llama-3.2-1B and Qwen2.5-1.5B attention.
ROPE_SIZES = [(4, 2048, 32, 8, 64), (4, 4096, 12, 2, 128)] if CUDA else [(1, 13, 6, 2, 24)]

OPS = {
    "rms_norm": (rms_norm, rms_norm_reference),
    "swiglu": (swiglu, swiglu_reference),
    "rope": (apply_rope, apply_rope_reference),
}


@functools.cache
def _impl(op, name):
    """The implementation, or a reason to skip it."""
    fused, reference = OPS[op]
    if name == "fused":
        return fused
    if name == "eager":
        return reference
    if name == "compiled":
        return torch.compile(reference) if CUDA else "torch.compile timed on CUDA only"
    raise ValueError(name)


def _randn(*shape, gen, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(DTYPE)


def _inputs(op, size):
    """(tensors that get gradients, other arguments) for one call of ``op`` at ``size``."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if op == "rms_norm":
        rows, width = size
        return [_randn(rows, width, gen=gen), 1 + _randn(width, gen=gen, scale=0.1)], []
    if op == "swiglu":
        tokens, width = size
        return [_randn(tokens, width, gen=gen), _randn(tokens, width, gen=gen)], []
    batch, seq_len, q_heads, k_heads, head_dim = size
    # As attention produces them: [B, T, H, D] projections viewed as [B, H, T, D].
    q = _randn(batch, seq_len, q_heads, head_dim, gen=gen)
    k = _randn(batch, seq_len, k_heads, head_dim, gen=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE) / head_dim))
    angles = torch.arange(seq_len, device=DEVICE)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[None]
    return [q, k], [angles.cos().to(DTYPE), angles.sin().to(DTYPE)]


def _sizes():
    for op, sizes in (("rms_norm", RMS_NORM_SIZES), ("swiglu", SWIGLU_SIZES), ("rope", ROPE_SIZES)):
        for size in sizes:
            yield pytest.param(op, size, id=f"{op}-{'x'.join(map(str, size))}")


@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
@pytest.mark.parametrize("op,size", list(_sizes()))
def test_layer_op_fwd_bwd(benchmark, op, size, impl):
    fn = _impl(op, impl)
    if isinstance(fn, str):
        pytest.skip(fn)
    leaves, others = _inputs(op, size)
    leaves = [t.requires_grad_() for t in leaves]

    def call():
        if op == "rope":  # [B, T, H, D] projections as attention views them
            return fn(leaves[0].transpose(1, 2), leaves[1].transpose(1, 2), *others)
        return fn(*leaves, *others)

    outs = call()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grad_outs = [torch.randn_like(o) for o in outs]
    del outs

    def step():
        for t in leaves:
            t.grad = None
        outs = call()
        torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), grad_outs)
        sync()

    run_benchmark(
        benchmark, step, rounds=20 if CUDA else 3, warmup_rounds=2 if CUDA else 1,
        backend=current_backend(DEVICE) if impl == "fused" else "torch",
        op=op,
        size=list(size),
        dtype=str(DTYPE),
    )
