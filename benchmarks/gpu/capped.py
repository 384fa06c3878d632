"""Part 4a (if time remains): tokens/s under a 24 GB cap, each method at its largest fitting micro-batch.

    python -m benchmarks.gpu.capped        (from benchmarks/gpu_session.sh; writes $OUT/capped.json)

No search (each probe would be a process of its own: minutes): the batch comes from part 2's uncapped row of
the same method (Llama-3.2-1B shape, seq 2048, no recomputation): persistent memory ``p`` and transient peak
``t`` at batch ``B0`` give ``B = floor((FIT x cap - p) / (t / B0))`` (activations grow linearly with the batch;
``FIT`` leaves room for the allocator's rounding and fragmentation). That batch runs once under the cap
(``torch.cuda.set_per_process_memory_fraction``, as benchmarks.e2e does); if it runs out of memory, 3/4 of it
runs once more. For the LoPT train_step methods the planner's own largest fitting batch
(``lopt.planning.memory_model.estimate_memory`` against the same cap) is recorded beside it: a check of the planner's
search, not used to pick. Order: lopt+kernels, hf+liger, hf, lopt, lopt-paper. The dry run: the toy rows of part 2,
a cap sized so the toy's batch lands near 3, one method.
"""

from __future__ import annotations

import math

from .common import GiB, Part, blocked_by, dry_run, extension_wrong, out_dir, read_json
from .e2e import ORDER, run_one, table, worker_args

CAP_GB = 24.0
FIT = 0.92
STEPS, WARMUP = 3, 1
MAX_BATCH = 256
DRY_METHODS = ("lopt+kernels",)


def extrapolate(row: dict, cap_gb: float, max_batch: int) -> int | None:
    p, t, b0 = row.get("persistent_gb"), row.get("transient_peak_gb"), row.get("batch_size")
    if not p or not t or not b0:
        return None
    return max(1, min(max_batch, math.floor((FIT * cap_gb - p) / (t / b0))))


def planner_max_batch(method: str, model: str, seq_len: int, cap_gb: float, *, cuda: bool, max_batch: int) -> int | None:
    """The largest batch whose predicted peak (what the worker's rows compare with) stays under the cap."""
    if method not in ("lopt", "lopt+kernels"):
        return None
    import torch

    from benchmarks.e2e.worker import _load_config
    from lopt.planning.memory_model import estimate_memory

    config = _load_config(model)
    best = 0
    for batch in range(1, max_batch + 1):
        est = estimate_memory(config, seq_len=seq_len, batch_size=batch, num_blocks=2, recompute="none",
                              optimizer="torch-adamw", kernels=method == "lopt+kernels" and cuda,
                              dtype=torch.bfloat16 if cuda else torch.float32, foreach=cuda)
        if est.peak > cap_gb * GiB:
            break
        best = batch
    return best


def main() -> int:
    import torch

    cuda = torch.cuda.is_available() and not dry_run()
    e2e = read_json(out_dir() / "e2e.json") or {}
    base = {r["method"]: r for r in e2e.get("rows") or []
            if not r.get("skipped") and not r.get("error") and not r.get("oom") and r.get("persistent_gb")}
    shape = e2e.get("shape") or {}
    max_batch = 8 if dry_run() else MAX_BATCH
    if dry_run() and base:  # the toy needs a toy cap: the heaviest method's batch near 3
        cap = max((r["persistent_gb"] + 3 * r["transient_peak_gb"] / r["batch_size"]) / FIT for r in base.values())
    else:
        cap = CAP_GB
    part = Part("capped", f"Tokens/s under a {cap:g} GB cap at each method's largest fitting batch (seq "
                f"{shape.get('seq_len')})", cap_gb=cap, fit=FIT, steps=STEPS, warmup=WARMUP, rows=[], sizing=[])
    if not base:
        return part.done("skipped", "part 2 (e2e.json) has no measured row to size the batches from")
    args = worker_args(STEPS, WARMUP, "torch" if extension_wrong() else None)
    for method in ORDER:
        row0 = base.get(method)
        reason = blocked_by(method)
        if dry_run() and method not in DRY_METHODS:
            reason = "dry run: one method only"
        elif row0 is None and not reason:
            reason = "no uncapped row of this method in e2e.json to size its batch from"
        if reason:
            part.add("rows", {"method": method, "mem_cap_gb": cap, "skipped": reason})
            continue
        batch = extrapolate(row0, cap, max_batch)
        planned = planner_max_batch(method, row0["model"], row0["seq_len"], cap, cuda=cuda, max_batch=max_batch)
        part.add("sizing", {"method": method, "from_batch": row0["batch_size"], "persistent_gb": row0["persistent_gb"],
                            "transient_peak_gb": row0["transient_peak_gb"], "extrapolated_batch": batch,
                            "planner_max_batch": planned})
        fields = dict(model=row0["model"], seq_len=row0["seq_len"], batch_size=batch, mem_cap_gb=cap, recompute="none")
        row = part.add("rows", {**run_one(part, args, method, fields, worker_cap_s=120), "try": 1})
        if row.get("oom") and batch > 1:
            fields["batch_size"] = max(1, batch * 3 // 4)
            part.add("rows", {**run_one(part, args, method, fields, worker_cap_s=120), "try": 2})
    errors = [r["method"] for r in part["rows"] if r.get("error") and not r.get("oom")]
    return part.done("ok", ("failed: " + ", ".join(errors)) if errors else None)


def markdown(data: dict) -> str:
    lines = [f"Cap {data.get('cap_gb'):g} GiB, recompute none, {data.get('steps')} timed steps; batch extrapolated "
             f"from part 2 (fit {data.get('fit')} of the cap); planner's largest fitting batch beside it.", ""]
    lines += ["| method | from batch | extrapolated batch | planner's max batch |", "|---|---:|---:|---:|"]
    for s in data.get("sizing") or []:
        lines.append(f"| {s['method']} | {s['from_batch']} | {s['extrapolated_batch']} | "
                     f"{s['planner_max_batch'] if s['planner_max_batch'] is not None else 'not modelled'} |")
    lines += [""] + table(data.get("rows") or [], batch_column=True)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
