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


def run_benchmark(benchmark, step, *, rounds: int, warmup_rounds: int, reset=None, **info) -> None:
    """Run ``step`` once to warm up (compile, autotune, allocator), then ``reset()`` if given (e.g. drop
    the warm-up's gradients), record its peak memory (CUDA), put ``info`` into ``extra_info`` and time it."""
    step()
    if reset is not None:
        reset()
    record_peak_memory(benchmark, step)
    benchmark.extra_info.update(info)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
