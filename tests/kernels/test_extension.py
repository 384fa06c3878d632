"""The optional compiled extension lopt_kernels._C: build switch, loading, and its release on CPU tensors."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lopt_kernels
from lopt_kernels import extension

ROOT = Path(__file__).resolve().parents[2]
BUILT = sorted((ROOT / "lopt_kernels").glob("_C*.so"))


def _imports() -> bool:
    try:
        importlib.import_module("lopt_kernels._C")
    except ImportError:
        return False
    return True


def test_has_extension_is_a_bool_consistent_with_import():
    assert isinstance(lopt_kernels.has_extension(), bool)
    assert lopt_kernels.has_extension() == _imports()


@pytest.mark.skipif(not BUILT, reason="lopt_kernels._C not built (pip install --no-build-isolation -e . with CUDA_HOME set)")
def test_built_extension_imports():
    from lopt_kernels import _C

    assert callable(_C.release_saved)
    assert lopt_kernels.has_extension()
    assert extension.extension() is _C


def test_build_extension_is_callable_and_returns_the_loaded_module():
    assert callable(lopt_kernels.build_extension)
    if lopt_kernels.has_extension():  # no JIT build in tests: only the already-loaded path
        assert lopt_kernels.build_extension() is extension.extension()


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_import_error", "No module named 'lopt_kernels._C'")
    assert not extension.has_extension()
    with pytest.raises(RuntimeError, match="build_extension"):
        extension.extension()


def test_build_options_name_the_sources():
    options = extension.build_options()
    sources = [Path(s) for s in options["sources"]]
    assert ROOT / "csrc" / "boundary.cpp" in sources
    assert all(s.is_file() for s in sources)
    assert all(Path(d).is_dir() for d in options["include_dirs"])


def test_setup_skips_the_build_with_a_notice():
    env = dict(os.environ, LOPT_SKIP_CUDA_BUILD="1")
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "not building lopt_kernels._C (LOPT_SKIP_CUDA_BUILD=1)" in result.stderr


@pytest.mark.skipif(not lopt_kernels.has_extension(), reason="lopt_kernels._C not built")
def test_extension_release_frees_only_unreferenced_storages():
    from lopt_kernels._C import release_saved

    free = torch.randn(100)
    view_a, view_b = free[:50].detach(), free[50:].detach()  # detached: no _base reference to `free`
    del free  # the storage is held by the two views only
    held = torch.randn(100)
    held_view = held[10:]  # `held` is referenced outside the candidates
    kept = torch.randn(10)

    released, nbytes = release_saved([view_a, view_b, held_view, kept], [kept], [])
    assert released == [True, True, False, False]
    assert nbytes == 400
    assert view_a.untyped_storage().nbytes() == 0 and view_b.untyped_storage().nbytes() == 0
    assert held.untyped_storage().nbytes() == 400 and kept.untyped_storage().nbytes() == 40
