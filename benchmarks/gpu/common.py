"""What every part of the GPU session shares: where results go, the machine and versions stamped into every
results file, the part's own deadline, the kernel verdicts that gate the timed parts, and timing helpers.

A part is ``python -m benchmarks.gpu.<name>``, run by ``benchmarks/gpu_session.sh`` under ``timeout``. It
opens its results file at once (``Part``: ``$OUT/<name>.json``, status ``running``) and rewrites it after every
measurement, so a part cut short keeps what it measured; ``session finish`` then stamps the final status.

Environment variables (set by the script):

- ``OUT``: the results folder (the device tool's output folder).
- ``LOPT_GPU_DRY_RUN=1``: toy shapes on the CPU through the same code (the CPU test of the script).
- ``LOPT_GPU_WORK``: a scratch folder outside ``$OUT`` (logs, junit files, installed wheels).
- ``LOPT_GPU_ENV``: the environment JSON the script wrote at its start (else it is found here).
- ``LOPT_PART_DEADLINE``: the epoch second by which this part must be done (its limit, minus a margin).
- ``LOPT_COMMIT``: the commit, where the tree has no ``.git`` (the device tool's copy may not).

Nothing here imports torch at module level: ``session summary`` reads results without it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30
METADATA = ("device", "torch", "triton", "commit", "date")
STATUSES = ("running", "ok", "skipped", "failed")
PACKAGES = ("accelerate", "peft", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "ninja", "setuptools")

# What each timed measurement runs of lopt_kernels: a kernel group the kernel tests found wrong (see
# benchmarks.gpu.kernels.GROUPS) skips it. lopt+kernels runs the patched layer ops, the fused head and the
# fused decoder loss, and the boundary release (the extension, where it loaded; else the torch release).
USES = {
    "lopt+kernels": ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "recon_loss", "engine", "patch"),
    "lce:fused": ("linear_cross_entropy",),
    "recon:fused": ("recon_loss",),
    "offload": ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "recon_loss", "engine", "patch", "adamw"),
}


def dry_run() -> bool:
    return os.environ.get("LOPT_GPU_DRY_RUN", "") == "1"


def out_dir() -> Path:
    out = os.environ.get("OUT")
    if not out:
        raise SystemExit("OUT is not set: run the parts through benchmarks/gpu_session.sh")
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def work_dir() -> Path:
    path = Path(os.environ.get("LOPT_GPU_WORK") or (Path(os.environ.get("TMPDIR", "/tmp")) / "lopt-gpu-work"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def deadline() -> float:
    value = os.environ.get("LOPT_PART_DEADLINE")
    return float(value) if value else math.inf


def time_left() -> float:
    """Seconds until this part's deadline (inf without one)."""
    return deadline() - time.time()


# ---------------------------------------------------------------------------------------------- environment


