"""Builds lopt_kernels._C from csrc/ when a CUDA toolkit and a CUDA build of torch are present.

torch must be importable at build time, so install with ``pip install --no-build-isolation -e .``
(pip's build isolation hides the installed torch). Whenever the extension cannot be built, the
install goes on without it (one notice line) and the pure-PyTorch paths run:
``LOPT_SKIP_CUDA_BUILD=1`` skips it on purpose; ``LOPT_REQUIRE_CUDA_BUILD=1`` makes a failed
compile an error instead of a notice (for CI jobs that check the build).
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

EXTENSION = "lopt_kernels._C"


def notice(reason: str) -> None:
    print(f"lopt-kernels: not building {EXTENSION} ({reason}); the pure-PyTorch path will be used", file=sys.stderr)


def build_options() -> dict:
    # lopt_kernels/extension.py by path: importing the package would import more than the build needs.
    path = Path(__file__).resolve().parent / "lopt_kernels" / "extension.py"
    spec = importlib.util.spec_from_file_location("_lopt_kernels_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_options()


def extension_build() -> dict:
    """setup() arguments that build the extension, or none when it cannot be built here."""
    if os.environ.get("LOPT_SKIP_CUDA_BUILD") == "1":
        notice("LOPT_SKIP_CUDA_BUILD=1")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        notice("torch is not importable at build time; install with pip install --no-build-isolation")
        return {}
    if torch.version.cuda is None:
        notice(f"torch {torch.__version__} is a CPU-only build")
        return {}
    if CUDA_HOME is None:
        notice("no CUDA toolkit found; set CUDA_HOME")
        return {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if os.environ.get("LOPT_REQUIRE_CUDA_BUILD") == "1":
                    raise
                notice(f"compile failed: {exc}")

    options = build_options()
    here = Path(__file__).resolve().parent
    options["sources"] = [str(Path(src).relative_to(here)) for src in options["sources"]]
    return dict(
        ext_modules=[CUDAExtension(EXTENSION, optional=True, **options)],
        cmdclass={"build_ext": OptionalBuildExtension},
    )


setup(**extension_build())
