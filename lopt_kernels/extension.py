"""The optional C++/CUDA extension ``lopt_kernels._C`` (sources in ``csrc/``).

``pip install --no-build-isolation -e .`` builds it when torch is a CUDA build and a CUDA toolkit is
found; otherwise the install goes on without it and the pure-PyTorch paths run. Users who installed
without it can build it later, just in time, with ``lopt_kernels.build_extension()``.

This module imports nothing heavy at the top: ``setup.py`` loads it by path for ``build_options()``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
_NOT_TRIED = object()
_module: ModuleType | None | object = _NOT_TRIED
_import_error: str | None = None


def build_options() -> dict:
    """Sources and include dirs of the extension, shared by ``setup.py`` and the JIT build."""
    include_dirs = []
    # ATen's CUDA headers include cuBLAS/cuSPARSE headers, which pip's nvidia packages ship under
    # nvidia/cu13/include rather than inside the CUDA toolkit.
    try:
        import nvidia

        for root in nvidia.__path__:
            cu13 = Path(root) / "cu13" / "include"
            if cu13.is_dir():
                include_dirs.append(str(cu13))
    except ImportError:
        pass
    return dict(
        sources=sorted(str(p) for p in CSRC_DIR.glob("*.cpp")) + sorted(str(p) for p in CSRC_DIR.glob("*.cu")),
        include_dirs=include_dirs,
    )


def _load() -> ModuleType | None:
    global _module, _import_error
    if _module is _NOT_TRIED:
        try:
            import torch  # noqa: F401  (libtorch must be loaded before the extension)

            from . import _C

            _module = _C
        except ImportError as exc:
            _module, _import_error = None, str(exc)
    return _module


def has_extension() -> bool:
    """True when the compiled extension (built at install or by ``build_extension()``) is loaded."""
    return _load() is not None


def extension() -> ModuleType:
    """The loaded extension module; raises a one-line error saying how to get it when it is absent."""
    module = _load()
    if module is None:
        raise RuntimeError(
            "lopt_kernels._C is not built "
            f"({_import_error}); build it with `pip install --no-build-isolation -e .` where a CUDA "
            "toolkit and a CUDA build of torch are present, or call lopt_kernels.build_extension()"
        )
    return module


def build_extension(verbose: bool = False) -> ModuleType:
    """Compile ``csrc/`` now (torch.utils.cpp_extension.load, about a minute) and load the result.

    Needs a CUDA build of torch, a CUDA toolkit (``CUDA_HOME``) and a source checkout (``csrc/``).
    ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured as in any torch extension build.
    """
    global _module, _import_error
    if _load() is not None:
        return _module
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError("build_extension() needs a CUDA build of torch; this one is CPU-only")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("build_extension() needs a CUDA toolkit: set CUDA_HOME (e.g. /usr/local/cuda)")
    options = build_options()
    if not options["sources"]:
        raise RuntimeError(f"build_extension() needs the C++ sources in {CSRC_DIR} (a source checkout)")
    _module = cpp_extension.load(
        name="lopt_kernels_C",
        sources=options["sources"],
        extra_include_paths=options["include_dirs"],
        with_cuda=True,
        verbose=verbose,
    )
    _import_error = None
    return _module
