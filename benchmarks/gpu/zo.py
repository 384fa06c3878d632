"""Part 3b: the zeroth-order (ZO) step against MeZO's loop and the best plain PyTorch loop.

    python -m benchmarks.gpu.zo        (from benchmarks/gpu_session.sh; writes $OUT/zo.json)

The implementations are ``benchmarks.zo.impls``' (the CPU benchmark's, ``python -m benchmarks.zo.run``), on
the Llama-3.2-1B shape (random init), bf16, a classification batch of 16 random prompts (lengths 32..64,
two candidate tokens; the objective is MeZO's SST-2 loss over the candidates at the last prompt position),
one direction, the decoder layers' nn.Linear weights trained by every implementation:

- ``mezo-loop``: ``lopt.zo.reference.mezo_step`` as published (in place, four passes, full-vocabulary logits);
  on bf16 weights, as MeZO would run them (timing only: its numerics in bf16 are not the point here);
- ``lopt-lowrank`` (r = 2) and ``lopt-fullrank`` (Philox noise inside the Triton GEMM): ``ZOEngine.step`` on
  the batch stacked twice, frozen bf16 weights, fp32 masters / factors, the Triton kernels;
- ``plain-loop``: MeZO's full-rank semantics in place with ``torch._foreach_add_``, three passes, the
  candidate-rows-only loss;
- ``lopt-highrank`` (r = 128), last, if time is left.

Rows run one after the other (each its own model copy, deleted after), warm-up step first (Triton compiles),
then ``steps`` timed steps (median). Per row: step_ms, tokens/s (B·T processed per step / step seconds),
peak GiB (the implementation's weights and state plus the step's transient peak: ``max_memory_allocated``
above what was allocated when the timed steps began), and the speedup over ``mezo-loop``. ``inference``: the
transient peak of a no-grad scoring forward of the same 2B stacked rows. The dry run (toy model, CPU, the
engine's PyTorch references) runs every row through the same code, one step each.
"""

from __future__ import annotations

import gc
import time

from .common import GiB, Part, dry_run, log, time_left

IMPL_ORDER = ("mezo-loop", "lopt-lowrank", "lopt-fullrank", "plain-loop", "lopt-highrank")
GOAL_SPEEDUP = 3.0  # issue 22: >= 3x the reference loop per step on a GPU (Llama-3.2-1B shape, batch 16)



def mezo_step(model, batch: dict, *, eps: float = 1e-3, lr: float = 1e-6, seed: int = 0) -> float:
    """One step of MeZO's loop as published (``lopt.zo.reference.mezo_step``: perturb in place, two forwards,
    restore, update) on a causal LM batch; returns the projected gradient (the dry run's self-test)."""
    from lopt.zo.reference import causal_lm_loss
    from lopt.zo.reference import mezo_step as reference_step

    return reference_step(model, causal_lm_loss, batch, seed, eps=eps, lr=lr).projected_grad


