"""The end-to-end benchmark: a matrix of training configurations, each in its own process.

    python -m benchmarks.e2e.run --models llama-3.2-1b --methods hf,hf+liger,lopt-paper,lopt,lopt+kernels \\
        --seq-lens 512,2048 --batch-sizes 1,4 --mem-caps none,24 --recompute none,full \\
        --steps 10 --warmup 3 --out benchmarks/results/e2e-<date>-<gpu>.json

Every configuration runs ``python -m benchmarks.e2e.worker '<json>'`` in a fresh process (a fresh
CUDA context: no cached blocks, no state from the previous one) that prints one JSON row. The
results file is rewritten after every row, so an interrupted run keeps what it measured:
``{"device", "torch", "triton", "commit", "date", "args", "rows": [...]}``.

``--search batch`` finds, for each method, model, sequence length, cap and recomputation, the largest
micro-batch that fits (``--search seq``: the longest sequence at the first ``--batch-sizes`` value):
doubling from the first value until a probe runs out of memory, then bisection between the last
fit and the first OOM. Every probe is its own process and its own row (``probe: true``); a summary
row per search carries ``max_batch_size`` / ``max_seq_len``. On the CPU a cap is emulated by the
counted bytes (see the worker), which lets the search itself be tested without a GPU.

``python -m benchmarks.e2e.report RESULTS.json`` turns a results file into a table and plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .worker import DEFAULTS, METHODS, ROW_PREFIX

REPO = Path(__file__).resolve().parents[2]


def _list(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _cap(text: str):
    return None if text.lower() in ("none", "null", "0", "") else float(text)


def _bool(text: str) -> bool:
    return text.lower() in ("1", "on", "true", "yes")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-3.2-1b", help="shipped config names, or tiny (comma-separated)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seq-lens", default="512,2048")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--mem-caps", default="none", help="GiB caps, 'none' for uncapped (comma-separated)")
    p.add_argument("--recompute", default="none", help="none, selective, full (comma-separated)")
    p.add_argument("--optimizers", default="torch-adamw",
                   help="torch-adamw (the same torch.optim.AdamW for all), or lopt's adamw, adamw-bf16, adamw-8bit")
    p.add_argument("--early-lower-step", default="off", help="off, on (comma-separated; LoPT methods only)")
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--boundary-memory", choices=("auto", "extension", "torch"),
                   help="the LoPT methods' boundary release (default: auto with kernels, torch without)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--search", choices=("batch", "seq"), help="search the largest batch / longest sequence that fits")
    p.add_argument("--search-steps", type=int, default=2, help="timed steps per search probe")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=131072)
    p.add_argument("--seq-granularity", type=int, default=256, help="the sequence search's resolution")
    p.add_argument("--no-measure-best", dest="measure_best", action="store_false",
                   help="after a search, do not time the largest setting found with --steps / --warmup")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker process")
    p.add_argument("--jobs", type=int, default=1, help="workers at once (CPU only: GPU timings need the GPU alone)")
    p.add_argument("--no-predict", action="store_true", help="skip the planner's predicted peak in LoPT rows")
    p.add_argument("--out", help="results file (default benchmarks/results/e2e-<date>-<gpu>.json)")
    p.add_argument("--append", action="store_true", help="add the rows to an existing results file")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- environment


def environment() -> dict:
    """The machine and versions, found in a child process: the runner itself never creates a CUDA context
    (it would hold GPU memory the workers are measured in)."""
    code = "import json; from benchmarks.e2e.run import _environment; print(json.dumps(_environment()))"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        total = torch.cuda.get_device_properties(0).total_memory / (1 << 30)
    else:
        device, total = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None
    return {
        "device": device,
        "device_memory_gb": total,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger_kernel") or _version("liger-kernel"),
        "commit": _commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def _version(package: str):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


def _commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def default_out(env: dict) -> Path:
    name = env["device"].lower()
    for key in ("h200", "h100", "a100", "l40s", "4090", "3090"):
        if key in name:
            slug = key
            break
    else:
        slug = "cpu" if name.startswith("cpu") else "".join(c if c.isalnum() else "-" for c in name)[:24]
    return REPO / "benchmarks" / "results" / f"e2e-{dt.date.today().isoformat()}-{slug}.json"


# ---------------------------------------------------------------------------------------------- workers


def run_worker(spec: dict, timeout: float) -> dict:
    """One configuration in its own process; a row even when the process dies."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e.worker", json.dumps(spec)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "oom": False, "error": f"timed out after {timeout:.0f} s"}
    rows = [line[len(ROW_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if rows:
        row = json.loads(rows[-1])
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        oom = any("out of memory" in line.lower() for line in tail)
        row = {**spec, "oom": oom, "error": f"worker exited with status {proc.returncode}: " + " | ".join(tail)[-800:]}
    row["wall_s"] = round(time.perf_counter() - start, 2)
    return row


def _spec(args, **fields) -> dict:
    spec = {k: fields.get(k, DEFAULTS[k]) for k in DEFAULTS}
    spec.update(steps=args.steps, warmup=args.warmup, num_blocks=args.num_blocks, device=args.device, dtype=args.dtype,
                predict=not args.no_predict, boundary_memory=args.boundary_memory)
    spec.update(fields)
    return spec


def matrix(args) -> list[dict]:
    specs = []
    for model, method, seq, batch, cap, recompute, optimizer, early in itertools.product(
        _list(args.models), _list(args.methods), _list(args.seq_lens, int), _list(args.batch_sizes, int),
        _list(args.mem_caps, _cap) or [None], _list(args.recompute), _list(args.optimizers),
        _list(args.early_lower_step, _bool),
    ):
        if early and not method.startswith("lopt"):
            continue
        specs.append(_spec(args, model=model, method=method, seq_len=seq, batch_size=batch, mem_cap_gb=cap,
                           recompute=recompute, optimizer=optimizer, early_lower_step=early))
    return specs


def _fits(row: dict) -> bool:
    return not row.get("oom") and not row.get("error") and not row.get("skipped")


def search(args, base: dict, key: str, start: int, limit: int, granularity: int, record) -> dict:
    """Largest ``key`` (batch_size or seq_len) that fits: doubling, then bisection. ``record`` gets every probe."""

    def probe(value: int) -> bool:
        row = run_worker({**base, key: value, "steps": args.search_steps, "warmup": 1}, args.timeout)
        row.update(probe=True, search=key)
        record(row)
        if row.get("skipped") or (row.get("error") and not row.get("oom")):
            raise RuntimeError(row.get("skipped") or row.get("error"))
        return _fits(row)

    summary = {k: base[k] for k in ("method", "model", "seq_len", "batch_size", "mem_cap_gb", "recompute", "optimizer",
                                    "num_blocks", "early_lower_step")}
    summary.update(search=key, probe=False)
    best, worst = 0, None
    try:
        value = start
        while value <= limit:
            if probe(value):
                best, value = value, value * 2
            else:
                worst = value
                break
        if worst is None and best:
            summary["note"] = f"fits up to the search limit {limit}"
        if best and worst:
            lo, hi = best, worst
            while hi - lo > granularity:
                mid = (lo + hi) // 2 // granularity * granularity
                if mid <= lo:
                    break
                if probe(mid):
                    lo = mid
                else:
                    hi = mid
            best = lo
    except RuntimeError as error:
        summary["error"] = str(error)[:500]
    summary["max_" + key] = best
    summary[key] = best
    summary["oom"] = best == 0
    if best and args.measure_best and "error" not in summary:
        row = run_worker({**base, key: best}, args.timeout)
        row["best_of_search"] = key
        record(row)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    out = Path(args.out) if args.out else default_out(env)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not env["device"].startswith("cpu") and args.jobs != 1:
        print("--jobs > 1 is for the CPU only; running one worker at a time", file=sys.stderr)
        args.jobs = 1
    results = {**env, "args": vars(args), "rows": []}
    if args.append and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("device") != env["device"]:
            raise SystemExit(f"--append: {out} was measured on {previous.get('device')}, this is {env['device']}")
        results["rows"] = previous["rows"]
        results["runs"] = previous.get("runs", [previous.get("args")]) + [vars(args)]

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)

    def record(row):
        results["rows"].append(row)
        save()
        if not args.quiet:
            what = ("OOM" if row.get("oom") else f"skipped: {row['skipped']}" if row.get("skipped") else
                    f"error: {row['error'][:120]}" if row.get("error") else
                    f"{row.get('tokens_per_s') or 0:,.0f} tok/s, transient {row.get('transient_peak_gb') or 0:.3f} GiB")
            print(f"[{len(results['rows'])}] {row.get('method')} {row.get('model')} seq {row.get('seq_len')} "
                  f"batch {row.get('batch_size')} cap {row.get('mem_cap_gb')} recompute {row.get('recompute')}: {what}",
                  file=sys.stderr, flush=True)

    if args.search:
        key = "batch_size" if args.search == "batch" else "seq_len"
        for spec in matrix(args):
            if args.search == "batch":
                if spec["batch_size"] != _list(args.batch_sizes, int)[0]:
                    continue
                start, limit, gran = spec["batch_size"], args.max_batch_size, 1
            else:
                if spec["seq_len"] != _list(args.seq_lens, int)[0]:
                    continue
                start, limit, gran = spec["seq_len"], args.max_seq_len, args.seq_granularity
            record(search(args, spec, key, start, limit, gran, record))
    else:
        specs = matrix(args)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for row in pool.map(lambda s: run_worker(s, args.timeout), specs):
                record(row)
    save()
    print(f"wrote {out} ({len(results['rows'])} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
