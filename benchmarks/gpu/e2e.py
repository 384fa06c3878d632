"""Part 2: the end-to-end training step at the Llama-3.2-1B shape, seq 2048, batch 4, uncapped, no recomputation.

    python -m benchmarks.gpu.e2e        (from benchmarks/gpu_session.sh; writes $OUT/e2e.json)

One row per method (benchmarks.e2e: each configuration in its own process, a fresh CUDA context): tokens/s,
step time, persistent and transient memory, peak allocated and reserved, MFU (bf16 dense peak), and for the
LoPT train_step methods the planner's predicted peak (``lopt.planning.memory_model.estimate_memory``) beside the
measured one. The planner models LoPT's step only: hf, hf+liger and lopt-paper have no prediction.

Order: lopt+kernels, hf+liger, hf, lopt, lopt-paper (the goals' comparisons first). lopt+kernels is skipped
where the kernel part found a kernel it runs wrong; the LoPT methods release the boundary with torch where the
extension loaded but its tests failed (``auto`` takes torch anyway where it did not build). hf+liger is skipped,
with the reason, where liger_kernel does not import (its wheel was not carried). The dry run: the toy model,
seq 64, batch 2, two timed steps, two workers at once.
"""

from __future__ import annotations

from .common import Part, blocked_by, dry_run, extension_wrong, log, time_left

ORDER = ("lopt+kernels", "hf+liger", "hf", "lopt", "lopt-paper")
GPU_SHAPE = dict(model="llama-3.2-1b", seq_len=2048, batch_size=4, steps=5, warmup=2)
DRY_SHAPE = dict(model="tiny", seq_len=64, batch_size=2, steps=2, warmup=1)
# (numerator, denominator, field, label) of the summary's ratios; the goals of issue 5 where they are one
RATIOS = (("lopt+kernels", "hf", "transient_peak_gb", "transient peak, lopt+kernels / hf (goal <= 0.4)"),
          ("lopt+kernels", "hf+liger", "transient_peak_gb", "transient peak, lopt+kernels / hf+liger (goal <= 0.7)"),
          ("lopt+kernels", "hf", "tokens_per_s", "tokens/s, lopt+kernels / hf"),
          ("lopt+kernels", "hf+liger", "tokens_per_s", "tokens/s, lopt+kernels / hf+liger"),
          ("lopt+kernels", "lopt", "tokens_per_s", "tokens/s, lopt+kernels / lopt"))
MIN_WORKER_S = 20  # a worker needs at least this long (imports, model, warm-up); less left: not started


def shape() -> dict:
    return DRY_SHAPE if dry_run() else GPU_SHAPE


def worker_args(steps: int, warmup: int, boundary_memory: str | None = None):
    from benchmarks.e2e import run as e2e_run

    argv = ["--steps", str(steps), "--warmup", str(warmup)]
    if boundary_memory:
        argv += ["--boundary-memory", boundary_memory]
    return e2e_run.parse_args(argv)


def run_one(part: Part, args, method: str, fields: dict, *, worker_cap_s: float) -> dict:
    """One worker (``fields``: model, seq_len, batch_size, mem_cap_gb, recompute) if time is left; its row."""
    from benchmarks.e2e import run as e2e_run

    left = time_left() - 3
    if left < MIN_WORKER_S:
        return {"method": method, **fields, "skipped": f"not run: {left:.0f} s left in the part"}
    spec = e2e_run._spec(args, method=method, **fields)
    log(f"{part['part']}: {method} {fields} (worker limit {min(worker_cap_s, left):.0f} s)")
    return e2e_run.run_worker(spec, timeout=min(worker_cap_s, left))


def run_rows(part: Part, methods, fields: dict, *, steps: int, warmup: int, jobs: int = 1, worker_cap_s: float = 150,
             boundary_memory: str | None = None) -> list[dict]:
    """Each method's worker, in order (``jobs`` at once: the CPU only), every row saved as it comes."""
    from concurrent.futures import ThreadPoolExecutor

    args = worker_args(steps, warmup, boundary_memory)
    rows = []
    if jobs > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for row in pool.map(lambda m: run_one(part, args, m, fields, worker_cap_s=worker_cap_s), methods):
                rows.append(part.add("rows", row))
    else:
        for method in methods:
            rows.append(part.add("rows", run_one(part, args, method, fields, worker_cap_s=worker_cap_s)))
    return rows


