"""Part 3b: the zeroth-order (ZO) step against MeZO's loop, once lopt has a ZO step.

    python -m benchmarks.gpu.zo        (from benchmarks/gpu_session.sh; writes $OUT/zo.json)

MeZO's loop is ``lopt.zo.reference.mezo_step`` (as published: perturb every parameter in place by +eps z, loss,
by -2 eps z, loss, restore, then the update along z, z regenerated from one seed each time). The part times it
and, once lopt has a batched ZO step, ``lopt.zo.zo_step(model, batch)`` (the entry point this slot expects;
whoever lands the ZO step adapts ``_lopt_zo_step`` to its real signature; until then that row is skipped), on
the Llama-3.2-1B shape at
seq 2048, batch 4, bf16: tokens/s and peak memory of each. The dry run also runs ``mezo_step`` on the toy model
(``selftest``), so the baseline's code is exercised before a GPU sees it.
"""

from __future__ import annotations

import importlib
import time

from .common import GiB, Part, dry_run, log, time_left


def mezo_step(model, batch: dict, *, eps: float = 1e-3, lr: float = 1e-6, seed: int = 0) -> float:
    """One step of MeZO's loop as published (``lopt.zo.reference.mezo_step``: perturb in place, two forwards,
    restore, update); returns the projected gradient."""
    from lopt.zo.reference import causal_lm_loss
    from lopt.zo.reference import mezo_step as reference_step

    return reference_step(model, causal_lm_loss, batch, seed, eps=eps, lr=lr).projected_grad


def _lopt_zo_step(zo, model, batch):
    if not hasattr(zo, "zo_step"):
        raise LookupError("lopt.zo has no zo_step(model, batch): adapt benchmarks/gpu/zo.py to its entry point")
    return zo.zo_step(model, batch)


def _time_steps(fn, steps: int, cuda: bool) -> dict:
    import torch

    fn()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out = {"step_ms": sorted(times)[len(times) // 2] * 1e3}
    if cuda:
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GiB
    return out


def _model_and_batch(cuda: bool):
    import torch

    from benchmarks.e2e.worker import _load_config
    from lopt.models.shapes import build_model

    name, seq, batch = ("tiny", 32, 2) if not cuda else ("llama-3.2-1b", 2048, 4)
    config = _load_config(name)
    device = "cuda" if cuda else "cpu"
    with torch.device(device):
        model = build_model(config, dtype=torch.bfloat16 if cuda else torch.float32)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    return model, {"input_ids": ids, "labels": ids}, dict(model=name, seq_len=seq, batch_size=batch)


def main() -> int:
    part = Part("zo", "ZO step against MeZO's loop (Llama-3.2-1B shape, seq 2048, batch 4)", rows=[])
    if dry_run():  # the baseline's code, on the toy model, whatever lopt.zo's state
        import torch

        model, batch, shape = _model_and_batch(cuda=False)
        before = [p.detach().clone() for p in model.parameters()]
        g = mezo_step(model, batch, eps=1e-3, lr=1e-2)
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
        part["selftest"] = {"mezo_projected_grad": g, "max_param_change": moved, "finite": bool(torch.isfinite(
            torch.tensor(g))), **shape}
    import torch

    cuda = torch.cuda.is_available() and not dry_run()
    zo = importlib.import_module("lopt.zo")
    model, batch, shape = _model_and_batch(cuda)
    part["shape"] = shape
    tokens = shape["batch_size"] * shape["seq_len"]
    for name, fn in (("mezo-loop", lambda: mezo_step(model, batch)), ("lopt.zo", lambda: _lopt_zo_step(zo, model, batch))):
        if name == "lopt.zo" and not hasattr(zo, "zo_step"):
            part.add("rows", {"impl": name, "status": "skipped", "reason": "lopt has no batched ZO step yet "
                              "(lopt.zo holds the MeZO/LoZO references only)"})
            continue
        if time_left() < 10:
            part.add("rows", {"impl": name, "status": "skipped", "reason": "no time left"})
            continue
        try:
            row = {"impl": name, **_time_steps(fn, steps=3 if cuda else 1, cuda=cuda), "status": "ok"}
            row["tokens_per_s"] = tokens / (row["step_ms"] / 1e3)
        except Exception as error:  # noqa: BLE001
            row = {"impl": name, "status": "failed", "reason": f"{type(error).__name__}: {error}"[:400]}
        log(f"zo: {name}: {row['status']}")
        part.add("rows", row)
    failed = [r["impl"] for r in part["rows"] if r["status"] == "failed"]
    return part.done("failed" if failed else "ok", ("failed: " + ", ".join(failed)) if failed else None)


def markdown(data: dict) -> str:
    lines = []
    if data.get("selftest"):
        lines.append(f"Dry-run self-test of the MeZO loop: {data['selftest']}")
    rows = data.get("rows") or []
    if rows:
        lines += ["", "| impl | step ms | tokens/s | peak GiB | status |", "|---|---:|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {r['impl']} | {r.get('step_ms', '-')} | {r.get('tokens_per_s', '-')} "
                         f"| {r.get('peak_allocated_gb', '-')} | {r['status']} {r.get('reason') or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
