"""The ZO step benchmark on the CPU: seconds per step and peak bytes against MeZO's reference loop and the best
plain PyTorch loop (same model, batch, objective, trained parameters and directions), the boundary's sharing,
scaling with directions / batch / rank, and bf16 against fp32 after N steps.

    python -m benchmarks.zo.run                       SmolLM2-135M, batch 16 (~15 min on 2 cores)
    python -m benchmarks.zo.run --model tiny --quick --out /tmp/zo-toy

Writes ``OUT.json`` and ``OUT.md`` (default ``benchmarks/results/zo-cpu-<date>``), the JSON after every section.

Timing: every comparison runs its implementations round-robin in this one process (A, B, C, A, B, C ...,
the order rotated each round) after an untimed first step each (that step runs under the byte counter: it is
the memory measurement); ratios are medians over rounds of per-round ratios. torch runs on ``--threads``
threads (default 1: on this 2-core machine shared with other jobs, two OpenMP threads of one process were
measured 6x slower than one while the load average was ~6). The load average is recorded around each section.

Memory: ``benchmarks.e2e.bytecount.ByteCounter`` (exact bytes of live tensor storages, as this repo counts
them on the CPU; the CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``). The baseline
is a no-grad forward of the same stacked batch (2P·B rows) through the same scoring code without
perturbations; the Hugging Face forward (full-vocabulary logits) is reported beside it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.zo import impls as Z

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "zo-cpu-2026-12-06"
SHARED = "lopt-lowrank@K=L/2"  # the main comparison's extra row: first_layer = L/2 (upper half trained)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.zo.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct or tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-6, help="lr of the timed steps (MeZO's)")
    p.add_argument("--eps", type=float, default=Z.EPS)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of the main comparison")
    p.add_argument("--boundary-rounds", type=int, default=4)
    p.add_argument("--scaling-rounds", type=int, default=2)
    p.add_argument("--fullrank-rounds", type=int, default=1,
                   help="rounds with lopt-fullrank (paired with mezo-loop; 0: skip it); on the CPU its Philox "
                        "reference makes one SmolLM2 step take minutes")
    p.add_argument("--fullrank-boundary", action="store_true", help="also time fullrank at the boundary")
    p.add_argument("--bf16-steps", type=int, default=200)
    p.add_argument("--bf16-batch", type=int, default=4)
    p.add_argument("--bf16-lr", type=float, default=None,
                   help="default: 1e-5 for SmolLM2 (it moves the held-out loss; in a 40-step probe 1e-4 did not and "
                        "1e-3 diverged), 1e-3 for tiny")
    p.add_argument("--bf16-kinds", default="lowrank")
    p.add_argument("--bf16-eps", default="1e-3,1e-2", help="the eps values of the bf16 runs (MeZO's 1e-3 first)")
    p.add_argument("--sections", default="speed,boundary,scaling,bf16",
                   help="speed includes the memory of the same steps")
    p.add_argument("--grid-directions", default="1,2,4", help="scaling: directions P (lowrank, batch --batch)")
    p.add_argument("--grid-batch", default="4,16,32", help="scaling: batch sizes (mezo-loop, plain-loop, lowrank)")
    p.add_argument("--grid-rank", default="2,8,32,128", help="scaling: ranks (lowrank and highrank)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="toy sizes: 1 round everywhere, 4 bf16 steps")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="path prefix of the .json and .md files")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = args.boundary_rounds = args.scaling_rounds = args.fullrank_rounds = 1
        args.bf16_steps, args.bf16_kinds, args.fullrank_boundary = 4, "lowrank,fullrank", True
    return args


class Report:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.data = {"title": "ZO step: lopt's engine against MeZO's reference loop and the best plain PyTorch loop",
                     "date": dt.date.today().isoformat(), "args": vars(args), "machine": machine(args),
                     "status": "running"}

    def write(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".json").write_text(json.dumps(self.data, indent=1, default=float) + "\n")
        self.out.with_suffix(".md").write_text(markdown(self.data))


def machine(args) -> dict:
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- sections


class Bench:
    def __init__(self, args, report: Report):
        self.args, self.report = args, report
        self.model, self.tokenizer = Z.load(args.model)
        self.layers = len(self.model.model.layers)
        self.batches = {}
        names = Z.trained_names(self.model)
        params = dict(self.model.named_parameters())
        report.data["model"] = {
            "name": args.model, "dtype": "float32", "layers": self.layers,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "trained_tensors": len(names), "trained_parameters": sum(params[n].numel() for n in names)}
        report.data["objective"] = (
            "classification: cross-entropy over the candidates ' terrible' / ' great' at the last prompt position "
            "(MeZO's SST-2 prompt '{text} It was'), mean over the batch; rows of lopt.data.sentiment (train split)"
            if self.tokenizer is not None else
            "classification over two candidate tokens on random prompts (toy model: no one-token label words)")
        report.data["trained"] = ("the nn.Linear weights of the decoder layers >= first_layer (q, k, v, o, gate, up, "
                                  "down); embeddings, norms and the (tied) head frozen, for every implementation")

    def batch(self, n: int) -> dict:
        if n not in self.batches:
            self.batches[n] = (Z.sentiment_batch(self.tokenizer, n) if self.tokenizer is not None else
                               Z.synthetic_batch(self.model.config.vocab_size, n, seed=n))
        return self.batches[n]

    def impl(self, name, batch_size=None, **kw):
        return Z.make(name, self.model, self.batch(batch_size or self.args.batch), lr=self.args.lr,
                      eps=self.args.eps, **kw)

    def group(self, impls: dict, rounds: int, warmup_memory: bool = True, counted: bool = False) -> dict:
        """Time ``impls`` interleaved. ``warmup_memory``: a first, untimed step each runs under the byte counter;
        ``counted``: no warm-up, every timed step runs under the byte counter (its per-operator overhead, the
        same for every implementation, is well under 1% of a SmolLM2 step), the memory is the last one's."""
        load_before = Z.load_average()
        results = {label: {"steps": []} for label in impls}
        if warmup_memory and not counted:
            for label, impl in impls.items():
                holder = {}
                results[label]["memory"] = Z.peak_bytes(lambda: holder.update(out=impl.step()), impl.persistent())
                results[label]["steps"].append(holder["out"])

        def stepper(label):
            impl, result = impls[label], results[label]
            if not counted:
                return lambda: result["steps"].append(impl.step())
            return lambda: result.update(memory=Z.peak_bytes(lambda: result["steps"].append(impl.step()),
                                                             impl.persistent()))

        times = Z.interleaved({label: stepper(label) for label in impls}, rounds, warmup=0)
        for label in impls:
            results[label].update(Z.summary(times[label]))
            results[label]["_times"] = times[label]
        return {"load_before": load_before, "load_after": Z.load_average(), "results": results}

    # -------------------------------------------------------------------- speed + memory of the main comparison

    def speed(self):
        args, B = self.args, self.args.batch
        start = time.perf_counter()
        names = [n for n in Z.IMPLS if n != "lopt-fullrank"]
        impls = {n: self.impl(n) for n in names}
        # beside them (not a same-parameters row): lowrank training the upper half, the lower half shared
        impls[SHARED] = self.impl("lopt-lowrank", first_layer=self.layers // 2)
        clean = {n: impl.clean_loss() for n, impl in impls.items()}
        groups = [self.group(impls, args.rounds)]
        full = None
        if args.fullrank_rounds > 0:  # its own group, fewer rounds: paired with the reference loops
            full = {"mezo-loop": impls["mezo-loop"], "plain-loop": impls["plain-loop"],
                    "lopt-fullrank": self.impl("lopt-fullrank")}
            clean["lopt-fullrank"] = full["lopt-fullrank"].clean_loss()
            groups.append(self.group(full, args.fullrank_rounds, counted=True))
        rows = {}
        for gi, g in enumerate(groups):
            res = g["results"]
            for label, r in res.items():
                if gi == 1 and label != "lopt-fullrank":
                    continue
                row = {k: v for k, v in r.items() if k not in ("steps", "_times", "memory")}
                row["speedup_vs_mezo"] = Z.paired_ratio(res["mezo-loop"]["_times"], r["_times"])
                row["speedup_vs_plain"] = Z.paired_ratio(res["plain-loop"]["_times"], r["_times"])
                row["group"] = "main" if gi == 0 else "fullrank (paired with the reference loops)"
                steps = r["steps"]
                row["abs_loss_diff_median"] = statistics.median(
                    abs(p - m) for s in steps for p, m in zip(s["loss_plus"], s["loss_minus"]))
                row["loss_plus_first"] = steps[0]["loss_plus"][0]
                row["clean_loss_start"] = clean[label]
                rows[label] = row
        # the same-objective checks: mezo-loop and plain-loop draw the same z for a step's seed
        mezo, plain = (groups[0]["results"][n]["steps"] for n in ("mezo-loop", "plain-loop"))
        g_rel = [abs(a["g"][0] - b["g"][0]) / max(abs(a["g"][0]), 1e-12) for a, b in zip(mezo, plain)]
        lp_abs = [abs(a["loss_plus"][0] - b["loss_plus"][0]) for a, b in zip(mezo, plain)]
        check = {
            "clean_loss_at_start": clean,
            "clean_loss_max_abs_diff": max(clean.values()) - min(clean.values()),
            "mezo_vs_plain_same_seed": {"steps": len(g_rel), "g_max_rel_diff": max(g_rel),
                                        "loss_plus_max_abs_diff": max(lp_abs),
                                        "g_mezo": [s["g"][0] for s in mezo], "g_plain": [s["g"][0] for s in plain]},
            "engine_vs_reference": (
                "exact same-objective checks of the engine against reference loops with the same Z are the tests "
                "tests/zo/test_zo_engine_steps.py::test_dense_steps_equal_mezo_loop (fullrank and highrank: g to "
                "2e-4, weights to 3e-6 after 4 steps) and ::test_lowrank_steps_equal_lozo_reference (lowrank "
                "against LoZO's lozo_step: L+ to 3e-7 relative, g to 2e-4, 6 steps); here the engine's Z stream "
                "differs from torch.normal's, so only the clean loss and the |L+ - L-| magnitudes are compared"),
        }
        self.report.data["speed"] = {
            "batch": B, "seq_len": int(self.batch(B)["input_ids"].shape[1]), "directions": 1, "lr": args.lr,
            "eps": args.eps, "first_layer": 0, "rounds": args.rounds, "fullrank_rounds": args.fullrank_rounds,
            "load": [(g["load_before"], g["load_after"]) for g in groups],
            "impls": rows, "objective_check": check, "seconds": round(time.perf_counter() - start, 1)}
        # memory of the same steps against the inference of the stacked batch
        inference = Z.inference_peaks(self.model, self.batch(B), 2)
        mem = {}
        for gi, g in enumerate(groups):
            for label, r in g["results"].items():
                if "memory" not in r or (gi == 1 and label != "lopt-fullrank"):
                    continue
                m = dict(r["memory"])
                m["ratio_to_inference"] = m["peak"] / inference["scoring"]["peak"]
                m["ratio_to_hf_inference"] = m["peak"] / inference["hf"]["peak"]
                m["transient_ratio_to_inference"] = m["transient_peak"] / inference["scoring"]["transient_peak"]
                mem[label] = m
        self.report.data["memory"] = {
            "method": "ByteCounter (benchmarks/e2e/bytecount.py): exact live tensor bytes; 'peak' includes the "
                      "weights and the implementation's persistent state, 'transient_peak' is what the step "
                      "added on top at its peak. The lowrank step measured is a basis-refresh step (its first).",
            "inference_rows": 2 * B, "inference": inference, "impls": mem}
        self.main_impls = impls

    # -------------------------------------------------------------------- boundary sharing

    def boundary(self):
        args = self.args
        start = time.perf_counter()
        half = self.layers // 2
        kinds = ["lopt-lowrank"] + (["lopt-fullrank"] if args.fullrank_boundary and args.fullrank_rounds else [])
        out = {"first_layer": half, "layers": self.layers,
               "forward_fraction_predicted": (half + 2 * (self.layers - half)) / (2 * self.layers), "kinds": {}}
        for name in kinds:
            rounds = args.boundary_rounds if name == "lopt-lowrank" else args.fullrank_rounds
            impls = {f"{name}@K=0": self.impl(name), f"{name}@K={half}": self.impl(name, first_layer=half)}
            g = self.group(impls, rounds)
            r0, rk = (g["results"][k] for k in impls)
            out["kinds"][name] = {
                "seconds_K0": r0["median_s"], f"seconds_K{half}": rk["median_s"],
                "rounds_K0": r0["seconds"], f"rounds_K{half}": rk["seconds"],
                "ratio": Z.paired_ratio(rk["_times"], r0["_times"]), "rounds": rounds,
                "load": (g["load_before"], g["load_after"]),
                "peak_bytes_K0": r0["memory"]["peak"], f"peak_bytes_K{half}": rk["memory"]["peak"]}
        if not (args.fullrank_boundary and args.fullrank_rounds):
            out["fullrank"] = ("not timed: one SmolLM2 fullrank step takes 40-100 s on this CPU (the Philox reference "
                               "regenerates every trained weight's noise in int64 tensor ops; see the speed section); "
                               "pass --fullrank-boundary to time it")
        out["seconds"] = round(time.perf_counter() - start, 1)
        self.report.data["boundary"] = out

    # -------------------------------------------------------------------- scaling

    def scaling(self):
        args, B = self.args, self.args.batch
        start = time.perf_counter()
        out = {"rounds": args.scaling_rounds, "directions": [], "batch": [], "rank": []}

        def rows(g, axis, values, extra=None):
            res = g["results"]
            for label, value in values.items():
                r = res[label]
                row = {"impl": label.split("@")[0], axis: value, "median_s": r["median_s"], "seconds": r["seconds"],
                       "peak_bytes": r["memory"]["peak"], "transient_peak_bytes": r["memory"]["transient_peak"],
                       "load": (g["load_before"], g["load_after"])}
                if extra:
                    row.update(extra(label, r))
                yield row

        # directions P (lowrank r = 2, batch B): peak against the inference of 2P·B rows
        grid = {axis: [int(v) for v in getattr(args, f"grid_{axis}").split(",")] for axis in ("directions", "batch", "rank")}
        impls = {f"lopt-lowrank@P={p}": self.impl("lopt-lowrank", directions=p) for p in grid["directions"]}
        g = self.group(impls, args.scaling_rounds)
        inf = {p: Z.inference_peaks(self.model, self.batch(B), 2 * p)["scoring"]["peak"] for p in grid["directions"]}
        base = g["results"][f"lopt-lowrank@P={grid['directions'][0]}"]["_times"]
        out["directions"] = list(rows(g, "directions", {k: int(k.split("=")[1]) for k in impls}, lambda label, r: {
            "inference_peak_bytes": inf[int(label.split("=")[1])],
            "peak_ratio_to_inference": r["memory"]["peak"] / inf[int(label.split("=")[1])],
            "seconds_per_direction_vs_P1": Z.paired_ratio(r["_times"], base) / int(label.split("=")[1])}))
        self.report.write()
        # batch: the reference loops and lowrank at each B
        for b in grid["batch"]:
            impls = {f"{n}@B={b}": self.impl(n, batch_size=b) for n in ("mezo-loop", "plain-loop", "lopt-lowrank")}
            g = self.group(impls, args.scaling_rounds)
            inf = Z.inference_peaks(self.model, self.batch(b), 2)["scoring"]["peak"]
            mezo, plain = (g["results"][f"{n}@B={b}"]["_times"] for n in ("mezo-loop", "plain-loop"))
            out["batch"] += list(rows(g, "batch", {k: b for k in impls}, lambda label, r: {
                "speedup_vs_mezo": Z.paired_ratio(mezo, r["_times"]),
                "speedup_vs_plain": Z.paired_ratio(plain, r["_times"]),
                "peak_ratio_to_inference": r["memory"]["peak"] / inf}))
            self.report.write()
        # rank: lowrank and highrank at r = 2, 8, 32, 128 (P = 1, batch B)
        impls = {f"{n}@r={r}": self.impl(n, rank=r) for n in ("lopt-lowrank", "lopt-highrank") for r in grid["rank"]}
        g = self.group(impls, args.scaling_rounds)
        inf = Z.inference_peaks(self.model, self.batch(B), 2)["scoring"]["peak"]
        base = g["results"][f"lopt-lowrank@r={grid['rank'][0]}"]["_times"]
        out["rank"] = list(rows(g, "rank", {k: int(k.split("=")[1]) for k in impls}, lambda label, r: {
            "time_vs_lowrank_r2": Z.paired_ratio(r["_times"], base),
            "peak_ratio_to_inference": r["memory"]["peak"] / inf}))
        out["seconds"] = round(time.perf_counter() - start, 1)
        self.report.data["scaling"] = out

    # -------------------------------------------------------------------- bf16 against fp32

    def bf16(self):
        args = self.args
        start = time.perf_counter()
        B, steps = args.bf16_batch, args.bf16_steps
        lr = args.bf16_lr or (1e-5 if self.tokenizer is not None else 1e-3)
        if self.tokenizer is not None:
            train = [Z.sentiment_batch(self.tokenizer, B, offset=B * t) for t in range(steps)]
            held = Z.sentiment_batch(self.tokenizer, 64, split="eval")
        else:
            vocab = self.model.config.vocab_size
            train = [Z.synthetic_batch(vocab, B, seed=100 + t) for t in range(steps)]
            held = Z.synthetic_batch(vocab, 16, seed=99)
        start_bf16 = copy.deepcopy(self.model).to(torch.bfloat16)
        out = {"steps": steps, "batch": B, "lr": lr, "directions": 1, "first_layer": 0,
               "start": "the bf16-rounded SmolLM2 weights; the fp32 run starts from the same values in fp32",
               "data": "step t scores rows B·t..B·t+B of the sentiment train split (the same for both runs); the "
                       "clean loss is over 64 evaluation-split rows", "kinds": {}, "load_before": Z.load_average()}
        configs = [(kind, float(eps)) for kind in args.bf16_kinds.split(",") for eps in args.bf16_eps.split(",")]
        for kind, eps in configs:
            models = {"bf16": copy.deepcopy(start_bf16), "fp32": copy.deepcopy(start_bf16).float()}
            settings = Z.ZOSettings(kind=kind, eps=eps, lr=lr, seed=7)
            engines = {k: Z.ZOEngine(m, settings, kernels=False) for k, m in models.items()}
            start_w = engines["fp32"].trained_weights()
            held_loss = {k: float(e.scores(held).loss[0]) for k, e in engines.items()}
            times = {"bf16": [], "fp32": []}
            g_log = {"bf16": [], "fp32": []}
            for t in range(steps):
                for k in (("fp32", "bf16") if t % 2 == 0 else ("bf16", "fp32")):
                    t0 = time.perf_counter()
                    o = engines[k].step(train[t])
                    times[k].append(time.perf_counter() - t0)
                    g_log[k].append(o.projected_grads[0])
            w = {k: e.trained_weights() for k, e in engines.items()}
            update = Z.weights_distance(w["fp32"], start_w)
            gap = Z.weights_distance(w["bf16"], w["fp32"])
            end_loss = {k: float(e.scores(held).loss[0]) for k, e in engines.items()}
            out["kinds"][f"{kind}@eps={eps:g}"] = {"kind": kind, "eps": eps,
                "update_norm": update, "gap_norm": gap, "gap_over_update": gap / update if update else None,
                "held_loss_start": held_loss, "held_loss_end": end_loss,
                "g_corr": float(torch.corrcoef(torch.tensor([g_log["fp32"], g_log["bf16"]]))[0, 1]) if steps > 1 else None,
                "step_s_median": {k: statistics.median(v) for k, v in times.items()},
                "bf16_over_fp32_time": Z.paired_ratio(times["bf16"], times["fp32"])}
            self.report.write()
        out["load_after"] = Z.load_average()
        out["seconds"] = round(time.perf_counter() - start, 1)
        self.report.data["bf16"] = out


# ---------------------------------------------------------------------------------------------- goals and report


def goals(data: dict) -> list[dict]:
    out = []

    def add(goal, value, target, ok, note=""):
        out.append({"goal": goal, "value": value, "target": target, "met": ok, "note": note})

    speed = data.get("speed", {}).get("impls", {})
    if "lopt-lowrank" in speed:
        for impl in ("lopt-lowrank", "lopt-highrank", "lopt-fullrank"):
            if impl in speed:
                v = speed[impl]["speedup_vs_mezo"]
                add(f"{impl} speed vs mezo-loop (batch {data['speed']['batch']}, P = 1)", v, ">= 2.5x", v >= 2.5)
                v = speed[impl]["speedup_vs_plain"]
                add(f"{impl} speed vs plain-loop", v, ">= 1.5x", v >= 1.5)
    if SHARED in speed:
        v = speed[SHARED]["speedup_vs_mezo"]
        add(f"{SHARED} (upper half trained, lower half shared) speed vs mezo-loop", v, ">= 2.5x", v >= 2.5,
            "not the same parameter set: for reference")
        v = speed[SHARED]["speedup_vs_plain"]
        add(f"{SHARED} speed vs plain-loop", v, ">= 1.5x", v >= 1.5, "not the same parameter set: for reference")
    mem = data.get("memory", {}).get("impls", {})
    for impl in ("lopt-lowrank", "lopt-highrank", "lopt-fullrank"):
        if impl in mem:
            v = mem[impl]["ratio_to_inference"]
            add(f"{impl} peak bytes vs inference of the stacked batch", v, "<= 1.1x", v <= 1.1)
    for kind, b in (data.get("boundary", {}).get("kinds") or {}).items():
        add(f"{kind} step cost, first_layer = L/2 vs 0", b["ratio"], "<= 0.8x", b["ratio"] <= 0.8)
    for kind, b in (data.get("bf16", {}).get("kinds") or {}).items():
        v = b["gap_over_update"]
        add(f"bf16 {kind}: |θ_bf16 − θ_fp32| / |θ_fp32 − θ_0| after {data['bf16']['steps']} steps", v, "<= 1%",
            v is not None and v <= 0.01)
    return out


def _f(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.4g}"
    return str(x)


def _mb(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def markdown(data: dict) -> str:
    m = data.get("model", {})
    lines = [f"# {data['title']}", "",
             f"{data['date']}; {m.get('name')} ({m.get('layers')} layers, fp32, {m.get('trained_parameters')} trained "
             f"parameters in {m.get('trained_tensors')} linears); torch {data['machine']['torch']}, "
             f"{data['machine']['threads']} thread(s) on a shared 2-core CPU; status {data.get('status')}.", "",
             f"Objective: {data.get('objective')}.", f"Trained: {data.get('trained')}.", ""]
    if data.get("goals"):
        lines += ["## Goals", "", "| goal | value | target | met | note |", "|---|---:|---|---|---|"]
        for g in data["goals"]:
            lines.append(f"| {g['goal']} | {_f(g['value'])} | {g['target']} | {'yes' if g['met'] else 'no'} "
                         f"| {g.get('note', '')} |")
        lines.append("")
    s = data.get("speed")
    if s:
        lines += [f"## Seconds per step (batch {s['batch']}, seq {s['seq_len']}, P = 1, interleaved, "
                  f"{s['rounds']} rounds; load average {s['load']})", "",
                  "| impl | median s | speedup vs mezo-loop | vs plain-loop | clean loss at θ0 | median abs(L+ − L−) | rounds |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in s["impls"].items():
            lines.append(f"| {name} | {_f(r['median_s'])} | {_f(r['speedup_vs_mezo'])} | {_f(r['speedup_vs_plain'])} "
                         f"| {_f(r['clean_loss_start'], 6)} | {_f(r['abs_loss_diff_median'])} | {r['rounds']} |")
        c = s["objective_check"]["mezo_vs_plain_same_seed"]
        lines += ["", f"mezo-loop vs plain-loop, same seeds: g max relative difference {_f(c['g_max_rel_diff'])}, "
                  f"L+ max abs difference {_f(c['loss_plus_max_abs_diff'])} over {c['steps']} steps.", ""]
    mem = data.get("memory")
    if mem:
        inf = mem["inference"]
        lines += [f"## Peak bytes (MiB) against a no-grad forward of the stacked batch ({mem['inference_rows']} rows)", "",
                  f"Inference: scoring forward peak {_mb(inf['scoring']['peak'])} (transient "
                  f"{_mb(inf['scoring']['transient_peak'])}); Hugging Face forward with full logits "
                  f"{_mb(inf['hf']['peak'])} (transient {_mb(inf['hf']['transient_peak'])}).", "",
                  "| impl | peak | transient | peak / inference | transient / inference transient | peak / HF inference |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in mem["impls"].items():
            lines.append(f"| {name} | {_mb(r['peak'])} | {_mb(r['transient_peak'])} | {_f(r['ratio_to_inference'])} "
                         f"| {_f(r['transient_ratio_to_inference'])} | {_f(r['ratio_to_hf_inference'])} |")
        lines.append("")
    b = data.get("boundary")
    if b:
        lines += [f"## Boundary: first_layer = {b['first_layer']} of {b['layers']} vs 0 (P = 1; predicted forward "
                  f"fraction {_f(b['forward_fraction_predicted'])})", "",
                  "| impl | s at K = 0 | s at K = L/2 | ratio | rounds |", "|---|---:|---:|---:|---:|"]
        half = f"seconds_K{b['first_layer']}"
        for kind, r in b["kinds"].items():
            lines.append(f"| {kind} | {_f(r['seconds_K0'])} | {_f(r[half])} | {_f(r['ratio'])} | {r['rounds']} |")
        if b.get("fullrank"):
            lines.append(f"\nfullrank: {b['fullrank']}")
        lines.append("")
    sc = data.get("scaling")
    if sc:
        lines += [f"## Scaling ({sc['rounds']} timed rounds each; one factor at a time around P = 1, B = "
                  f"{data.get('speed', {}).get('batch', '-')}, r = 2)", "",
                  "| impl | P | B | r | median s | speedup vs mezo | vs plain | peak MiB | peak / inference |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        B = data.get("speed", {}).get("batch", "-")
        for axis in ("directions", "batch", "rank"):
            for r in sc.get(axis, []):
                p, bb = r.get("directions", 1), r.get("batch", B)
                rk = r.get("rank", 2 if r["impl"] == "lopt-lowrank" else ("-" if "loop" in r["impl"] else 128))
                lines.append(f"| {r['impl']} | {p} | {bb} | {rk} | {_f(r['median_s'])} | {_f(r.get('speedup_vs_mezo'))} "
                             f"| {_f(r.get('speedup_vs_plain'))} | {_mb(r['peak_bytes'])} "
                             f"| {_f(r.get('peak_ratio_to_inference'))} |")
        lines.append("")
    bf = data.get("bf16")
    if bf:
        lines += [f"## bf16 against fp32 ({bf['steps']} steps, batch {bf['batch']}, lr {bf['lr']}; kind@eps)", "",
                  "| kind | gap / update | update norm | held-out loss fp32 start → end | bf16 end | corr(g) | bf16/fp32 time |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        for kind, r in bf["kinds"].items():
            lines.append(f"| {kind} | {_f(r['gap_over_update'])} | {_f(r['update_norm'])} | "
                         f"{_f(r['held_loss_start']['fp32'], 5)} → {_f(r['held_loss_end']['fp32'], 5)} | "
                         f"{_f(r['held_loss_end']['bf16'], 5)} | {_f(r['g_corr'])} | {_f(r['bf16_over_fp32_time'])} |")
        lines.append("")
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)


def strip_private(data):
    if isinstance(data, dict):
        return {k: strip_private(v) for k, v in data.items() if not k.startswith("_")}
    if isinstance(data, list):
        return [strip_private(v) for v in data]
    return data


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = Report(args)
    bench = Bench(args, report)
    started = time.perf_counter()
    for section in args.sections.split(","):
        print(f"zo bench: {section} (load {Z.load_average()}, {time.perf_counter() - started:.0f} s)", flush=True)
        getattr(bench, section)()
        report.data = strip_private(report.data)
        report.data["goals"] = goals(report.data)
        report.write()
    report.data["status"] = "ok"
    report.data["seconds"] = round(time.perf_counter() - started, 1)
    report.write()
    print(f"zo bench: done in {report.data['seconds']} s; wrote {Path(args.out).with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
