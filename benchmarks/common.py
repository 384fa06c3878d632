"""Small helpers shared by the benchmarks."""

import torch


def sync() -> None:
    """Wait for the GPU, so that a timed step includes its kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def record_peak_memory(benchmark, step) -> None:
    """Run ``step`` once on CUDA and put its peak memory over what was already allocated into
    ``benchmark.extra_info`` (MiB), with the device's name. Does nothing without CUDA."""
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    benchmark.extra_info["peak_mem_over_inputs_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark.extra_info["torch"] = torch.__version__
    benchmark.extra_info["triton"] = _triton_version()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