def _model_and_batch(cuda: bool):
    import torch

    from benchmarks.e2e.worker import _load_config
    from benchmarks.zo.impls import synthetic_batch, to_device
    from lopt.models.shapes import build_model

    name, seq, batch_size = ("tiny", 32, 4) if not cuda else ("llama-3.2-1b", 64, 16)
    config = _load_config(name)
    device = "cuda" if cuda else "cpu"
    with torch.device(device):
        model = build_model(config, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    batch = to_device(synthetic_batch(config.vocab_size, batch_size, seq_len=seq, seed=0), device)
    return model, batch, dict(model=name, seq_len=seq, batch_size=batch_size, dtype=str(model.dtype),
                              directions=1, objective="classification over 2 candidate tokens (MeZO's SST-2 loss)")


def _causal_batch(cuda: bool):
    import torch

    from benchmarks.e2e.worker import _load_config
    from lopt.models.shapes import build_model

    config = _load_config("tiny")
    model = build_model(config, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def _persistent_bytes(impl) -> int:
    from benchmarks.e2e.bytecount import unique_bytes

    return unique_bytes(impl.persistent())


def _time_impl(name, base, batch, *, steps: int, cuda: bool) -> dict:
    import torch

    from benchmarks.zo import impls as Z

    impl = Z.make(name, base, batch, lr=1e-6, kernels=None)  # None: the engine's default (Triton on CUDA)
    try:
        impl.step()  # warm-up: Triton compiles, the lowrank basis is drawn
        if cuda:
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        out = None
        for _ in range(steps):
            start = time.perf_counter()
            out = impl.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        row = {"step_ms": sorted(times)[len(times) // 2] * 1e3, "steps": steps,
               "abs_loss_diff": abs(out["loss_plus"][0] - out["loss_minus"][0]),
               "persistent_gb": _persistent_bytes(impl) / GiB}
        if cuda:
            row["transient_peak_gb"] = (torch.cuda.max_memory_allocated() - allocated) / GiB
            row["peak_gb"] = row["persistent_gb"] + row["transient_peak_gb"]
        return row
    finally:
        del impl
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _inference(base, batch, cuda: bool) -> dict:
    """Transient peak and time of a no-grad scoring forward of the 2B stacked rows (no perturbation)."""
    import contextlib

    import torch

    from benchmarks.zo import impls as Z
    from lopt.zo.scoring import stacked_scores

    stacked = Z.stack_batch(batch, 2)
    runner = Z.scoring_runner(base)

    def forward():
        with torch.no_grad():
            stacked_scores(runner, stacked, 1, contextlib.nullcontext())

    forward()
    out = {}
    if cuda:
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    forward()
    if cuda:
        torch.cuda.synchronize()
        out["transient_peak_gb"] = (torch.cuda.max_memory_allocated() - allocated) / GiB
    out["forward_ms"] = (time.perf_counter() - start) * 1e3
    out["weights_gb"] = _persistent_bytes(Z.Impl("inference", base, batch, lr=0.0)) / GiB
    return out


def _needed(cuda: bool) -> float:
    return 10.0 if cuda else 2.0


def main() -> int:
    part = Part("zo", "ZO step against MeZO's loop and the plain loop (Llama-3.2-1B shape, batch 16, bf16)", rows=[])
    import torch

    if dry_run():  # the causal-LM baseline on the toy model, whatever else happens
        model, batch = _causal_batch(cuda=False)
        before = [p.detach().clone() for p in model.parameters()]
        g = mezo_step(model, batch, eps=1e-3, lr=1e-2)
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
        part["selftest"] = {"mezo_projected_grad": g, "max_param_change": moved,
                            "finite": bool(torch.isfinite(torch.tensor(g))), "model": "tiny"}

    cuda = torch.cuda.is_available() and not dry_run()
    base, batch, shape = _model_and_batch(cuda)
    part["shape"] = shape
    tokens = shape["batch_size"] * shape["seq_len"]
    steps = 3 if cuda else 1
    try:
        part["inference"] = _inference(base, batch, cuda)
    except Exception as error:  # noqa: BLE001
        part["inference"] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:400]}
    for name in IMPL_ORDER:
        if time_left() < _needed(cuda):
            part.add("rows", {"impl": name, "status": "skipped", "reason": "no time left in the part"})
            continue
        try:
            row = {"impl": name, **_time_impl(name, base, batch, steps=steps, cuda=cuda), "status": "ok"}
            row["tokens_per_s"] = tokens / (row["step_ms"] / 1e3)
        except Exception as error:  # noqa: BLE001
            row = {"impl": name, "status": "failed", "reason": f"{type(error).__name__}: {error}"[:400]}
        log(f"zo: {name}: {row['status']}" + (f" {row['step_ms']:.1f} ms" if row.get("step_ms") else ""))
        part.add("rows", row)
    rows = {r["impl"]: r for r in part["rows"]}
    mezo = rows.get("mezo-loop", {}).get("step_ms")
    inference = part["inference"].get("transient_peak_gb") if isinstance(part["inference"], dict) else None
    for r in part["rows"]:
        if r.get("step_ms") and mezo:
            r["speedup_vs_mezo"] = mezo / r["step_ms"]
        if r.get("step_ms") and rows.get("plain-loop", {}).get("step_ms"):
            r["speedup_vs_plain"] = rows["plain-loop"]["step_ms"] / r["step_ms"]
        if r.get("peak_gb") and inference is not None and isinstance(part["inference"].get("weights_gb"), float):
            r["peak_over_inference"] = r["peak_gb"] / (part["inference"]["weights_gb"] + inference)
    if cuda:  # the dry run's toy timings say nothing about the goal
        part["goal"] = {"target": f">= {GOAL_SPEEDUP}x mezo-loop per step", "met": {
            r["impl"]: r["speedup_vs_mezo"] >= GOAL_SPEEDUP for r in part["rows"] if r.get("speedup_vs_mezo")
            and r["impl"].startswith("lopt")}}
    part.save()
    failed = [r["impl"] for r in part["rows"] if r["status"] == "failed"]
    return part.done("failed" if failed else "ok", ("failed: " + ", ".join(failed)) if failed else None)


def markdown(data: dict) -> str:
    lines = []
    if data.get("selftest"):
        lines.append(f"Dry-run self-test of the MeZO loop: {data['selftest']}")
    if data.get("shape"):
        lines.append(f"Shape: {data['shape']}; inference (no-grad scoring of the 2B stacked rows): {data.get('inference')}")
    rows = data.get("rows") or []
    if rows:
        lines += ["", "| impl | step ms | tokens/s | peak GiB | speedup vs mezo-loop | vs plain-loop | status |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            cells = [r.get(k) for k in ("step_ms", "tokens_per_s", "peak_gb", "speedup_vs_mezo", "speedup_vs_plain")]
            cells = ["-" if c is None else f"{c:.3g}" for c in cells]
            lines.append(f"| {r['impl']} | " + " | ".join(cells) + f" | {r['status']} {r.get('reason') or ''} |")
    if data.get("goal"):
        lines.append(f"\nGoal {data['goal']['target']}: {data['goal']['met']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
