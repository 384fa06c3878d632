"""One AdamW step on one parameter: time and peak memory of the fused kernel against the PyTorch ops.

    pytest benchmarks/test_bench_adamw.py                      # time it
    pytest benchmarks/test_bench_adamw.py --benchmark-disable  # one quick pass

States, as ``lopt.training.optim`` keeps them for a bf16 parameter: ``adamw`` (fp32 moments and master copy)
and ``adamw-bf16`` (bf16 moments, stochastic rounding). Implementations: ``fused``
(lopt_kernels.adamw_step, one kernel), ``eager`` (adamw_step_reference: the PyTorch op sequence,
sliced by STEP_CHUNK_ELEMENTS) and, on CUDA, ``torch-fused`` (``torch.optim.AdamW(fused=True)``) as a
yardstick of bandwidth, on a state that moves as many bytes per value: fp32 parameter, gradient and
moments for ``adamw`` (28 B read and written), bf16 ones for ``adamw-bf16`` (14 B). ``extra_info``
has those bytes per step (``traffic_mib``) and, on CUDA, the peak memory over the inputs. On CUDA:
Llama-3.2-1B's embedding (128256 x 2048) and an MLP matrix (8192 x 2048). On the CPU: a tiny shape,
``fused`` on the interpreter where TRITON_INTERPRET=1 puts it there.
"""

import pytest
import torch

from benchmarks.common import run_benchmark, sync
from lopt_kernels import adamw_step, adamw_step_reference, current_backend

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = [(128256, 2048), (8192, 2048)] if CUDA else [(37, 29)]
# kind: (moments' dtype, master copy, bytes read and written per value)
KINDS = {"adamw": (torch.float32, True, 28), "adamw-bf16": (torch.bfloat16, False, 14)}
HYPER = dict(lr=1e-5, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _step_fn(impl, kind, size):
    """A call that makes one step, or a reason to skip."""
    state_dtype, has_master, _ = KINDS[kind]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if impl == "torch-fused":
        if not CUDA:
            return "torch.optim.AdamW(fused=True) timed on CUDA only"
        p = torch.nn.Parameter(torch.randn(size, device=DEVICE, generator=gen).to(state_dtype))
        p.grad = torch.randn(size, device=DEVICE, generator=gen).to(state_dtype)
        opt = torch.optim.AdamW([p], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                weight_decay=HYPER["weight_decay"], fused=True)
        return opt.step
    fn = {"fused": adamw_step, "eager": adamw_step_reference}[impl]
    p = torch.randn(size, device=DEVICE, generator=gen).to(torch.bfloat16)
    g = torch.randn(size, device=DEVICE, generator=gen).to(torch.bfloat16)
    m, v = torch.zeros(size, device=DEVICE, dtype=state_dtype), torch.zeros(size, device=DEVICE, dtype=state_dtype)
    master = p.float() if has_master else None
    return lambda: fn(p, g, m, v, master, **HYPER, step=10)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["fused", "eager", "torch-fused"])
def test_adamw_step(benchmark, impl, kind, size):
    call = _step_fn(impl, kind, size)
    if isinstance(call, str):
        pytest.skip(call)

    def step():
        call()
        sync()

    run_benchmark(
        benchmark, step, rounds=20 if CUDA else 3, warmup_rounds=2 if CUDA else 1,
        backend=current_backend(DEVICE) if impl == "fused" else "torch",
        kind=kind,
        size=list(size),
        traffic_mib=round(KINDS[kind][2] * size[0] * size[1] / 2**20, 1),
    )
