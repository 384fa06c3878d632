"""Every Triton kernel compiles for Hopper (sm_90) at the launch configurations its launcher picks.

The interpreter runs the kernels' Python, not the compiler: a kernel can pass every CPU test and still
fail to compile, overflow shared memory or spill registers on the GPU. Triton compiles to a cubin
without a driver, so these facts are checked here (benchmarks/kernel_compile.py records each op's
launches under the interpreter and compiles them in a child process).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import kernel_compile
from lopt_kernels.backend import triton_available, triton_interpreted

pytestmark = pytest.mark.skipif(
    not (triton_available() and triton_interpreted()),
    reason="records launches through the Triton interpreter (CPU runs); on a GPU the kernels run for real",
)

# (hidden, intermediate, q heads, kv heads, head_dim, vocab): an odd toy shape (narrow rows: several
# rows per program, a vocabulary under one block) beside the shapes of the shipped 1B and 1.5B configs.
TOY_SHAPES = (136, 200, 6, 2, 24, 777)


@pytest.fixture(scope="module")
def compiled():
    launches = kernel_compile.record({"toy": TOY_SHAPES}, [torch.float32, torch.bfloat16])
    launches += kernel_compile.record(kernel_compile.MODEL_SHAPES, [torch.bfloat16])
    return launches, kernel_compile.compile_launches(list(dict.fromkeys(launches)))


def test_every_kernel_is_recorded(compiled):
    launches, _ = compiled
    recorded = {launch.kernel.split(":")[1] for launch in launches}
    expected = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
                "_rope_kernel", "_layer_norm_fwd_kernel", "_gelu_fwd_kernel", "_residual_kernel",
                "_gelu_bwd_kernel", "_layer_norm_bwd_kernel", "_lse_block_kernel", "_logits_grad_kernel",
                "_adamw_step_kernel"}
    expected |= {"_zo_linear_kernel", "_zo_update_kernel"}
    expected |= {"_grouped_lowrank_kernel"}
    assert expected <= recorded


def test_kernels_compile_for_sm90_and_fit_shared_memory(compiled):
    _, results = compiled
    failed = [f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    too_big = [f"{r['kernel']} {r['constexprs']}: {r['shared_bytes']} B" for r in results if not r["fits_shared"]]
    assert not too_big, "\n".join(too_big)


def test_bf16_kernels_do_not_spill_registers(compiled):
    """bf16 is what trains on the GPU: a spill there is lost bandwidth in a memory-bound kernel."""
    _, results = compiled
    bf16 = [r for r in results if any(t == "*bf16" for t in r["signature"].values())]
    assert bf16
    spilled = [f"{r['kernel']} {r['constexprs']}: {r['spill_store_bytes']} B stored"
               for r in bf16 if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilled, "\n".join(spilled)
    assert all(r["programs_per_sm"] >= 1 for r in bf16)


def test_programs_per_sm_follows_the_occupancy_rules():
    # 32 registers x 4 warps: registers allow 16 programs, warps 16 (64 / 4).
    assert kernel_compile.programs_per_sm(32, 4, 0) == 16
    # 168 registers: 5376 per warp (a multiple of 256), 21504 per program of 4 warps -> 3 programs.
    assert kernel_compile.programs_per_sm(168, 4, 0) == 3
    # 170 registers: 5440 per warp, allocated as 5632 -> 22528 per program -> 2 programs.
    assert kernel_compile.programs_per_sm(170, 4, 0) == 2
    # 255 registers with 8 warps: 256 * 32 * 8 = 65536, exactly one program.
    assert kernel_compile.programs_per_sm(255, 8, 0) == 1
    # Shared memory bounds it too: 100 KiB each leaves room for two.
    assert kernel_compile.programs_per_sm(32, 4, 100 * 1024) == 2