def main() -> int:
    fields = shape()
    part = Part("e2e", "End-to-end training step: Llama-3.2-1B shape, seq 2048, batch 4 (toy in the dry run)",
                shape=fields, methods=list(ORDER), rows=[], skipped_methods={})
    methods = []
    for method in ORDER:
        reason = blocked_by(method)
        if reason:
            part["skipped_methods"] = {**part["skipped_methods"], method: reason}
            part.add("rows", {"method": method, "model": fields["model"], "seq_len": fields["seq_len"],
                              "batch_size": fields["batch_size"], "mem_cap_gb": None, "recompute": "none",
                              "skipped": reason})
        else:
            methods.append(method)
    release = None
    if extension_wrong():
        release = "torch"
        part["note"] = "the extension's boundary tests failed: the LoPT methods release the boundary with torch"
    config = dict(model=fields["model"], seq_len=fields["seq_len"], batch_size=fields["batch_size"], mem_cap_gb=None,
                  recompute="none")
    rows = run_rows(part, methods, config, steps=fields["steps"], warmup=fields["warmup"],
                    jobs=2 if dry_run() else 1, worker_cap_s=150 if dry_run() else 100, boundary_memory=release)
    bad = [r["method"] for r in rows if r.get("error")]
    if bad and len(bad) == len(rows):
        return part.done("failed", "every worker failed: " + "; ".join(str(r["error"])[:120] for r in rows[:2]))
    if bad:
        return part.done("ok", "failed: " + ", ".join(bad))
    return part.done("ok")


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def row_status(row: dict) -> str:
    if row.get("skipped"):
        return "skipped: " + str(row["skipped"])[:80]
    if row.get("oom"):
        return "OOM"
    if row.get("error"):
        return "failed: " + str(row["error"])[:80]
    return "ok"


def table(rows: list[dict], *, batch_column: bool = False) -> list[str]:
    head = "| method | " + ("batch | " if batch_column else "") + ("tokens/s | step ms | persistent GiB | transient GiB | "
                                                                     "peak alloc GiB | peak reserved GiB | MFU % | "
                                                                     "planner peak GiB (x measured) | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pred = r.get("predicted_peak_gb")
        pred_text = "not modelled" if r.get("method") in ("hf", "hf+liger", "lopt-paper") else _fmt(pred, ".3f")
        if pred and r.get("peak_allocated_gb"):
            pred_text += f" ({pred / r['peak_allocated_gb']:.2f}x)"
        lines.append(
            f"| {r.get('method')} | " + (f"{r.get('batch_size') or '-'} | " if batch_column else "")
            + f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('step_ms'), '.1f')} "
            f"| {_fmt(r.get('persistent_gb'), '.3f')} | {_fmt(r.get('transient_peak_gb'), '.3f')} | {_fmt(r.get('peak_allocated_gb'), '.3f')} "
            f"| {_fmt(r.get('peak_reserved_gb'), '.3f')} | {_fmt(r['mfu'] * 100 if r.get('mfu') else None, '.1f')} "
            f"| {pred_text} | {row_status(r)} |")
    return lines


def markdown(data: dict) -> str:
    rows = data.get("rows") or []
    s = data.get("shape") or {}
    lines = [f"{s.get('model')}, seq {s.get('seq_len')}, batch {s.get('batch_size')}, {s.get('steps')} timed steps after "
             f"{s.get('warmup')} warm-up; memory {'counted bytes (CPU)' if data.get('dry_run') else 'CUDA allocator'}.", ""]
    lines += table(rows)
    by = {r.get("method"): r for r in rows if row_status(r) == "ok"}

    def ratio(a, b, key):
        if a in by and b in by and by[a].get(key) and by[b].get(key):
            return by[a][key] / by[b][key]
        return None

    lines += ["", "| ratio | value |", "|---|---:|"]
    for a, b, key, label in RATIOS:
        lines.append(f"| {label} | {_fmt(ratio(a, b, key))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