def _version(package: str):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed, or metadata unreadable
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_digest() -> str:
    """sha256 of the sources that decide what is measured (lopt, lopt_kernels, csrc, benchmarks' code,
    setup.py, pyproject.toml), by path and content: ties a results file to a tree even without ``.git``."""
    digest = hashlib.sha256()
    files = [REPO / "setup.py", REPO / "pyproject.toml"]
    for folder in ("lopt", "lopt_kernels", "csrc", "benchmarks"):
        for path in (REPO / folder).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts or "results" in path.parts:
                continue
            if path.suffix in (".py", ".sh", ".cpp", ".cu", ".h", ".json"):
                files.append(path)
    for path in sorted(set(files)):
        if path.is_file():
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def compute_environment() -> dict:
    """The machine and versions (imports torch; creates no CUDA tensor)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = torch.cuda.get_device_name(0)
        memory = round(props.total_memory / GiB, 2)
        capability = f"{props.major}.{props.minor}"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        memory = capability = None
    commit = _git("rev-parse", "HEAD")
    commit_source = "git"
    if commit is None:
        commit, commit_source = os.environ.get("LOPT_COMMIT") or None, "LOPT_COMMIT"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device,
        "device_memory_gb": memory,
        "compute_capability": capability,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger_kernel") or _version("liger-kernel"),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "commit": commit,
        "commit_source": commit_source if commit else "unknown: no .git here and LOPT_COMMIT unset",
        "git_dirty": bool(dirty) if dirty is not None else None,
        "source_digest": source_digest(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run(),
    }


def environment() -> dict:
    """The session's environment (written once at its start), or found now; ``date`` is always now."""
    path = os.environ.get("LOPT_GPU_ENV")
    env = None
    if path and Path(path).is_file():
        try:
            env = json.loads(Path(path).read_text())
        except ValueError:
            env = None
    if env is None:
        env = compute_environment()
    env["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return env


# ---------------------------------------------------------------------------------------------- results files


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a kill) never sees half a file. The temporary name starts with a dot and
    ``session finish`` removes any left behind."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class Part:
    """``$OUT/<name>.json``: opened with status ``running`` and the environment, saved after every ``add``."""

    def __init__(self, name: str, title: str, **fields):
        self.path = out_dir() / f"{name}.json"
        self.started = time.time()
        self.data = {"part": name, "title": title, **environment(), "status": "running", "reason": None, **fields}
        self.save()

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def add(self, key: str, row: dict) -> dict:
        """Append ``row`` to the list ``key`` and save."""
        self.data.setdefault(key, []).append(row)
        self.save()
        return row

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        write_json(self.path, self.data)

    def done(self, status: str = "ok", reason: str | None = None) -> int:
        assert status in STATUSES[1:], status
        self.data.update(status=status, reason=reason)
        self.save()
        print(f"{self.data['part']}: {status}" + (f" ({reason})" if reason else ""), flush=True)
        return 0


# ---------------------------------------------------------------------------------------------- kernel gating


def kernel_verdicts() -> dict:
    """``{group: verdict}`` from ``$OUT/kernels.json`` (``ok``, ``wrong``, ``untested``); empty if absent."""
    data = read_json(out_dir() / "kernels.json") or {}
    return {group: info.get("verdict") for group, info in (data.get("kernels") or {}).items()}


def extension_wrong() -> bool:
    """Whether the extension loaded but the kernel tests found its boundary release wrong (then the LoPT
    methods are told to release with torch; without the extension ``auto`` takes torch anyway)."""
    data = read_json(out_dir() / "kernels.json") or {}
    built = bool((data.get("build") or {}).get("has_extension"))
    return built and (data.get("kernels") or {}).get("boundary", {}).get("verdict") == "wrong"


def blocked_by(measurement: str, verdicts: dict | None = None) -> str | None:
    """A skip reason when a kernel that ``measurement`` runs was found wrong, else None."""
    verdicts = kernel_verdicts() if verdicts is None else verdicts
    wrong = [g for g in USES.get(measurement, ()) if verdicts.get(g) == "wrong"]
    if wrong:
        return f"the kernel tests found {', '.join(wrong)} wrong (see kernels.json)"
    return None


# ---------------------------------------------------------------------------------------------- timing


def bench(fn, *, cuda: bool, warmup_ms: float = 100, rep_ms: float = 400, cpu_reps: int = 3) -> dict:
    """Median time of ``fn()`` in ms (and the 20th/80th percentiles): ``triton.testing.do_bench`` on CUDA
    (it synchronises and clears the L2 between calls), wall time of ``cpu_reps`` calls on the CPU."""
    if cuda:
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80, "timer": "triton.testing.do_bench"}
    times = []
    fn()
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "p20_ms": min(times), "p80_ms": max(times),
            "timer": "time.perf_counter (CPU)"}


def cuda_peak_over(fn) -> dict:
    """Run ``fn()`` once on CUDA: its peak allocated bytes over what was allocated before, in GiB."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return {"peak_over_inputs_gb": (torch.cuda.max_memory_allocated() - base) / GiB}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
