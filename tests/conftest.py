"""Shared test set-up.

Without a GPU the Triton kernels run through the Triton interpreter, which must be switched on before
triton is first imported. Tests marked ``gpu`` are skipped where CUDA is absent.
"""

import os

# The tests' tensors are tiny: one thread per process beats two threads fighting over two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
